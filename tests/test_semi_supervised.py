"""Semi-supervised fine-tuning (scripts/semi_supervised.py): Mixup (train.yaml ``mixup_alpha``) and weak-to-strong
consistency (overlay consistency.yaml).

Unit level: Mixup keeps each pixel's label sum and mixes image and label alike; the consistency loss is zero when the
weak and strong views coincide and are confident, ignores unconfident pixels, and follows CutMix boxes; the strong
view and the feature dropout touch only what they should.
Workflow level (tiny network, CPU): with the switches off, fine-tuning gives the same weights, bit for bit, as
today's code path (the prepare_batch and loss train.yaml had before Mixup); Mixup and consistency change them; a
consistency fine-tuning killed with SIGKILL part-way and resumed ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

import conftest as br
from scripts.files import safe_load
from scripts.networks import UNet2D
from scripts.semi_supervised import (
    ConsistencyStep,
    MixupBatch,
    StrongPerturbation,
    _FeatureDropout,
    consistency_loss,
    masked_dice_ce,
    mixup,
)


# ---------------------------------------------------------------- Mixup
def test_mixup_keeps_the_label_sums_and_mixes_image_and_label_alike():
    torch.manual_seed(0)
    labels = torch.randint(0, 4, (6, 16, 16))
    onehot = torch.nn.functional.one_hot(labels, 4).permute(0, 3, 1, 2).float()
    images = torch.rand(6, 1, 16, 16)
    mixed_images, mixed = mixup(images, onehot, alpha=0.4)
    assert mixed.shape == onehot.shape and mixed_images.shape == images.shape
    torch.testing.assert_close(mixed.sum(1), torch.ones(6, 16, 16))  # every pixel's classes still sum to 1
    assert (mixed >= 0).all() and (mixed <= 1).all()
    assert not torch.equal(mixed, onehot)  # something was mixed
    # image and label share λ and partner: recover them from the label and check the image
    torch.manual_seed(0)
    torch.randint(0, 4, (6, 16, 16)), torch.rand(6, 1, 16, 16)
    lam = torch.distributions.Beta(0.4, 0.4).sample((6,))
    partner = torch.randperm(6)
    w = lam.view(6, 1, 1, 1)
    torch.testing.assert_close(mixed_images, w * images + (1 - w) * images[partner])
    torch.testing.assert_close(mixed, w * onehot + (1 - w) * onehot[partner])


def test_mixup_batch_is_the_plain_batch_when_off_and_soft_one_hot_when_on():
    image, label = torch.rand(4, 1, 8, 8), torch.randint(0, 3, (4, 1, 8, 8))
    plain = lambda batch, device=None, non_blocking=False: (batch["image"], batch["label"])  # noqa: E731
    off_image, off_label = MixupBatch(plain, alpha=0.0)({"image": image, "label": label})
    assert off_image is image and off_label is label  # untouched, not even copied
    on_image, on_label = MixupBatch(plain, alpha=0.2, num_classes=3)({"image": image, "label": label})
    assert on_label.shape == (4, 3, 8, 8) and on_label.dtype == image.dtype
    torch.testing.assert_close(on_label.sum(1), torch.ones(4, 8, 8))


# ---------------------------------------------------------------- the consistency loss
def _confident_logits(labels: torch.Tensor, k: int = 4, margin: float = 100.0) -> torch.Tensor:
    return margin * torch.nn.functional.one_hot(labels, k).permute(0, 3, 1, 2).float()


def test_consistency_loss_is_zero_when_weak_and_strong_coincide_and_are_confident():
    torch.manual_seed(0)
    weak = _confident_logits(torch.randint(0, 4, (3, 16, 16)))
    loss, confident = consistency_loss(weak, weak.clone(), threshold=0.95)
    assert confident.item() == 1.0
    assert loss.item() == pytest.approx(0.0, abs=1e-7)
    other = _confident_logits(torch.randint(0, 4, (3, 16, 16)))  # a confident strong view that disagrees
    assert consistency_loss(weak, other, threshold=0.95)[0].item() > 1.0


def test_consistency_loss_ignores_unconfident_pixels():
    torch.manual_seed(0)
    labels = torch.randint(0, 4, (2, 8, 8))
    weak = _confident_logits(labels)
    weak[:, :, :4] = 0.0  # the top half: uniform, 0.25 < threshold
    strong = weak.clone()
    strong[:, :, :4] = torch.randn(2, 4, 4, 8) * 10  # anything there
    loss, confident = consistency_loss(weak, strong, threshold=0.95)
    assert confident.item() == pytest.approx(0.5)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    strong.requires_grad_(True)
    loss, _ = consistency_loss(weak, strong, threshold=0.95)
    loss.backward()
    assert strong.grad[:, :, :4].abs().sum() == 0  # no gradient where the pseudo-label is not confident


def test_consistency_loss_takes_the_pseudo_labels_of_the_cutmix_partner_inside_the_box():
    labels = torch.stack([torch.zeros(8, 8, dtype=torch.long), torch.full((8, 8), 2)])
    weak = _confident_logits(labels)
    box = torch.zeros(2, 8, 8, dtype=torch.bool)
    box[0, 2:5, 2:5] = True
    strong_labels = labels.clone()
    strong_labels[0, 2:5, 2:5] = 2  # slice 0 shows slice 1 inside its box
    strong = _confident_logits(strong_labels)
    assert consistency_loss(weak, strong, 0.95, box=box)[0].item() == pytest.approx(0.0, abs=1e-7)
    assert consistency_loss(weak, strong, 0.95)[0].item() > 0.01  # without the box it disagrees there


def test_the_unsupervised_weight_ramps_up_monotonically_to_its_value():
    from scripts.semi_supervised import rampup_weight

    assert rampup_weight(2.0, 1, 0) == rampup_weight(2.0, 10_000, 0) == 2.0          # no ramp: the weight throughout
    ramp = [rampup_weight(2.0, i, 300) for i in range(1, 601)]
    assert ramp[0] < 0.02 and ramp[299] == ramp[-1] == 2.0                          # ~0.7 % at first, all from 300 on
    assert all(a <= b for a, b in zip(ramp, ramp[1:]))
    assert abs(rampup_weight(1.0, 150, 300) - math.exp(-1.25)) < 1e-12              # exp(-5 (1 - t)^2) at t = 0.5


def test_masked_dice_ce_equals_the_plain_loss_when_every_pixel_counts():
    from monai.losses import DiceCELoss

    torch.manual_seed(0)
    logits, target = torch.randn(3, 4, 8, 8), torch.randint(0, 4, (3, 8, 8))
    expected = DiceCELoss(include_background=True, to_onehot_y=True, softmax=True)(logits, target[:, None])
    torch.testing.assert_close(masked_dice_ce(logits, target, torch.ones(3, 8, 8)), expected)


# ---------------------------------------------------------------- views and feature perturbation
def test_strong_perturbation_off_is_the_identity_and_cutmix_pastes_the_next_slice():
    torch.manual_seed(0)
    x = torch.rand(4, 1, 16, 16)
    off = StrongPerturbation(jitter_probability=0, blur_probability=0, cutmix_probability=0)
    strong, box = off(x)
    assert not box.any()
    torch.testing.assert_close(strong, x)
    cut = StrongPerturbation(jitter_probability=0, blur_probability=0, cutmix_probability=1)
    strong, box = cut(x)
    assert box.any(dim=(1, 2)).all()
    torch.testing.assert_close(strong[:, 0][box], x.roll(-1, 0)[:, 0][box])
    torch.testing.assert_close(strong[:, 0][~box], x[:, 0][~box])
    jittered, _ = StrongPerturbation(jitter_probability=1, blur_probability=1, cutmix_probability=0)(x)
    assert jittered.shape == x.shape and not torch.allclose(jittered, x)


def test_feature_dropout_touches_only_the_rows_from_start_and_only_while_set():
    torch.manual_seed(0)
    net = UNet2D(1, 3, **br.TINY_NETWORK).eval()  # eval: BatchNorm's statistics do not depend on the batch
    x = torch.rand(4, 1, 32, 32)
    with torch.no_grad():
        plain = net(x)
        hooks = _FeatureDropout(net, p=0.5)
        hooks.start = 2
        perturbed = net(x)
        hooks.start = None
        again = net(x)
    torch.testing.assert_close(perturbed[:2], plain[:2])
    assert not torch.allclose(perturbed[2:], plain[2:])
    torch.testing.assert_close(again, plain)


def test_with_no_unsupervised_weight_a_consistency_step_is_the_supervised_step():
    """The labelled batch goes through the network on its own, so BatchNorm normalises it by its own statistics: with
    weight 0 the parameters move exactly as in a supervised step on that batch (one pass over labelled and unlabelled
    views together did not, and fine-tuned worse: docs/study/semi_supervised.md)."""
    from types import SimpleNamespace

    from monai.losses import DiceCELoss

    torch.manual_seed(0)
    net = UNet2D(1, 3, **br.TINY_NETWORK).train()
    twin = copy.deepcopy(net)
    image, label = torch.rand(4, 1, 32, 32), torch.randint(0, 3, (4, 1, 32, 32)).float()
    weak = torch.rand(4, 1, 32, 32)
    data = {"image": image, "label": label, "weak": weak, "strong": 1 - weak, "box": torch.zeros(4, 32, 32).bool()}
    loss = DiceCELoss(to_onehot_y=True, softmax=True)
    engine = SimpleNamespace(network=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1), optim_set_to_none=True,
                             amp=False, scaler=None, amp_kwargs={}, inferer=lambda x, n: n(x), loss_function=loss,
                             fire_event=lambda event: None, state=SimpleNamespace(iteration=1))
    ConsistencyStep(None, None, None, weight=0.0).compute(engine, data)
    optimiser = torch.optim.SGD(twin.parameters(), lr=0.1)
    optimiser.zero_grad()
    loss(twin(image), label).backward()
    optimiser.step()
    for (name, moved), expected in zip(net.named_parameters(), twin.parameters()):
        torch.testing.assert_close(moved, expected, msg=name)


def test_the_learning_rate_decay_is_polynomial_and_refuses_a_negative_power():
    from scripts.engines import polynomial_decay
    from scripts.errors import BundleError

    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=0.001)
    schedule = polynomial_decay(optimizer, total_iters=4, power=0.9)
    rates = []
    for _ in range(4):
        optimizer.step()
        schedule.step()
        rates.append(optimizer.param_groups[0]["lr"])
    assert all(abs(r - 0.001 * (1 - i / 4) ** 0.9) < 1e-12 for i, r in enumerate(rates, 1))   # 0 at the last step
    with pytest.raises(BundleError, match="lr_decay_power: -0.5 is negative"):
        polynomial_decay(torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=0.001), total_iters=4, power=-0.5)


def test_the_weight_average_is_an_ema_of_weights_and_batchnorm_statistics_and_off_is_the_network():
    from scripts.engines import WeightAverage
    from scripts.errors import BundleError

    torch.manual_seed(0)
    net = UNet2D(1, 3, **br.TINY_NETWORK).train()
    off = WeightAverage(net, 0.0)
    assert off.network is net and off.state_dict() == {}
    average = WeightAverage(net, 0.9)
    snapshots = []
    for _ in range(3):   # a step that moves the weights and the BatchNorm running statistics
        with torch.no_grad():
            net(torch.rand(2, 1, 32, 32))
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        snapshots.append({k: v.clone() for k, v in net.state_dict().items()})
        average.update()
    expected = {k: v.float() for k, v in snapshots[0].items()}   # the first update copies
    for snapshot in snapshots[1:]:
        expected = {k: 0.9 * expected[k] + 0.1 * snapshot[k].float() for k in expected}
    kept = average.network.state_dict()
    assert kept.keys() == net.state_dict().keys()   # model.pt holds a plain U-Net state_dict
    for key, value in kept.items():
        if value.is_floating_point():
            torch.testing.assert_close(value, expected[key], msg=key)
    first = next(iter(kept))
    assert not torch.equal(kept[first], net.state_dict()[first])   # the average lags the last weights
    twin = WeightAverage(net, 0.9)
    twin.load_state_dict(average.state_dict())   # a resume restores the average
    assert _same(twin.network.state_dict(), kept)
    with pytest.raises(BundleError, match="ema_decay: 1.0 is outside"):
        WeightAverage(net, 1.0)


# ---------------------------------------------------------------- workflows
TODAY = """# test overlay: the fine-tuning's prepare_batch and loss as train.yaml had them before Mixup (today's path),
# and no learning-rate schedule stepped (train.yaml had none before lr_decay_power)
train#prepare_batch: {_target_: scripts.engines.AugmentedBatch, augment: "@train#augmentation"}
train#loss#to_onehot_y: true
train#handlers#4#_disabled_: true
"""
KILL = """# test overlay: SIGKILL the process when iteration `kill_iteration` of the fine-tuning starts
kill_iteration: 3
at: "$ignite.engine.Events.ITERATION_STARTED(once=@kill_iteration)"
kill_train: ["$@train#trainer.add_event_handler(@at, lambda e: os.kill(os.getpid(), 9))", "$@train#trainer.run()"]
"""


@pytest.fixture(scope="module")
def work(tmp_path_factory, prepared_data):
    work = tmp_path_factory.mktemp("semi")   # the runs' own folders; the data is the session's (only read)
    data = prepared_data
    (work / "today.yaml").write_text(TODAY)
    (work / "kill.yaml").write_text(KILL)
    return work, data


def _fine_tune(work, data, name, *configs, run_id="run", args=(), expect=0, torchrun=0):
    """A tiny seeded fine-tuning from random initialisation with train.yaml + ``configs``, under ``work/name``."""
    return br.run(work, "run", run_id, "--config_file", br.config("train.yaml", *configs), *data,
                  *br.paths(work, name), *br.TINY, *br.FINETUNE, "--use_pretrained", "False", *args, expect=expect,
                  torchrun=torchrun)


def _weights(work, name):
    return safe_load(work / name / "models" / "state_train.pt")["objects"]["model"]


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_switches_off_give_todays_fine_tuning_bit_for_bit_and_on_change_it(work):
    work, data = work
    _fine_tune(work, data, "off")
    _fine_tune(work, data, "today", work / "today.yaml")
    off = _weights(work, "off")
    assert _same(off, _weights(work, "today"))
    _fine_tune(work, data, "mixup", args=("--mixup_alpha", "0.4"))
    assert not _same(off, _weights(work, "mixup"))
    assert safe_load(work / "mixup" / "models" / "state_train.pt")["record"]["mixup_alpha"] == 0.4
    _fine_tune(work, data, "poly", args=("--lr_decay_power", "0.9"))
    assert not _same(off, _weights(work, "poly"))
    poly = safe_load(work / "poly" / "models" / "state_train.pt")
    assert poly["record"]["lr_decay_power"] == 0.9
    assert poly["objects"]["optimizer"]["param_groups"][0]["lr"] == 0.0   # decayed to 0 at the last of 4 x 2 steps
    today = safe_load(work / "off" / "models" / "state_train.pt")["objects"]["optimizer"]["param_groups"][0]
    assert today["lr"] == 0.001
    # the weight average trains the same weights, and validates and keeps their average instead
    _fine_tune(work, data, "ema", args=("--ema_decay", "0.9"))
    ema = safe_load(work / "ema" / "models" / "state_train.pt")
    assert _same(off, ema["objects"]["model"]) and ema["record"]["ema_decay"] == 0.9
    _fine_tune(work, data, "ema_end", args=("--ema_decay", "0.9", "--val_interval", "4"))   # validated at the end only
    ema = safe_load(work / "ema_end" / "models" / "state_train.pt")
    averaged = {k.removeprefix("module."): v for k, v in ema["objects"]["averaged"].items() if k != "n_averaged"}
    assert not _same(ema["objects"]["model"], averaged)
    assert _same(safe_load(work / "ema_end" / "models" / "model.pt")["model"], averaged)


def test_consistency_fine_tuning_killed_and_resumed_equals_uninterrupted(work):
    work, data = work
    # a learning rate that changes every step and a weight average: the schedule and the average resume too
    decay = ("--lr_decay_power", "0.9", "--ema_decay", "0.9")
    whole = _fine_tune(work, data, "cons", "consistency.yaml", args=decay)
    assert "val_mean_dice" in whole.stdout + whole.stderr
    state = safe_load(work / "cons" / "models" / "state_train.pt")
    assert state["record"]["consistency"]["threshold"] == 0.95 and state["objects"]["averaged"]
    if (work / "off" / "models" / "state_train.pt").exists():
        assert not _same(_weights(work, "cons"), _weights(work, "off"))
    _fine_tune(work, data, "cons_killed", "consistency.yaml", work / "kill.yaml",
               run_id="kill_train", args=("--kill_iteration", "5", *decay), expect=-9)
    models = work / "cons_killed" / "models"
    assert safe_load(models / "state_train.pt")["trainer"]["iteration"] == 4
    resumed = _fine_tune(work, data, "cons_killed", "consistency.yaml", args=("--resume", "True", *decay))
    assert "resumed from" in resumed.stdout + resumed.stderr
    assert _same(_weights(work, "cons"), _weights(work, "cons_killed"))
    whole_best = safe_load(work / "cons" / "models" / "model.pt")["model"]
    assert _same(whole_best, safe_load(models / "model.pt")["model"])
    refused = _fine_tune(work, data, "cons_killed", "consistency.yaml",
                         args=("--resume", "True", "--confidence_threshold", "0.9", *decay), expect=None)
    assert refused.returncode != 0 and "consistency" in refused.stderr


RECORD = """# test overlay: after the fine-tuning each rank writes its unlabelled sampler's class and its epoch-1 draws
recorded:
  - "$@train#trainer.run()"
  - "$@semi#sampler.set_epoch(1)"
  - "$open(@model_dir + '/../sampler_rank%d.txt' % torch.distributed.get_rank(), 'w').write(repr(@drawn))"
drawn: "$[type(@semi#sampler).__name__, sorted(set(@semi#sampler))]"
"""


def test_consistency_fine_tuning_under_torchrun_shards_the_unlabelled_slices(work):
    work, data = work
    (work / "record.yaml").write_text(RECORD)
    _fine_tune(work, data, "ddp", "consistency.yaml", "multi_gpu_train.yaml", work / "record.yaml", run_id="recorded",
               args=("--max_epochs", "2"), torchrun=2)
    assert (work / "ddp" / "models" / "model.pt").exists()
    seen = [eval((work / "ddp" / f"sampler_rank{r}.txt").read_text()) for r in range(2)]
    assert all(kind == "ShardedRandomSampler" for kind, _ in seen)
    assert not set(seen[0][1]) & set(seen[1][1])  # each rank its own unlabelled slices
