"""What the multi-GPU overlay (configs/multi_gpu.yaml) needs beyond torch: rank-aware handler lists.

Under ``torchrun`` every rank builds the same handler lists from the config; handlers that write files or print
(progress bar, console statistics, TensorBoard, checkpoints, metric files) must run on rank 0 only, while the ones
that take part in collective operations or keep the ranks in step (validation, ``TrainingState``,
``NonFiniteGuard``) must run on every rank.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

__all__ = ["RANK0_ONLY", "rank0_handlers", "backend", "ddp_device_ids"]

# handler class names (or base-class names) that only rank 0 attaches
RANK0_ONLY = ("LossProgressBar", "StatsHandler", "TensorBoardStatsHandler", "CheckpointSaver", "MetricsSaver")


def rank0_handlers(handlers: Sequence | None, is_not_rank0: bool, rank0_only: Sequence[str] = RANK0_ONLY) -> list:
    """``handlers`` on rank 0; on the other ranks, ``handlers`` without those whose class (or a base class) is
    named in ``rank0_only``.

    Example::

        >>> from monai.handlers import StatsHandler, ValidationHandler
        >>> [type(h).__name__ for h in rank0_handlers([StatsHandler(), ValidationHandler(1)], is_not_rank0=True)]
        ['ValidationHandler']
    """
    handlers = list(handlers or [])
    if not is_not_rank0:
        return handlers
    names = set(rank0_only)
    return [h for h in handlers if not names & {c.__name__ for c in type(h).__mro__}]


def backend() -> str:
    """The process-group backend that follows the device: "nccl" with CUDA, else "gloo" (CPU)."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def ddp_device_ids(device: torch.device | str) -> list[int] | None:
    """``device_ids`` for ``DistributedDataParallel``: ``[index]`` on a CUDA device, None on CPU."""
    device = torch.device(device)
    return [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None


def is_not_rank0() -> bool:
    """True on the ranks > 0 of an initialised process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_rank() > 0
