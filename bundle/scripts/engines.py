"""Glue that lets MONAI's ``SupervisedTrainer`` run the fine-tuning and contrastive pre-training steps unchanged.

The trainer's default iteration computes ``loss(network(inputs), targets)``. For fine-tuning, ``AugmentedBatch`` is
its ``prepare_batch``: the batch's slices and labels augmented together on the device. For pre-training,
``ContrastiveViews`` is its ``prepare_batch``: it turns a batch of B slices into V augmented views (V*B images, on
the device) and a metadata dict as the "targets"; ``MetadataLoss`` calls a contrastive loss with that metadata.
AMP, gradient accumulation, events and handlers all come from the trainer.
"""

from __future__ import annotations

import inspect
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence

import ignite.distributed as idist
import torch
from ignite.engine import Events
from monai.handlers import MetricsSaver, write_metrics_reports
from monai.utils import string_list_all_gather
from torch import nn

from scripts.errors import BundleError
from scripts.files import atomic_copy, atomic_write_json

logger = logging.getLogger(__name__)

METADATA_KEYS = ("volume", "partition", "sample", "position")


class ContrastiveViews:
    """``prepare_batch`` for pre-training.

    Args:
        augment: a callable on a batch tensor (B, C, H, W) -> (B, C, H, W) with independent random draws per slice.
        num_views: V, augmented views per slice (the paper: 2).
        channels_last: return the views in channels_last memory format (faster convolutions on GPU).

    Call: ``(batchdata, device, non_blocking) -> (views (V*B, C, H, W), metadata)`` where ``metadata`` holds
    "volume", "partition", "position" repeated per view and "sample" = the slice's index within this batch, so the
    V views of one slice share it (view-major order: all first views, then all second views, ...).
    """

    def __init__(self, augment: Callable[[torch.Tensor], torch.Tensor], num_views: int = 2,
                 channels_last: bool = False):
        if num_views < 1:
            raise ValueError(f"num_views must be >= 1, got {num_views}.")
        self.augment, self.num_views, self.channels_last = augment, num_views, channels_last

    def __call__(self, batchdata: dict, device: torch.device | str | None = None, non_blocking: bool = False, **_):
        images = torch.as_tensor(batchdata["image"]).to(device=device, non_blocking=non_blocking)
        views = torch.cat([self.augment(images) for _ in range(self.num_views)])
        if self.channels_last:
            views = views.contiguous(memory_format=torch.channels_last)
        metadata = {
            key: torch.as_tensor(batchdata[key]).to(device=device, non_blocking=non_blocking).repeat(self.num_views)
            for key in ("volume", "partition", "position")
        }
        metadata["sample"] = torch.arange(images.shape[0], device=images.device).repeat(self.num_views)
        return views, metadata


class AugmentedBatch:
    """``prepare_batch`` for fine-tuning: the batch moved to the device, then augmented there.

    Args:
        augment: dict of batch tensors -> dict, e.g. ``Compose([RandSpatialAugmentd(["image", "label"])])``.
        keys: the (input, target) entries of the batch.

    Call: ``(batchdata, device, non_blocking) -> (image (B, C, H, W), label (B, 1, H, W))``, augmented together.
    """

    def __init__(self, augment: Callable[[dict], dict], keys: Sequence[str] = ("image", "label")):
        self.augment, self.keys = augment, tuple(keys)

    def __call__(self, batchdata: dict, device: torch.device | str | None = None, non_blocking: bool = False, **_):
        data = {k: torch.as_tensor(batchdata[k]).to(device=device, non_blocking=non_blocking) for k in self.keys}
        data = self.augment(data)
        return data[self.keys[0]], data[self.keys[1]]


class MetadataLoss(nn.Module):
    """Calls ``loss(pred, **metadata)`` for the metadata keys ``loss.forward`` accepts.

    The trainer calls it as ``loss(pred, target)``, where ``target`` is the batch's metadata dict.
    """

    def __init__(self, loss: nn.Module):
        super().__init__()
        self.loss = loss
        accepted = inspect.signature(loss.forward).parameters
        self.keys = tuple(k for k in METADATA_KEYS if k in accepted)

    def forward(self, pred: torch.Tensor, metadata: dict) -> torch.Tensor:
        return self.loss(pred, **{k: metadata[k] for k in self.keys})


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    """Parameters with ``requires_grad`` (e.g. everything but the frozen encoder in the local stage)."""
    return [p for p in module.parameters() if p.requires_grad]


def polynomial_decay(optimizer: torch.optim.Optimizer, total_iters: int,
                     power: float) -> torch.optim.lr_scheduler.PolynomialLR:
    """torch's ``PolynomialLR``, stepped once per iteration: the learning rate x (1 - step / ``total_iters``)^``power``,
    0 at ``total_iters``; ``power`` 0 leaves it unchanged. A negative ``power`` (train.yaml ``lr_decay_power``) is
    refused in one line before training: the rate would grow and divide by zero at the last step."""
    if not power >= 0:
        raise BundleError(f"lr_decay_power: {power} is negative; use 0 (a constant learning rate) or a positive power "
                          "(0.9: UniMatch's decay).")
    return torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=int(total_iters), power=float(power))


class WeightAverage:
    """An exponential moving average of a network's weights and BatchNorm statistics
    (``torch.optim.swa_utils.AveragedModel``): each ``update`` sets ``avg = decay x avg + (1 - decay) x w``, the first
    a copy; the trainer calls it after every iteration through an ``IterationCallback`` (train.yaml's handlers).
    ``network`` is what validation, model selection and ``model.pt`` use: the average, or, with ``decay`` 0 (off),
    ``source`` itself, nothing copied and ``update`` a no-op (today's fine-tuning).

    Args:
        source: the network the optimiser trains (unwrapped, not its ``DistributedDataParallel``).
        decay: the weight of the old average at each update, in [0, 1); 0: off.
    ``state_dict`` / ``load_state_dict`` carry the average across a resume (``TrainingState``'s save_dict); off,
    the state is empty.
    """

    def __init__(self, source: nn.Module, decay: float = 0.0):
        if not 0 <= decay < 1:
            raise BundleError(f"ema_decay: {decay} is outside [0, 1); use 0 (off) or e.g. 0.99 (the mean teacher's).")
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        self.source, self.decay = source, float(decay)
        self.averaged = (AveragedModel(source, multi_avg_fn=get_ema_multi_avg_fn(self.decay), use_buffers=True)
                         if self.decay > 0 else None)

    @property
    def network(self) -> nn.Module:
        return self.source if self.averaged is None else self.averaged.module

    def update(self, _engine=None) -> None:
        if self.averaged is not None:
            self.averaged.update_parameters(self.source)

    def state_dict(self) -> dict:
        return {} if self.averaged is None else self.averaged.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if self.averaged is not None:
            self.averaged.load_state_dict(state)
        elif state:
            raise ValueError("the state holds a weight average and ema_decay is 0")


class IterationCallback:
    """A handler that calls ``function(engine)`` after every iteration of the engine it is attached to: a handler
    list entry of its own (a mapping with ``_target_``: MONAI Label's property check reads every entry's) for an
    object defined elsewhere in the config, e.g. ``WeightAverage.update``."""

    def __init__(self, function: Callable):
        self.function = function

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.function)


def loss_value(output) -> float:
    """The ``"loss"`` of an engine output: a dict (``decollate=False``) or a list of decollated dicts."""
    loss = (output[0] if isinstance(output, (list, tuple)) else output)["loss"]
    return float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)


class LossProgressBar:
    """A MONAI-style handler: a tqdm bar over the iterations of each epoch, showing the current loss."""

    def __init__(self, desc: str = "train", mininterval: float = 2.0):
        from ignite.handlers import ProgressBar

        self.bar = ProgressBar(persist=True, desc=desc, ncols=100, mininterval=mininterval)

    def attach(self, engine) -> None:
        self.bar.attach(engine, output_transform=lambda output: {"loss": loss_value(output)})


class NamedMetricsSaver(MetricsSaver):
    """MONAI's ``MetricsSaver`` (same arguments, events and files) whose per-class columns and rows carry the class
    names (``class_names``, foreground classes in order) instead of ``class0, class1, ...``, and whose files are
    written atomically.

    ``MetricsSaver`` collects the image names; its call at the end of an evaluation is ours: it selects the metrics
    and metric details as MONAI's does and hands them to MONAI's public ``write_metrics_reports`` with
    ``class_labels`` (which ``MetricsSaver`` does not pass on, monai 1.6), into a temporary folder inside
    ``save_dir``; each file is then copied into place with ``atomic_copy``, so a reader never sees a half-written CSV.
    """

    def __init__(self, class_names: Sequence[str], **kwargs):
        super().__init__(**kwargs)
        self.class_names = [str(n) for n in class_names]

    @staticmethod
    def _chosen(values: dict, wanted: tuple | None) -> dict:
        """The entries of ``values`` named in ``wanted`` (all with "*"; none when ``wanted`` is None)."""
        return {} if wanted is None else {k: v for k, v in values.items() if k in wanted or "*" in wanted}

    def __call__(self, engine) -> None:
        world = idist.get_world_size()
        if self.save_rank >= world:
            raise ValueError(f"save_rank {self.save_rank} is not a rank of this run ({world} process(es)).")
        images = string_list_all_gather(strings=self._filenames) if world > 1 else self._filenames
        if idist.get_rank() != self.save_rank:
            return
        os.makedirs(self.save_dir, exist_ok=True)
        staging = tempfile.mkdtemp(dir=self.save_dir, prefix=".metrics-")
        try:
            write_metrics_reports(
                save_dir=staging, images=images or None, metrics=self._chosen(engine.state.metrics, self.metrics),
                metric_details=self._chosen(getattr(engine.state, "metric_details", {}), self.metric_details),
                summary_ops=self.summary_ops, deli=self.deli, output_type=self.output_type,
                class_labels=self.class_names)
            for name in sorted(os.listdir(staging)):
                atomic_copy(os.path.join(staging, name), os.path.join(self.save_dir, name))
        finally:
            shutil.rmtree(staging, ignore_errors=True)


class PlateauStop:
    """Handler: stop a pre-training stage once its running loss has stopped falling, and say when and why.

    The running loss is the mean loss of an epoch (``pretrain_epoch_length`` iterations; under torch.distributed the
    mean over every rank, so all ranks stop together). After each epoch the stage stops when ``enabled``, at least
    ``min_iterations`` have run, the best running loss has not fallen by ``min_delta`` times the first epoch's running
    loss for ``patience`` iterations ("plateau"; a fraction of the starting level, so that the rule means the same
    for a loss that ends near 0 as for one that ends high), and it did fall by that much at least once: a loss that
    has not left its starting level (the global loss can sit at its chance level for hundreds of iterations before it
    falls) is no plateau. Otherwise it runs to the trainer's ``max_epochs`` ("budget"), or, with ``schedule_end``
    (the learning rate decays to 0 at ``max_iterations``, e.g. ``lr_decay: cosine``), to the end of its schedule
    ("schedule": the planned end, where the optimiser can no longer move the weights). The rule judges only the
    running losses after ``start_iteration`` (pretrain.yaml: the end of the crop ramp, before which the task is still
    getting harder and the loss may rise); "first" above means the first of those.

    When the stage ends, the reason is logged and written (rank 0, atomically) to ``report`` as JSON:
    {"stage", "reason": "plateau" | "budget" | "schedule", "iteration", "loss" (last running loss), "best_loss",
    "best_iteration" (both null when no running loss was judged), "converged" (true: a plateau, or the budget reached
    after one; false: the budget reached while the loss was still falling or had never fallen, also logged as a
    warning; null: the rule is off, judged nothing, or the decay ended at "schedule"), "seconds", "history":
    [[iteration, running loss], ...]}.
    ``state_dict`` / ``load_state_dict`` carry the history across a resume (``TrainingState``'s save_dict).
    """

    def __init__(self, stage: str, enabled: bool = True, min_iterations: int = 0, patience: int = 300,
                 min_delta: float = 0.02, report: str | None = None, schedule_end: bool = False,
                 start_iteration: int = 0):
        if patience < 1 or min_delta < 0:
            raise ValueError(f"patience must be >= 1 and min_delta >= 0, got {patience} and {min_delta}.")
        self.stage, self.enabled, self.report, self.schedule_end = stage, bool(enabled), report, bool(schedule_end)
        self.min_iterations, self.patience, self.min_delta = int(min_iterations), int(patience), float(min_delta)
        self.start_iteration = int(start_iteration)
        self.history: list[list[float]] = []  # [iteration, running loss] after each epoch
        self.reason: str | None = None  # set when the stage starts, "plateau" when the rule stops it
        self._sum, self._count, self._started = 0.0, 0, 0.0

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.STARTED, self._start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._accumulate)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)
        engine.add_event_handler(Events.COMPLETED, self._completed)

    def state_dict(self) -> dict:
        return {"history": [list(h) for h in self.history]}

    def load_state_dict(self, state: dict) -> None:
        self.history = [list(h) for h in state["history"]]

    def _start(self, engine) -> None:
        self._started, self.reason = time.perf_counter(), "schedule" if self.schedule_end else "budget"

    def _accumulate(self, engine) -> None:
        self._sum += loss_value(engine.state.output)
        self._count += 1

    def _running_loss(self) -> float:
        total = torch.tensor([self._sum, float(self._count)], dtype=torch.float64)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            total = total.to("cuda" if torch.distributed.get_backend() == "nccl" else "cpu")
            torch.distributed.all_reduce(total)
        self._sum, self._count = 0.0, 0
        return float(total[0] / total[1].clamp(min=1))

    def judged(self) -> list[list[float]]:
        """The [iteration, running loss] entries the rule judges: those after ``start_iteration``."""
        return [h for h in self.history if h[0] > self.start_iteration]

    def best(self, judged: list[list[float]] | None = None) -> tuple[int, float]:
        """(iteration, running loss) of the lowest judged running loss so far (``judged``: ``self.judged()`` when
        not given), counting only falls of at least ``min_delta`` x the first judged running loss; (0, inf) before
        the first."""
        judged = self.judged() if judged is None else judged
        best_iteration, best_loss = 0, float("inf")
        step = self.min_delta * abs(judged[0][1]) if judged else 0.0
        for iteration, loss in judged:
            if loss <= best_loss - step or best_loss == float("inf"):
                best_iteration, best_loss = int(iteration), loss
        return best_iteration, best_loss

    @staticmethod
    def _has_fallen(judged: list[list[float]], best_iteration: int) -> bool:
        """Whether the best judged running loss (``best``) came after the first judged one: the loss has fallen."""
        return bool(judged) and best_iteration > judged[0][0]

    def _epoch_completed(self, engine) -> None:
        iteration = engine.state.iteration
        self.history.append([iteration, self._running_loss()])
        judged = self.judged()
        best_iteration, _ = self.best(judged)
        has_fallen = self._has_fallen(judged, best_iteration)
        waited = iteration - best_iteration >= self.patience
        if self.enabled and has_fallen and waited and iteration >= self.min_iterations:
            self.reason = "plateau"
            engine.terminate()

    def _completed(self, engine) -> None:
        from scripts.distributed import rank_and_world_size

        iteration, loss = self.history[-1] if self.history else (engine.state.iteration, float("nan"))
        judged = self.judged()
        best_iteration, best_loss = self.best(judged) if judged else (None, None)
        converged = None  # True / False where the running losses tell; None otherwise (no rule, no losses, schedule)
        if self.reason == "plateau":
            converged = True
            why = (f"plateau: the running loss has not fallen by {100 * self.min_delta:g}% of its first value since "
                   f"iteration {best_iteration} ({best_loss:.3f}), for {iteration - best_iteration} iterations")
        elif not judged:  # ended within the crop ramp (or the first epoch): no running loss was judged
            why = (f"{self.reason}: max_iterations reached before the plateau rule judged a running loss (it judges "
                   f"those after iteration {self.start_iteration})")
        elif self.reason == "schedule":
            why = (f"schedule: max_iterations reached, where the learning rate has decayed to 0 (best running loss "
                   f"{best_loss:.3f} at iteration {best_iteration})")
        elif not self.enabled:
            why = "budget: max_iterations reached; the plateau rule is off"
        elif not self._has_fallen(judged, best_iteration):  # e.g. the global loss stuck at its chance level
            why = (f"budget: max_iterations reached, and the running loss never fell by {100 * self.min_delta:g}% "
                   f"of its first judged value ({best_loss:.3f} at iteration {best_iteration}): the stage has not "
                   f"left its starting level, not converged")
            converged = False
        elif iteration - best_iteration < self.patience:
            why = (f"budget: max_iterations reached while the running loss was still falling (best {best_loss:.3f} "
                   f"at iteration {best_iteration}): not converged")
            converged = False
        else:
            why = "budget: max_iterations reached"
            converged = True
        log = logger.warning if converged is False else logger.info
        log(f"pretrain-{self.stage}: stopped at iteration {int(iteration)}, running loss {loss:.3f} ({why})")
        if self.report and rank_and_world_size()[0] == 0:
            atomic_write_json({
                "stage": self.stage, "reason": self.reason, "iteration": int(iteration), "loss": loss,
                "best_loss": best_loss, "best_iteration": best_iteration, "converged": converged,
                "seconds": round(time.perf_counter() - self._started, 1), "explanation": why,
                "history": self.history}, self.report)
