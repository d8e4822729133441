"""torch.distributed in one place: this process's rank and the world size, DDP wrapping, a differentiable all-gather.

The trainers of every stage get their network through ``data_parallel``; the configs need no other change to run
under ``torchrun`` (configs/multi_gpu_train.yaml initialises the process group and shards the data). Every module that
needs to know its rank or the number of processes asks :func:`rank_and_world_size`; the contrastive losses gather
the embeddings of all ranks with :func:`all_gather_rows`, whose backward pass returns each rank its rows' gradient.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["rank_and_world_size", "data_parallel", "gather_row_counts", "all_gather_rows"]


def rank_and_world_size() -> tuple[int, int]:
    """``(rank, world size)`` of this process in the running process group; ``(0, 1)`` when torch.distributed is not
    available or no process group is initialised (a plain single-process run).

    Example::

        >>> rank_and_world_size()  # one process
        (0, 1)
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def data_parallel(module: nn.Module, find_unused_parameters: bool = False) -> nn.Module:
    """``module`` wrapped in ``DistributedDataParallel`` when torch.distributed is initialised with more than one
    process, else ``module`` itself.

    Args:
        module: the network, already on its device (a CUDA device gives ``device_ids=[index]``).
        find_unused_parameters: True when some trainable parameters get no gradient in a step (e.g. the U-Net
            decoder during the global stage); DDP then looks for them after each backward pass.

    Only the trainer should see the wrapper: optimisers, validation and checkpoints keep using ``module`` (its
    state_dict keys carry no ``module.`` prefix, and evaluation runs no collective operation).

    Example::

        >>> net = nn.Linear(2, 2)
        >>> data_parallel(net) is net  # one process
        True
    """
    if rank_and_world_size()[1] <= 1:
        return module
    device = next(module.parameters()).device
    device_ids = None
    if device.type == "cuda":
        device_ids = [device.index if device.index is not None else torch.cuda.current_device()]
    return nn.parallel.DistributedDataParallel(module, device_ids=device_ids,
                                               find_unused_parameters=find_unused_parameters)


def gather_row_counts(rows: int, world: int, device: torch.device | str) -> list[int]:
    """The number of rows each of the ``world`` ranks holds (this rank holds ``rows``), in rank order: one
    all-gather of a 1-element long tensor on ``device``. A collective: every rank must call it."""
    count = torch.tensor([rows], device=device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    return [int(c) for c in counts]


class _AllGatherRows(torch.autograd.Function):
    """All-gather along dim 0 (sizes may differ per rank) whose backward sums every rank's gradient for our rows."""

    @staticmethod
    def forward(ctx, tensor: Tensor, counts: list[int], rank: int) -> Tensor:
        ctx.counts, ctx.rank = counts, rank
        padded = tensor.new_zeros((max(counts), *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        buffers = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(buffers, padded)
        return torch.cat([buffer[:count] for buffer, count in zip(buffers, counts)])

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)  # d(sum over ranks of their losses) / d(gathered rows)
        start = sum(ctx.counts[: ctx.rank])
        return grad[start : start + ctx.counts[ctx.rank]], None, None


def all_gather_rows(tensor: Tensor, counts: list[int], rank: int) -> Tensor:
    """The rows of every rank's ``tensor``, concatenated in rank order, with gradient.

    Args:
        tensor: (counts[rank], ...) this rank's rows; the trailing shape and dtype must agree across ranks.
        counts: rows per rank, e.g. from :func:`gather_row_counts` (they may differ; rows are padded to the
            largest count for the collective and cut back after it).
        rank: this process's rank.

    Returns:
        (sum(counts), ...) tensor. Backward: the gradient of the gathered rows is summed over the ranks (an
        all-reduce), and each rank receives the slice of its own rows, i.e. the gradient of the sum of all ranks'
        losses. A collective in both directions: every rank must call it and back-propagate through it.
    """
    return _AllGatherRows.apply(tensor, counts, rank)
