"""The training state of a stage: its checkpoints, resuming it bit for bit, and the non-finite-loss guard.

- ``CheckpointSaver``: MONAI's handler, writing through ``scripts.files.atomic_save`` (MONAI's own writes in place)
  and never writing its final checkpoint when the stage stopped on a non-finite loss. Same arguments, same files.
- ``TrainingState``: a handler that saves what a stage needs to continue bit for bit every ``interval`` epochs
  (model, optimiser, trainer iteration/epoch, every rank's torch/numpy/python RNGs and the RandomState of the
  MONAI ``Randomizable`` transforms, the best validation metric and the best-model saver's record) and, with
  ``resume=True``, restores it when the trainer starts. It also drives the epoch of the ``set_epoch`` samplers.
- ``NonFiniteGuard``: a handler that stops the stage when the loss is NaN or infinite, naming the stage, the
  iteration and the last good training state (kept: the guard fires before the next save).

Granularity: the training state is saved at epoch boundaries (``iterations_per_epoch`` in fine-tuning,
``pretrain_epoch_length`` in pre-training); a stage killed mid-epoch resumes from the last completed saved epoch.
Writing files atomically, loading them safely and hashing them is ``scripts.files``.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from ignite.handlers import DiskSaver
from monai.handlers import CheckpointSaver as _MonaiCheckpointSaver
from monai.transforms import Randomizable

from scripts.distributed import rank_and_world_size
from scripts.errors import BundleError
from scripts.files import atomic_save, file_hash, safe_load

__all__ = [
    "CheckpointSaver",
    "TrainingState",
    "NonFiniteGuard",
    "NonFiniteLossError",
    "STATE_FORMAT",
    "find_randomizables",
    "plain_settings",
]

logger = logging.getLogger(__name__)

STATE_FORMAT = "contrastive-seg-training-state/1"  # the "format" entry of every training-state file


# ---------------------------------------------------------------- MONAI's CheckpointSaver, written atomically
class _AtomicDiskSaver(DiskSaver):
    """ignite ``DiskSaver`` writing through ``atomic_save`` (with fsync), optionally under a fixed file name."""

    def __init__(self, dirname: str, filename: str | None = None):
        super().__init__(dirname=dirname, require_empty=False, atomic=True)
        self.filename = filename

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        super().__call__(checkpoint, self.filename or filename, metadata)

    def _save_func(self, checkpoint: Mapping, path: Path, func) -> None:
        atomic_save(checkpoint, path)

    def remove(self, filename: str) -> None:
        path = Path(self.dirname) / (self.filename or filename)
        if self.save_on_rank == rank_and_world_size()[0] and path.exists():
            path.unlink()


class CheckpointSaver(_MonaiCheckpointSaver):
    """``monai.handlers.CheckpointSaver`` (same arguments, same files: ``save_dict`` is written as given, so extra
    entries beside "model" are kept) whose files are written atomically with fsync, by rank 0 only; and which does
    not write its final checkpoint when the stage stopped on a non-finite loss (the weights are no longer good)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for checkpoint in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if checkpoint is not None:
                fixed = getattr(checkpoint.save_handler, "filename", None)
                checkpoint.save_handler = _AtomicDiskSaver(self.save_dir, fixed)

    def exception_raised(self, engine: Engine, e: Exception) -> None:
        if isinstance(e, NonFiniteLossError):
            raise e
        super().exception_raised(engine, e)


# ---------------------------------------------------------------- RNG states as plain tensors and containers
def _numpy_state(rng: np.random.RandomState) -> dict:
    name, keys, pos, has_gauss, gauss = rng.get_state()
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "gauss": float(gauss)}


def _set_numpy_state(rng: np.random.RandomState, state: Mapping) -> None:
    keys = state["keys"].numpy().astype(np.uint32)
    rng.set_state((state["name"], keys, state["pos"], state["has_gauss"], state["gauss"]))


def find_randomizables(root) -> list[Randomizable]:
    """Every MONAI ``Randomizable`` reachable from ``root`` through attributes, lists, tuples and dicts, in a fixed
    order (depth first, attributes in definition order), each once. Tensors, arrays and modules are not entered."""
    found, seen = [], set()

    def walk(obj):
        if id(obj) in seen or isinstance(obj, (str, bytes, int, float, bool, type(None), torch.Tensor, np.ndarray,
                                               torch.nn.Module, type)):
            return
        seen.add(id(obj))
        if isinstance(obj, Randomizable):
            found.append(obj)
        if isinstance(obj, Mapping):
            children = list(obj.values())
        elif isinstance(obj, (list, tuple)):
            children = list(obj)
        else:
            children = list(getattr(obj, "__dict__", {}).values())
        for child in children:
            walk(child)

    walk(root)
    return found


def _rng_states(randomizables: Sequence[Randomizable]) -> dict:
    states = {
        "torch": torch.get_rng_state(),
        "numpy": _numpy_state(np.random.mtrand._rand),
        "python": random.getstate(),
        "transforms": [_numpy_state(t.R) for t in randomizables],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: Mapping, randomizables: Sequence[Randomizable]) -> None:
    torch.set_rng_state(states["torch"])
    _set_numpy_state(np.random.mtrand._rand, states["numpy"])
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    for transform, state in zip(randomizables, states["transforms"]):
        _set_numpy_state(transform.R, state)
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


# ---------------------------------------------------------------- training state: save every N epochs, resume
def plain_settings(settings: Mapping | None) -> dict | None:
    """``settings`` as plain JSON values (tuples become lists, other objects their ``str``), what a training state
    stores and compares."""
    return None if settings is None else json.loads(json.dumps(dict(settings), default=str))


class TrainingState:
    """Handler: save the training state of a stage every ``interval`` epochs, and resume from it.

    Args:
        path: the training-state file (e.g. ``models/state_global.pt``), separate from the model checkpoints.
        save_dict: objects with ``state_dict()`` / ``load_state_dict()`` to save, e.g. ``{"model": net,
            "optimizer": opt}``; a ``DistributedDataParallel`` wrapper is unwrapped. The trainer itself (iteration,
            epoch) is always saved, under "trainer".
        stage: the stage's name; a state file of another stage is refused.
        interval: save after every ``interval``-th epoch (and after the last one).
        resume: True: when the trainer starts, restore everything from ``path``. A missing file starts the stage
            from iteration 0 (with a warning: e.g. the local stage of ``pretrain`` when the kill hit the global
            one); a truncated, corrupt, unsafe or mismatched file stops with a ``BundleError`` naming it.
        randomizables: objects searched (``find_randomizables``) for MONAI random transforms whose RandomState is
            saved: the augmentation, or the dataset holding it.
        samplers: samplers with ``set_epoch``; their epoch is set to ``trainer epoch - 1`` when each epoch starts,
            so their draws are a function of the trainer's epoch (also when resumed).
        evaluator: the validation engine: its ``best_metric`` / ``best_metric_epoch`` are saved and restored.
        savers: ``CheckpointSaver`` s whose best-model record (scores and file names) is saved and restored, so
            that model selection after a resume compares with the best before it.
        record: the settings that determine the stage's result (resolved hyper-parameters, datalist file and key, the
            initialisation and its checkpoint's ``file_hash``, the data contract, the seed; not the epoch budget),
            stored in the state; on resume a state written with other values is refused, naming each difference.

    Under torch.distributed every rank takes part in each save (the RNG states of all ranks are gathered);
    rank 0 writes the file; on resume every rank reads it and takes its own RNG states. The world size must match,
    and the ranks compare what they found (file present, iteration, sha256) before any resumes: a rank that sees
    another file or none, or refuses it, stops every rank with the same one-line error.
    Attach it after the other handlers (it records the RNGs as they are when the epoch's handlers are done).
    ``engine.training_state_path`` is set to ``path`` (``NonFiniteGuard`` names it).

    Bit-for-bit resume (CPU, the same settings) holds when data loader workers are not persistent across epochs
    (``num_workers`` 0, or ``persistent_workers`` False): persistent workers carry RNG streams this file cannot hold,
    and their loader draws its workers' seed from the main RNG once, at the first epoch the process runs. The
    bundle's loaders are not persistent, and their workers only gather slices (augmentation runs on the batch).
    """

    def __init__(
        self,
        path: str,
        save_dict: Mapping,
        stage: str,
        interval: int = 1,
        resume: bool = False,
        randomizables=None,
        samplers: Sequence = (),
        evaluator: Engine | None = None,
        savers: Sequence = (),
        record: Mapping | None = None,
    ):
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"interval must be a positive int, got {interval!r}.")
        self.path, self.stage, self.interval, self.resume = str(path), str(stage), interval, bool(resume)
        self.save_dict = {k: getattr(v, "module", v) if isinstance(v, torch.nn.parallel.DistributedDataParallel)
                          else v for k, v in save_dict.items()}
        self.randomizables = find_randomizables(randomizables) if randomizables is not None else []
        self.samplers, self.evaluator = list(samplers), evaluator
        self.savers = [s._key_metric_checkpoint for s in savers if getattr(s, "_key_metric_checkpoint", None)]
        self.record = plain_settings(record)

    def attach(self, engine: Engine) -> None:
        engine.training_state_path = self.path
        if self.resume:
            engine.add_event_handler(Events.STARTED, self.load)
        if self.samplers:
            engine.add_event_handler(Events.EPOCH_STARTED, self._set_sampler_epoch)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)
        engine.add_event_handler(Events.COMPLETED, self._wait_for_rank0)

    @staticmethod
    def _wait_for_rank0(engine: Engine) -> None:
        """Under torch.distributed, the ranks leave the stage together: rank 0 writes the stage's final files
        (handlers attached before this one), which the next stage of the same run may read on every rank."""
        if rank_and_world_size()[1] > 1:
            dist.barrier()

    def _set_sampler_epoch(self, engine: Engine) -> None:
        for sampler in self.samplers:
            sampler.set_epoch(engine.state.epoch - 1)

    def _epoch_completed(self, engine: Engine) -> None:
        if engine.state.epoch % self.interval == 0 or engine.state.epoch >= engine.state.max_epochs:
            self.save(engine)

    def state_dict(self, engine: Engine) -> dict:
        """Everything saved, as plain tensors and containers (what ``weights_only=True`` loads)."""
        rng = _rng_states(self.randomizables)
        world = rank_and_world_size()[1]
        if world > 1:
            gathered = [None] * world
            dist.all_gather_object(gathered, rng)
            rng = gathered
        else:
            rng = [rng]
        state = {
            "format": STATE_FORMAT,
            "stage": self.stage,
            "world_size": world,
            "trainer": dict(engine.state_dict()),
            "objects": {k: v.state_dict() for k, v in self.save_dict.items()},
            "rng": rng,
            "savers": [s.state_dict() for s in self.savers],
        }
        if self.record is not None:
            state["record"] = self.record
        if self.evaluator is not None:
            state["best"] = {"metric": float(self.evaluator.state.best_metric),
                             "epoch": int(self.evaluator.state.best_metric_epoch)}
        return state

    def save(self, engine: Engine) -> None:
        """Write the state (rank 0) atomically; every rank must call it (the RNG states are gathered)."""
        state = self.state_dict(engine)
        rank, world = rank_and_world_size()
        if rank == 0:
            atomic_save(state, self.path)
            logger.info(f"{self.stage}: training state at epoch {engine.state.epoch} saved to {self.path}")
        if world > 1:
            dist.barrier()

    def load(self, engine: Engine) -> None:
        """Restore the state from ``path`` into the objects and ``engine`` (an ``Events.STARTED`` handler)."""
        found, state, problem = os.path.isfile(self.path), None, None
        if found:
            try:
                state = safe_load(self.path, what="training state")
                self._check(state, engine)
            except BundleError as error:
                problem = str(error)
        self._agree(found, state, problem)
        if not found:
            logger.warning(f"{self.stage}: resume requested but {self.path} does not exist: starting from iteration 0.")
            return
        for key, obj in self.save_dict.items():
            try:
                obj.load_state_dict(state["objects"][key])
            except (RuntimeError, ValueError, KeyError) as error:
                reason = str(error).strip().splitlines()
                reason = " ".join(line.strip() for line in reason[:3])[:300]
                raise BundleError(
                    f"training state {self.path}: its '{key}' does not fit this run's ({reason}); the configuration "
                    "(network, optimiser) changed since it was saved: restore it, or delete the file and start again."
                ) from error
        for saver, saved in zip(self.savers, state["savers"]):
            saver.load_state_dict(saved)
        if self.evaluator is not None and "best" in state:
            self.evaluator.state.best_metric = state["best"]["metric"]
            self.evaluator.state.best_metric_epoch = state["best"]["epoch"]
        max_epochs = engine.state.max_epochs
        engine.load_state_dict(state["trainer"])
        engine.state.max_epochs = max_epochs  # this run's budget (it may extend the saved one)
        _set_rng_states(state["rng"][rank_and_world_size()[0]], self.randomizables)
        logger.info(f"{self.stage}: resumed from {self.path} at epoch {engine.state.epoch} "
                    f"(iteration {engine.state.iteration}) of {max_epochs}.")

    def _agree(self, found: bool, state, problem: str | None) -> None:
        """Raise ``problem`` (a ``BundleError`` message) on every rank when any rank has one, or when the ranks did
        not find the same state (present, iteration, sha256); a no-op in a single process without a problem."""
        mine = {"found": found, "problem": problem, "hash": file_hash(self.path) if found else None,
                "iteration": state["trainer"].get("iteration") if problem is None and state is not None else None}
        everyone = [mine]
        world = rank_and_world_size()[1]
        if world > 1:
            everyone = [None] * world
            dist.all_gather_object(everyone, mine)
        refused = [(rank, view["problem"]) for rank, view in enumerate(everyone) if view["problem"]]
        if refused:
            rank, message = refused[0]
            raise BundleError(message if world == 1 else f"rank {rank}: {message}")
        views = {(v["found"], v["iteration"], v["hash"]) for v in everyone}
        if len(views) > 1:
            seen = "; ".join(
                f"rank {r}: " + (f"iteration {v['iteration']}, sha256 {v['hash'][:12]}" if v["found"] else "no file")
                for r, v in enumerate(everyone)
            )
            raise BundleError(f"training state {self.path}: the ranks do not see the same file ({seen}); every "
                              "process must read the same model_dir (a shared file system) to resume.")

    def _check(self, state, engine: Engine) -> None:
        def refuse(problem: str):
            raise BundleError(f"training state {self.path}: {problem}; delete it to start the stage again.")

        found = state.get("format") if isinstance(state, Mapping) else type(state).__name__
        if found != STATE_FORMAT:
            refuse(f"not a training-state file of this bundle (format {found!r}, expected {STATE_FORMAT!r})")
        missing = [k for k in ("stage", "world_size", "trainer", "objects", "rng", "savers") if k not in state]
        if missing:
            refuse(f"entries {missing} are missing")
        if state["stage"] != self.stage:
            refuse(f"it belongs to stage '{state['stage']}', not '{self.stage}'")
        world = rank_and_world_size()[1]
        if state["world_size"] != world:
            refuse(f"it was written by {state['world_size']} process(es), this run has {world}; resume with "
                   f"the same number of processes")
        absent = sorted(set(self.save_dict) - set(state["objects"]))
        if absent:
            refuse(f"it holds no {absent}")
        saver_mismatch = self.savers and len(state["savers"]) != len(self.savers)  # ranks > 0 have no saver
        if saver_mismatch or len(state["rng"][0]["transforms"]) != len(self.randomizables):
            refuse("its best-model record or random transforms do not match this configuration")
        saved_length = state["trainer"].get("epoch_length")
        if engine.state.epoch_length is not None and saved_length != engine.state.epoch_length:
            refuse(f"its epochs have {saved_length} iterations, this run's have {engine.state.epoch_length}")
        if self.record is not None:
            saved = state.get("record")
            if saved is None:
                refuse("it records no run settings (written by an older version), so it cannot be checked against "
                       "this run")
            changed = [k for k in sorted(set(saved) | set(self.record)) if saved.get(k) != self.record.get(k)]
            if changed:
                listing = "; ".join(f"{k} = {_short(saved.get(k))} in the state, {_short(self.record.get(k))} now"
                                    for k in changed)
                refuse(f"it was written by another run ({listing}); resume with the same settings")
        epochs = state["trainer"]["iteration"] // max(1, saved_length or 1)
        if engine.state.max_epochs is not None and epochs > engine.state.max_epochs:
            refuse(f"it is at epoch {epochs}, beyond this run's max_epochs={engine.state.max_epochs}")


def _short(value) -> str:
    """A setting's value for a one-line message (long values cut)."""
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


# ---------------------------------------------------------------- non-finite loss guard
class NonFiniteLossError(BundleError):
    """The loss became NaN or infinite: the stage stopped (``NonFiniteGuard``)."""


def _loss(output) -> torch.Tensor | None:
    first = output[0] if isinstance(output, (list, tuple)) and output else output
    if isinstance(first, Mapping) and "loss" in first:
        return torch.as_tensor(first["loss"]).detach()
    return None


class NonFiniteGuard:
    """Handler: stop the stage when the loss of an iteration is NaN or infinite.

    Raises ``NonFiniteLossError`` naming the stage, the epoch and iteration, and the last good training state
    (``engine.training_state_path`` set by ``TrainingState``), which is kept: no state and no final checkpoint of
    ``scripts.checkpoints.CheckpointSaver`` is written after it. Under torch.distributed the ranks agree (one
    all-reduce of a flag per iteration), so all of them stop at the same iteration.

    Args:
        stage: the stage's name, for the message.
    """

    def __init__(self, stage: str):
        self.stage = str(stage)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        loss = _loss(engine.state.output)
        bad = loss is not None and not bool(torch.isfinite(loss).all())
        world = rank_and_world_size()[1]
        if world > 1:
            flag = torch.tensor([float(bad)], device=loss.device if loss is not None else "cpu")
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            bad = bool(flag.item())
        if not bad:
            return
        value = loss.flatten()[0].item() if loss is not None and loss.numel() else float("nan")
        where = getattr(engine, "training_state_path", None)
        if where and os.path.isfile(where):
            kept = f"the last good training state {where} is kept"
        else:
            kept = "no training state was saved before it"
        raise NonFiniteLossError(
            f"stage '{self.stage}': the loss is {value} at iteration {engine.state.iteration} (epoch "
            f"{engine.state.epoch}){' on some rank' if world > 1 else ''}; stopped, {kept}. Lower the "
            "learning rate or check the data, then rerun with --resume True to continue from that state."
        )
