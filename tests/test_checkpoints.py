"""Checkpoints that stay whole and safe, resume after SIGKILL, and the non-finite-loss guard.

Unit level: atomic writes survive an exception or a kill mid-write; safe loading refuses code-running pickles,
truncated, empty and missing files with a one-line message naming the file; a mismatched training state is refused;
the guard stops on NaN, names stage and iteration, and keeps the last good state.
Workflow level (``python -m monai.bundle run``, tiny network, CPU): a pre-training run killed with SIGKILL part-way
and resumed with ``--resume True`` ends with the same weights, bit for bit, as an uninterrupted run; the same for
fine-tuning, including which epoch is selected as the best model; an injected NaN stops the stage.
"""

from __future__ import annotations

import os
import pickle
import re
import subprocess
import sys

import pytest
import torch
from ignite.engine import Engine

import conftest as br
from scripts.checkpoints import CheckpointSaver, NonFiniteGuard, NonFiniteLossError, TrainingState
from scripts.errors import BundleError, MissingFileError
from scripts.files import atomic_save, safe_load


# ---------------------------------------------------------------- atomic writes
def test_atomic_save_round_trip_and_no_leftovers(tmp_path):
    path = tmp_path / "state.pt"
    atomic_save({"w": torch.arange(5)}, path)
    assert torch.equal(safe_load(path)["w"], torch.arange(5))
    assert os.listdir(tmp_path) == ["state.pt"]
    assert oct(os.stat(path).st_mode & 0o777) == oct(0o644)


def test_exception_during_write_leaves_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "state.pt"
    atomic_save({"w": torch.ones(3)}, path)
    before = path.read_bytes()

    def half_then_crash(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", half_then_crash)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"w": torch.zeros(3)}, path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["state.pt"]
    monkeypatch.undo()
    assert torch.equal(safe_load(path)["w"], torch.ones(3))


def test_sigkill_during_write_leaves_previous_checkpoint(tmp_path):
    path = tmp_path / "state.pt"
    atomic_save({"w": torch.ones(3)}, path)
    script = (
        "import os, signal, torch\n"
        "from scripts.files import atomic_save\n"
        "def killed(obj, f, *a, **k):\n"
        "    f.write(b'PK partial bytes'); f.flush(); os.kill(os.getpid(), signal.SIGKILL)\n"
        "torch.save = killed\n"
        f"atomic_save({{'w': torch.zeros(3)}}, {str(path)!r})\n"
    )
    env = dict(os.environ, PYTHONPATH=str(br.ROOT / "bundle"))
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=60)
    assert result.returncode == -9, result.stderr.decode()[-2000:]
    assert torch.equal(safe_load(path)["w"], torch.ones(3))  # the previous checkpoint, whole
    leftovers = [n for n in os.listdir(tmp_path) if n != "state.pt"]
    assert leftovers and all(n.startswith(".state.pt.") for n in leftovers)  # only the temporary file is partial


# ---------------------------------------------------------------- safe loading
class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("container", ["torch", "raw pickle", "raw pickle 4"])
def test_a_pickle_that_would_run_code_is_refused(tmp_path, container):
    marker, path = tmp_path / "pwned", tmp_path / "evil.pt"
    if container == "torch":
        torch.save({"model": {"w": torch.ones(1)}, "payload": _RunsCode(marker)}, path)
    else:
        path.write_bytes(pickle.dumps(_RunsCode(marker), protocol=4 if container.endswith("4") else 2))
    with pytest.raises(BundleError) as error:
        safe_load(path, what="training state")
    message = str(error.value)
    assert str(path) in message and "refused" in message and "\n" not in message
    assert container.endswith("4") or "system" in message  # names what it asked for (protocol 4: refused earlier)
    assert not marker.exists()


def test_truncated_empty_and_missing_files_are_refused_with_the_file_named(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"w": torch.randn(1000)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match=r"model\.pt is truncated or corrupt"):
        safe_load(path)
    path.write_bytes(b"")
    with pytest.raises(BundleError, match=r"model\.pt is empty"):
        safe_load(path)
    path.write_bytes(b"not a checkpoint at all" * 10)
    with pytest.raises(BundleError, match=r"model\.pt"):
        safe_load(path)
    with pytest.raises(MissingFileError, match=r"absent\.pt not found"):
        safe_load(tmp_path / "absent.pt")


# ---------------------------------------------------------------- training state and guard on a toy engine
def _toy(tmp_path, stage="toy", resume=False, width=3, nan_at=None, max_epochs=3):
    torch.manual_seed(0)
    net = torch.nn.Linear(width, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)

    def step(engine, batch):
        x = torch.randn(4, width)  # draws from the global RNG: resume must restore it
        loss = net(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if nan_at is not None and engine.state.iteration == nan_at:
            loss = loss * float("nan")
        return {"loss": loss.detach()}

    engine = Engine(step)
    state = TrainingState(str(tmp_path / "state_toy.pt"), {"model": net, "optimizer": opt}, stage=stage,
                          resume=resume)
    NonFiniteGuard(stage).attach(engine)
    state.attach(engine)
    return engine, net, max_epochs


def test_training_state_resumes_bit_for_bit_and_refuses_mismatches(tmp_path):
    reference, net_ref, epochs = _toy(tmp_path / "a")
    reference.run(range(2), max_epochs=epochs)

    first, _, _ = _toy(tmp_path / "b")
    first.run(range(2), max_epochs=1)  # stops after epoch 1 (state saved)
    resumed, net, _ = _toy(tmp_path / "b", resume=True)
    resumed.run(range(2), max_epochs=epochs)
    assert resumed.state.iteration == 6
    assert all(torch.equal(a, b) for a, b in zip(net_ref.state_dict().values(), net.state_dict().values()))

    other, _, _ = _toy(tmp_path / "b", stage="other", resume=True)
    with pytest.raises(BundleError, match=r"state_toy\.pt: it belongs to stage 'toy', not 'other'"):
        other.run(range(2), max_epochs=epochs)
    wider, _, _ = _toy(tmp_path / "b", width=5, resume=True)
    with pytest.raises(BundleError, match=r"state_toy\.pt: its 'model' does not fit"):
        wider.run(range(2), max_epochs=epochs)
    shorter, _, _ = _toy(tmp_path / "b", resume=True)
    with pytest.raises(BundleError, match="beyond this run's max_epochs=2"):
        shorter.run(range(2), max_epochs=2)


def test_non_finite_guard_stops_and_keeps_the_last_good_state(tmp_path):
    engine, _, _ = _toy(tmp_path, nan_at=5)
    with pytest.raises(NonFiniteLossError) as error:
        engine.run(range(2), max_epochs=4)
    message = str(error.value)
    assert "stage 'toy'" in message and "iteration 5" in message and "(epoch 3)" in message
    assert f"last good training state {tmp_path / 'state_toy.pt'} is kept" in message
    saved = safe_load(tmp_path / "state_toy.pt")
    assert saved["trainer"]["iteration"] == 4  # epoch 2, before the NaN


def test_checkpoint_saver_writes_no_final_model_after_a_non_finite_loss(tmp_path):
    engine, net, _ = _toy(tmp_path, nan_at=3)
    CheckpointSaver(str(tmp_path), {"model": net}, save_final=True, final_filename="final.pt").attach(engine)
    with pytest.raises(NonFiniteLossError):
        engine.run(range(2), max_epochs=2)
    assert not (tmp_path / "final.pt").exists()
    done, net, _ = _toy(tmp_path / "ok")
    CheckpointSaver(str(tmp_path / "ok"), {"model": net}, save_final=True, final_filename="final.pt").attach(done)
    done.run(range(2), max_epochs=1)
    assert "weight" in safe_load(tmp_path / "ok" / "final.pt")  # a plain state_dict, as MONAI writes it


# ---------------------------------------------------------------- workflows: SIGKILL part-way, resume, compare
KILL = """# test overlay: when iteration `kill_iteration` of a stage starts, SIGKILL the process or poison the weights
kill_iteration: 3
at: "$ignite.engine.Events.ITERATION_STARTED(once=@kill_iteration)"
sigkill: "$lambda engine: os.kill(os.getpid(), 9)"
poison: "$lambda engine: torch.nn.init.constant_(@global#network.unet.encoder[0][0].weight, float('nan'))"
kill_global: ["$@global#trainer.add_event_handler(@at, @sigkill)", "$@global#trainer.run()"]
kill_train: ["$@train#trainer.add_event_handler(@at, @sigkill)", "$@train#trainer.run()"]
nan_global: ["$@global#trainer.add_event_handler(@at, @poison)", "$@global#trainer.run()"]
"""


@pytest.fixture(scope="module")
def work(tmp_path_factory, prepared_data):
    work = tmp_path_factory.mktemp("resume")
    data = prepared_data
    (work / "kill.yaml").write_text(KILL)
    return work, data


def _same(a, b):
    """Same weights, bit for bit, and the same data contract."""
    a, b = safe_load(a), safe_load(b)
    weights_a, weights_b = a["model"], b["model"]
    same_weights = weights_a.keys() == weights_b.keys()
    same_weights = same_weights and all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    return same_weights and a["contract"] == b["contract"]


def _losses(text, tag):
    return re.findall(rf"{tag}: ([0-9.eE+-]+)", text)


def test_pretraining_killed_and_resumed_equals_uninterrupted_bit_for_bit(work):
    work, data = work
    configs = br.config("train.yaml", "pretrain.yaml")
    whole = br.run(work, "run", "pretrain", "--config_file", configs, *data, *br.paths(work, "whole"), *br.TINY,
                   *br.PRETRAIN)
    kill_configs = br.config("train.yaml", "pretrain.yaml", work / "kill.yaml")
    killed = br.run(work, "run", "kill_global", "--config_file", kill_configs, *data, *br.paths(work, "killed"),
                    *br.TINY, *br.PRETRAIN, expect=-9)
    models = work / "killed" / "models"
    assert sorted(os.listdir(models)) == ["state_global.pt"]  # killed in epoch 2: only the epoch-1 state exists
    assert safe_load(models / "state_global.pt")["trainer"]["iteration"] == 2
    # determinism (CPU, same seed): the first logged loss is the same in both runs
    first_killed = _losses(killed.stdout + killed.stderr, "global_loss")[:1]
    assert first_killed == _losses(whole.stdout + whole.stderr, "global_loss")[:1] != []
    resumed = br.run(work, "run", "pretrain", "--config_file", configs, *data, *br.paths(work, "killed"), *br.TINY,
                     *br.PRETRAIN, "--resume", "True")
    log = resumed.stdout + resumed.stderr
    assert "global: resumed from" in log and "at epoch 1 (iteration 2)" in log
    for name in ("pretrained_global.pt", "pretrained_local.pt"):
        assert _same(work / "whole" / "models" / name, models / name), name


def test_fine_tuning_killed_and_resumed_selects_the_same_best_model(work):
    work, data = work
    # the test is sensitive only if the last epoch is not the best one: then a resume that forgot the best-model
    # record would overwrite model.pt with the last epoch's weights; take the first seed where that is so
    for seed in range(4):
        pretrained = ["--use_pretrained", "False", "--seed", str(seed)]
        whole = br.run(work, "run", "--config_file", br.config("train.yaml"), *data, *br.paths(work, "ft_whole"),
                       *br.TINY, *br.FINETUNE, *pretrained)
        best = safe_load(work / "ft_whole" / "models" / "state_train.pt")["best"]
        if best["epoch"] < 4:
            break
    else:
        pytest.fail("seeds 0-3 all select the last epoch: this test cannot tell a resume that forgot the best model")
    assert "val_mean_dice" in whole.stdout + whole.stderr
    br.run(work, "run", "kill_train", "--config_file", br.config("train.yaml", work / "kill.yaml"), *data,
           *br.paths(work, "ft_killed"), *br.TINY, *br.FINETUNE, *pretrained, "--kill_iteration", "7", expect=-9)
    models = work / "ft_killed" / "models"
    assert safe_load(models / "state_train.pt")["trainer"]["iteration"] == 6
    br.run(work, "run", "--config_file", br.config("train.yaml"), *data, *br.paths(work, "ft_killed"), *br.TINY,
           *br.FINETUNE, *pretrained, "--resume", "True")
    assert _same(work / "ft_whole" / "models" / "model.pt", models / "model.pt")
    assert safe_load(models / "state_train.pt")["best"] == best
    final_whole = safe_load(work / "ft_whole" / "models" / "state_train.pt")["objects"]["model"]
    final_resumed = safe_load(models / "state_train.pt")["objects"]["model"]
    assert all(torch.equal(final_whole[k], final_resumed[k]) for k in final_whole)


def test_injected_nan_stops_the_stage_and_keeps_the_last_good_state(work):
    work, data = work
    result = br.run(work, "run", "nan_global", "--config_file", br.config("train.yaml", "pretrain.yaml",
                    work / "kill.yaml"), *data, *br.paths(work, "nan"), *br.TINY, *br.PRETRAIN, expect=None)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("ERROR: ")]  # the one-line report
    assert len(errors) == 1
    last = errors[0]
    assert last.startswith("ERROR: stage 'global': the loss is nan at iteration 3 (epoch 2)"), last
    models = work / "nan" / "models"
    assert f"last good training state {models / 'state_global.pt'} is kept" in last
    state = safe_load(models / "state_global.pt")
    assert state["trainer"]["iteration"] == 2
    assert all(torch.isfinite(v).all() for v in state["objects"]["model"].values() if v.is_floating_point())
    assert not (models / "pretrained_global.pt").exists()  # no final checkpoint from NaN weights
