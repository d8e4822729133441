"""The multi-GPU overlay on CPU: ``torchrun --nproc_per_node=2`` (gloo) runs pre-training (both stages) and
fine-tuning on the embedded data. Exactly one set of checkpoints and one log are written (rank 0); each rank's
pre-training batches come from its own shard of the volumes, disjoint from the other rank's in every epoch; the
2-process ``model.pt`` loads and evaluates with the ordinary single-process ``evaluate.yaml``; ``--resume True``
continues a stage under torchrun and ends with the weights, bit for bit, of an uninterrupted run."""

from __future__ import annotations

import csv
import os
import re
import shutil

import pytest
import torch

import conftest as br
from scripts.files import safe_load

WORLD = 2
RECORD = """# test overlay: every rank records (stage, epoch, volume) of each pre-training batch, then writes them down
seen: "$[]"
seen_file: "$@model_dir + '/../seen_rank%d.txt' % torch.distributed.get_rank()"
record_global: "$lambda e: @seen.extend(('global', e.state.epoch, v) for v in e.state.batch['volume'].tolist())"
record_local: "$lambda e: @seen.extend(('local', e.state.epoch, v) for v in e.state.batch['volume'].tolist())"
pretrain_recorded:
  - "$@global#trainer.add_event_handler(ignite.engine.Events.ITERATION_COMPLETED, @record_global)"
  - "$@global#trainer.run()"
  - "$@local#trainer.add_event_handler(ignite.engine.Events.ITERATION_COMPLETED, @record_local)"
  - "$@local#trainer.run()"
  - "$open(@seen_file, 'w').write(repr(@seen))"
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory, prepared_data):
    work = tmp_path_factory.mktemp("multi_gpu")
    data = prepared_data
    (work / "record.yaml").write_text(RECORD)
    out = br.paths(work, "ddp")
    logs = {}
    logs["pretrain"] = br.run(work, "run", "pretrain_recorded", "--config_file",
                              br.config("train.yaml", "pretrain.yaml", "multi_gpu_train.yaml", work / "record.yaml"),
                              *data, *out, *br.TINY, *br.PRETRAIN, torchrun=WORLD)
    logs["train"] = br.run(work, "run", "--config_file", br.config("train.yaml", "multi_gpu_train.yaml"), *data, *out,
                           *br.TINY, "--max_epochs", "2", "--iterations_per_epoch", "2", "--batch_size", "4",
                           torchrun=WORLD)
    return work, data, out, logs


def test_one_set_of_checkpoints_and_one_log(runs):
    work, _, _, _ = runs
    models = work / "ddp" / "models"
    assert sorted(os.listdir(models)) == ["model.pt", "pretrained_global.pt", "pretrained_local.pt",
                                          "state_global.pt", "state_local.pt", "state_train.pt"]
    for log_dir in ("", "pretrain_global", "pretrain_local"):  # fine-tuning (training + validation), the 2 stages
        events = sorted((work / "ddp" / "eval" / log_dir).glob("events.out.tfevents.*"))
        writers = {re.match(r"events\.out\.tfevents\.\d+\.[^.]+\.(\d+)\.", e.name).group(1) for e in events}
        assert len(writers) == 1 and len(events) == (2 if log_dir == "" else 1), events  # one process wrote them
    for name in ("pretrained_global.pt", "pretrained_local.pt", "model.pt"):  # U-Net state_dicts + the data contract
        saved = safe_load(models / name)
        state = saved["model"]
        assert "encoder.0.0.weight" in state and not any(k.startswith("module.") for k in state)
        assert saved["contract"]["class_names"][0] == "background"
    state = safe_load(models / "state_global.pt")
    assert state["world_size"] == WORLD and len(state["rng"]) == WORLD and state["trainer"]["iteration"] == 6


def test_each_rank_draws_from_its_own_shard_of_the_volumes(runs):
    work, _, _, _ = runs
    seen = [eval((work / "ddp" / f"seen_rank{r}.txt").read_text()) for r in range(WORLD)]
    # 2 stages x 3 epochs x 2 iterations x (2 volumes x 4 partitions) slices per batch
    assert [len(s) for s in seen] == [2 * 3 * 2 * 8] * WORLD
    for stage in ("global", "local"):
        for epoch in (1, 2, 3):
            shards = [{v for st, e, v in s if st == stage and e == epoch} for s in seen]
            assert shards[0] and shards[1] and not shards[0] & shards[1], (stage, epoch, shards)
            assert shards[0] | shards[1] == {0, 1, 2, 3}  # together: the 4 pre-training volumes


def test_two_process_model_evaluates_with_the_single_process_config(runs):
    work, data, out, logs = runs
    assert "val_mean_dice" in logs["train"].stdout + logs["train"].stderr
    br.run(work, "run", "--config_file", br.config("train.yaml", "evaluate.yaml"), *data, *out, *br.TINY)
    with open(work / "ddp" / "eval" / "test" / "test_mean_dice_raw.csv") as f:
        rows = list(csv.DictReader(f))
    names = ("right ventricle", "myocardium", "left ventricle")   # columns named by the data contract
    assert len(rows) == 1 and all(0.0 <= float(rows[0][c]) <= 1.0 for c in names)


KILL = """# test overlay: every rank SIGKILLs itself when fine-tuning iteration 5 (the first of epoch 3) starts
at: "$ignite.engine.Events.ITERATION_STARTED(once=5)"
kill_train:
  - "$@train#trainer.add_event_handler(@at, lambda engine: os.kill(os.getpid(), 9))"
  - "$@train#trainer.run()"
"""


def test_resume_under_torchrun_equals_an_uninterrupted_run(runs):
    """A 3-epoch fine-tuning under torchrun killed when epoch 3 starts, then resumed with ``--resume True``, ends with
    the weights and optimiser state, bit for bit, of the same run never interrupted (same pre-trained weights)."""
    work, data, _, _ = runs
    (work / "kill.yaml").write_text(KILL)
    fine_tune = [*data, *br.TINY, "--max_epochs", "3", "--iterations_per_epoch", "2", "--batch_size", "4"]
    states = {}
    for name in ("killed", "whole"):
        (work / name / "models").mkdir(parents=True)
        shutil.copy(work / "ddp" / "models" / "pretrained_local.pt", work / name / "models")
    killer = br.config("train.yaml", "multi_gpu_train.yaml", work / "kill.yaml")
    br.run(work, "run", "kill_train", "--config_file", killer,
           *fine_tune, *br.paths(work, "killed"), torchrun=WORLD, expect=None)
    assert safe_load(work / "killed" / "models" / "state_train.pt")["trainer"]["iteration"] == 4  # epoch 2's state
    result = br.run(work, "run", "--config_file", br.config("train.yaml", "multi_gpu_train.yaml"), *fine_tune,
                    *br.paths(work, "killed"), "--resume", "True", torchrun=WORLD)
    log = result.stdout + result.stderr
    assert log.count("fine-tune: resumed from") == WORLD and "at epoch 2 (iteration 4) of 3" in log
    br.run(work, "run", "--config_file", br.config("train.yaml", "multi_gpu_train.yaml"), *fine_tune,
           *br.paths(work, "whole"), torchrun=WORLD)
    for name in ("killed", "whole"):
        states[name] = safe_load(work / name / "models" / "state_train.pt")
        assert states[name]["trainer"]["iteration"] == 6
    for name in ("model", "optimizer"):
        assert same_values(states["killed"]["objects"][name], states["whole"]["objects"][name]), name


def same_values(a, b) -> bool:
    """Nested dicts / lists of tensors and numbers equal, tensors bit for bit."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_values(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(same_values, a, b))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    return a == b
