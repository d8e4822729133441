"""Self-training with pseudo-labels (overlay self_training.yaml, scripts/pseudo_labels.py), tiny network on CPU:
a plain fine-tuning labels the unlabelled pool (run id pseudo_label), the set carries its provenance, round 1
fine-tunes on labelled + pseudo-labelled volumes; a set from another model or data contract is refused in one line;
the loss leaves the ignored voxels out."""

from __future__ import annotations

import torch
from monai.losses import DiceCELoss

import conftest as br
from scripts.files import atomic_save, file_hash, safe_load
from scripts.pseudo_labels import IGNORE, IgnoreMaskedLoss


def _run(work, data, *args, run_id="run", expect=0):
    return br.run(work, "run", run_id, "--config_file", br.config("train.yaml", "self_training.yaml"), *data,
                  *br.paths(work, "st"), *br.TINY, *br.FINETUNE, "--use_pretrained", "False", *args, expect=expect)


def _one_error(result) -> str:
    errors = [line for line in result.stderr.splitlines() if line.startswith("ERROR: ")]
    assert result.returncode != 0 and len(errors) == 1, result.stderr[-3000:]
    return errors[0]


def test_pseudo_labels_round_and_refusals(tmp_path):
    data = br.prepare(tmp_path)
    models = tmp_path / "st" / "models"
    br.run(tmp_path, "run", "--config_file", br.config("train.yaml"), *data, *br.paths(tmp_path, "st"), *br.TINY,
           *br.FINETUNE, "--use_pretrained", "False")  # round 0: plain fine-tuning -> models/model.pt
    _run(tmp_path, data, "--pseudo_threshold", "0.6", run_id="pseudo_label")
    pseudo = safe_load(models / "round_1" / "pseudo_labels.pt")
    provenance = pseudo["provenance"]
    assert provenance["model_sha256"] == file_hash(models / "model.pt")
    assert provenance["threshold"] == 0.6 and provenance["mode"] == "voxel" and provenance["key"] == "pretrain"
    datalist = __import__("json").loads((tmp_path / "data" / "datalist.json").read_text())
    assert provenance["contract"] == datalist["contract"]
    labelled = {e["image"] for e in datalist["labelled_2_0"]}
    assert len(pseudo["volumes"]) == len(datalist["pretrain"]) - len(labelled) == provenance["kept"]
    labels = torch.cat([v["label"].flatten() for v in pseudo["volumes"]])
    assert (labels == IGNORE).any() and (labels < 4).any()  # some voxels below the threshold, some kept
    assert set(labels.unique().tolist()) <= {0, 1, 2, 3, IGNORE}
    _run(tmp_path, data, "--pseudo_threshold", "0.6")  # round 1 fine-tunes on labelled + pseudo-labelled volumes
    state = safe_load(models / "round_1" / "state_train.pt")
    assert state["record"]["pseudo_labels"]["model_sha256"] == provenance["model_sha256"]
    assert (models / "round_1" / "model.pt").exists()

    # another model: round 0's model.pt changed since the set was made
    original = safe_load(models / "model.pt")
    changed = {"model": {k: v + 1 if v.is_floating_point() else v for k, v in original["model"].items()},
               "contract": original["contract"]}
    atomic_save(changed, models / "model.pt")
    error = _one_error(_run(tmp_path, data, "--pseudo_threshold", "0.6", expect=None))
    assert "was made by another model" in error and "pseudo_labels.pt" in error
    atomic_save(original, models / "model.pt")

    # another data contract: a set recorded for 32 px slices
    pseudo["provenance"]["contract"] = dict(provenance["contract"], image_size=32)
    atomic_save(pseudo, models / "round_1" / "pseudo_labels.pt")
    error = _one_error(_run(tmp_path, data, "--pseudo_threshold", "0.6", expect=None))
    assert "was made for another data contract" in error and "image_size = 32" in error


def test_ignore_masked_loss_leaves_ignored_voxels_out():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 8, 8, requires_grad=True)
    label = torch.randint(0, 4, (2, 1, 8, 8)).float()
    expected = DiceCELoss(include_background=True, to_onehot_y=True, softmax=True)(logits, label)
    torch.testing.assert_close(IgnoreMaskedLoss()(logits, label), expected)
    label[:, :, :4] = IGNORE
    IgnoreMaskedLoss()(logits, label).backward()
    assert logits.grad[:, :, :4].abs().sum() == 0 and logits.grad[:, :, 4:].abs().sum() > 0
