"""The prepare_batch functions and the loss adapter that let SupervisedTrainer run fine-tuning and pre-training, and
the pre-training stage's stopping rule and learning-rate schedule."""

import json
import os

import pytest
import torch
from ignite.engine import Engine
from monai.bundle import ConfigParser

from conftest import CONFIGS
from scripts.engines import AugmentedBatch, ContrastiveViews, MetadataLoss, PlateauStop
from scripts.losses import GlobalContrastiveLoss, LocalContrastiveLoss


def _batch(b=6):
    return {"image": torch.rand(b, 1, 8, 8), "volume": torch.tensor([0, 0, 0, 1, 1, 1])[:b],
            "partition": torch.tensor([0, 1, 2, 0, 1, 2])[:b], "position": torch.linspace(0, 0.9, b)}


def test_views_are_independent_augmentations_with_shared_sample_ids():
    views, meta = ContrastiveViews(augment=lambda x: x + torch.rand(x.shape[0], 1, 1, 1), num_views=2)(_batch(), "cpu")
    assert views.shape == (12, 1, 8, 8)
    assert torch.equal(meta["sample"], torch.tensor([0, 1, 2, 3, 4, 5] * 2))
    assert torch.equal(meta["volume"], torch.tensor([0, 0, 0, 1, 1, 1] * 2))
    assert not torch.allclose(views[:6], views[6:])  # two draws, not one copied


def test_augmented_batch_augments_image_and_label_together_on_the_device():
    seen = []

    def augment(data):
        seen.append(sorted(data))
        return {"image": data["image"].flip(-1), "label": data["label"].flip(-1)}

    batch = {"image": torch.rand(3, 1, 8, 8), "label": torch.randint(0, 2, (3, 1, 8, 8)), "volume": torch.zeros(3)}
    image, label = AugmentedBatch(augment)(batch, "cpu")
    assert seen == [["image", "label"]]  # only the two keys, in one call
    assert torch.equal(image, batch["image"].flip(-1)) and torch.equal(label, batch["label"].flip(-1))


def test_channels_last_views():
    views, _ = ContrastiveViews(augment=lambda x: x, channels_last=True)(_batch(), "cpu")
    assert views.is_contiguous(memory_format=torch.channels_last)


def test_metadata_loss_passes_what_each_loss_accepts():
    _, meta = ContrastiveViews(augment=lambda x: x)(_batch(), "cpu")
    glob = MetadataLoss(GlobalContrastiveLoss(strategy="positional"))
    assert glob.keys == ("volume", "partition", "sample", "position")
    embeddings = torch.randn(12, 16)
    expected = GlobalContrastiveLoss(strategy="positional")(embeddings, meta["volume"], meta["partition"],
                                                            meta["sample"], meta["position"])
    torch.testing.assert_close(glob(embeddings, meta), expected)
    local = MetadataLoss(LocalContrastiveLoss())
    assert local.keys == ("volume", "partition", "sample")
    assert torch.isfinite(local(torch.randn(12, 4, 12, 12), meta))


def _run_with_losses(losses, stop, epoch_length=10):
    """An engine whose output at iteration i is {"loss": losses[i - 1]}; returns it after running it to the end."""
    engine = Engine(lambda e, _: {"loss": torch.tensor(losses[e.state.iteration - 1], requires_grad=True)})
    stop.attach(engine)
    engine.run(range(epoch_length), max_epochs=len(losses) // epoch_length)
    return engine


def test_plateau_stop_stops_once_the_running_loss_stops_falling(tmp_path):
    # falls over epochs 1..6 (10 iterations each), then flat: best (min_delta 2%) at iteration 60 -> stop at 90
    losses = [3.0 - 0.4 * min(i // 10, 5) for i in range(200)]
    report = tmp_path / "stop.json"
    stop = PlateauStop("global", min_iterations=0, patience=30, min_delta=0.02, report=str(report))
    engine = _run_with_losses(losses, stop)
    assert engine.state.iteration == 90
    saved = json.loads(report.read_text())
    assert saved["reason"] == "plateau" and saved["iteration"] == 90 and saved["best_iteration"] == 60
    assert saved["converged"] is True
    assert saved["loss"] == pytest.approx(1.0) and len(saved["history"]) == 9


def test_plateau_stop_waits_for_min_iterations_and_reports_the_budget(tmp_path):
    flat = [3.2] * 100  # the chance level from the start: no fall, so no plateau
    report = tmp_path / "stop.json"
    engine = _run_with_losses(flat, PlateauStop("global", min_iterations=0, patience=20, report=str(report)))
    saved = json.loads(report.read_text())
    assert engine.state.iteration == 100 and saved["reason"] == "budget"
    assert "never fell" in saved["explanation"] and "not converged" in saved["explanation"]
    assert saved["converged"] is False
    fall_then_flat = [3.2] * 10 + [2.0] * 90
    engine = _run_with_losses(fall_then_flat, PlateauStop("global", min_iterations=60, patience=20))
    assert engine.state.iteration == 60  # a plateau from iteration 20 on, but not before min_iterations
    falling = [3.0 - 0.01 * i for i in range(100)]  # still falling at the end -> the budget, "not converged"
    engine = _run_with_losses(falling, PlateauStop("local", min_iterations=0, patience=20, report=str(report)))
    saved = json.loads(report.read_text())
    assert engine.state.iteration == 100 and saved["reason"] == "budget" and "not converged" in saved["explanation"]
    assert saved["converged"] is False
    engine = _run_with_losses(flat, PlateauStop("local", enabled=False, patience=10, report=str(report)))
    saved = json.loads(report.read_text())
    assert engine.state.iteration == 100 and saved["reason"] == "budget" and saved["converged"] is None


def test_plateau_stop_reports_the_end_of_a_decaying_schedule(tmp_path):
    # with schedule_end (cosine decay to 0 at max_iterations), reaching the budget is the schedule's planned end
    report = tmp_path / "stop.json"
    falling = [3.0 - 0.01 * i for i in range(100)]
    engine = _run_with_losses(falling, PlateauStop("global", patience=20, report=str(report), schedule_end=True))
    saved = json.loads(report.read_text())
    assert engine.state.iteration == 100 and saved["reason"] == "schedule" and "decayed to 0" in saved["explanation"]
    fall_then_flat = [3.2] * 10 + [2.0] * 90  # a plateau still stops it before the schedule ends
    engine = _run_with_losses(fall_then_flat, PlateauStop("global", patience=20, schedule_end=True,
                                                          report=str(report)))
    assert engine.state.iteration == 40 and json.loads(report.read_text())["reason"] == "plateau"


def test_plateau_stop_judges_only_the_losses_after_start_iteration(tmp_path):
    # a crop ramp over 30 iterations: the loss falls, then rises as the task gets harder, then falls and flattens
    ramp_then_train = [3.0] * 10 + [2.5] * 10 + [3.1] * 10 + [2.9] * 10 + [2.6] * 80
    engine = _run_with_losses(ramp_then_train, PlateauStop("global", patience=30))
    assert engine.state.iteration == 50  # judged from the start, the easy epoch at 20 is never beaten: a wrong stop
    stop = PlateauStop("global", patience=30, start_iteration=30)
    engine = _run_with_losses(ramp_then_train, stop)
    # the fall after the ramp, then 30 iterations flat
    assert engine.state.iteration == 80 and stop.best() == (50, pytest.approx(2.6))
    report = tmp_path / "stop.json"  # a stage that ends within the ramp has no best running loss to report
    _run_with_losses(ramp_then_train[:30], PlateauStop("global", patience=30, start_iteration=30, report=str(report)))
    saved = json.loads(report.read_text())
    assert saved["reason"] == "budget" and saved["best_loss"] is None and saved["best_iteration"] is None
    assert "before the plateau rule judged a running loss" in saved["explanation"]


def test_plateau_stop_carries_its_history_across_a_resume():
    stop = PlateauStop("global", patience=30)
    _run_with_losses([2.0] * 30, stop)
    resumed = PlateauStop("global", patience=30)
    resumed.load_state_dict(stop.state_dict())
    assert resumed.history == stop.history and resumed.best() == (10, 2.0)
    assert _run_with_losses([2.0] * 30, resumed).state.iteration == 30  # never fell: no plateau


@pytest.mark.parametrize("decay, expected", [("none", [0, 0.25, 0.5, 0.75, 1, 1, 1, 1, 1, 1]),
                                             ("cosine", [0, 0.25, 0.5, 0.75, 1, 0.933, 0.75, 0.5, 0.25, 0.067])])
def test_global_learning_rate_follows_the_warm_up_and_decay_of_pretrain_yaml(decay, expected):
    """pretrain.yaml's schedule, stepped once per iteration: linear warm-up from 0 over warmup_iterations, then
    constant (lr_decay none) or a half cosine that reaches 0 at max_iterations."""
    parser = ConfigParser()
    parser.read_config([os.path.join(CONFIGS, "train.yaml"), os.path.join(CONFIGS, "pretrain.yaml")])
    parser.update({"global#learning_rate": 0.002, "global#warmup_iterations": 4, "global#max_iterations": 10,
                   "global#lr_decay": decay, "device": "cpu"})
    optimizer, schedule = parser.get_parsed_content("global#optimizer"), parser.get_parsed_content("global#lr_schedule")
    rates = []
    for _ in range(10):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert rates == pytest.approx([0.002 * f for f in expected], abs=1e-5)
