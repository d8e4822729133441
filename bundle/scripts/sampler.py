"""Partitions along z and the partition-aware batch sampler of the global contrastive stage; the fine-tuning's
slice sampler under torchrun (``ShardedRandomSampler``).

Partition rule: a volume with Q slices is cut along z into S contiguous partitions, and slice k (0 <= k < Q)
belongs to partition ``floor(k * S / Q)``. Partition p therefore holds slices ``ceil(p*Q/S) .. ceil((p+1)*Q/S) - 1``;
the partition sizes differ by at most one slice and every partition is non-empty exactly when Q >= S. Volumes with
fewer slices than S are not eligible for partition-aware batches (they are excluded with a warning: never padded,
never filled with blank images, never drawn twice in one batch).

A partition-aware batch draws M distinct volumes and one random slice from each of their S partitions, M*S
``(volume_index, slice_index)`` items ordered volume-major: ``[(v0, slice in p0), (v0, slice in p1), ...,
(v1, slice in p0), ...]``. The dataset's ``__getitem__`` receives these tuples.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DistributedSampler, Sampler

from scripts.distributed import rank_and_world_size
from scripts.errors import BundleError

__all__ = ["partition_of", "PartitionBatchSampler", "ShardedRandomSampler"]

logger = logging.getLogger(__name__)


def partition_of(slice_index, num_slices, num_partitions):
    """Partition of slice ``slice_index`` in a volume of ``num_slices`` slices cut into ``num_partitions`` parts.

    ``floor(slice_index * num_partitions / num_slices)`` in integer arithmetic.

    Args:
        slice_index: k in ``0 .. num_slices - 1``; an int, or an integer numpy array / torch tensor (element-wise).
        num_slices: Q >= 1 (int, or an array/tensor broadcastable against ``slice_index``).
        num_partitions: S >= 1.

    Returns:
        an int for int input, else an array/tensor of the input's kind.

    Example::

        >>> partition_of(5, 10, 4)
        2
        >>> partition_of(torch.arange(10), 10, 4).tolist()
        [0, 0, 0, 1, 1, 2, 2, 2, 3, 3]
    """
    if isinstance(num_partitions, bool) or not isinstance(num_partitions, (int, np.integer)) or num_partitions < 1:
        raise ValueError(f"num_partitions must be a positive int, got {num_partitions!r}.")
    if _minimum(num_slices) < 1:
        raise ValueError(f"num_slices must be >= 1, got {num_slices!r}.")
    if _minimum(slice_index) < 0 or _any(slice_index >= num_slices):
        raise ValueError(
            f"slice_index must lie in 0 .. num_slices - 1, got {slice_index!r} for num_slices={num_slices!r}."
        )
    result = (slice_index * num_partitions) // num_slices
    return int(result) if isinstance(result, (int, np.integer)) else result


def _minimum(value):
    if isinstance(value, torch.Tensor):
        return value.min().item() if value.numel() else 0
    return np.min(value) if np.size(value) else 0


def _any(value) -> bool:
    return bool(value.any()) if isinstance(value, (torch.Tensor, np.ndarray)) else bool(value)


class PartitionBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batch sampler of partition-aware batches: M volumes x one random slice from each of their S partitions.

    Each batch holds ``volumes_per_batch * num_partitions`` ``(volume_index, slice_index)`` tuples, volume-major
    (see the module docstring). Within a batch the M volumes are distinct; across batches the sampler walks
    through a shuffled list of this rank's volumes and reshuffles when it runs out (skipping the volumes already
    in the batch being filled), so every volume is used about equally often. Slices are uniform within each
    partition, drawn afresh for every batch.

    Randomness is a function of ``(seed, epoch)`` only (``set_epoch`` as with ``DistributedSampler``), identical
    for every DataLoader worker count. Under distributed training the eligible volumes are shuffled with a
    permutation common to all ranks (seeded by ``(seed, epoch)``) and rank r takes every ``world_size``-th volume
    from position r, so the ranks' volume shards are disjoint and together cover all eligible volumes.

    Args:
        slice_counts: number of slices Q of each volume (volume index = position in this sequence).
        volumes_per_batch: M, distinct volumes per batch.
        num_partitions: S, partitions per volume (the paper: 4).
        num_batches: batches per epoch (``len(sampler)``).
        seed: non-negative base seed.
        rank, world_size: default to torch.distributed's when initialised, else 0 and 1.
        drop_short: True: volumes with Q < S are excluded with a warning naming them; False: they raise ValueError.

    Example::

        >>> sampler = PartitionBatchSampler([10, 12, 8, 3], volumes_per_batch=2, num_partitions=4, num_batches=5)
        >>> next(iter(sampler))  # volume 3 (3 slices < 4) is excluded with a warning
        [(0, 0), (0, 3), (0, 7), (0, 9), (1, 1), (1, 3), (1, 8), (1, 9)]
        >>> loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=2)  # doctest: +SKIP
    """

    def __init__(
        self,
        slice_counts: Sequence[int],
        volumes_per_batch: int,
        num_partitions: int,
        num_batches: int,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        drop_short: bool = True,
    ):
        super().__init__()
        counts = [int(q) for q in slice_counts]
        if not counts or any(q < 0 for q in counts) or any(int(q) != q for q in slice_counts):
            raise ValueError(f"slice_counts must be a non-empty sequence of non-negative ints, got {slice_counts!r}.")
        sizes = {"volumes_per_batch": volumes_per_batch, "num_partitions": num_partitions, "num_batches": num_batches}
        for name, value in sizes.items():
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}.")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}.")
        group_rank, group_world = rank_and_world_size()
        world_size = group_world if world_size is None else world_size
        rank = group_rank if rank is None else rank
        if isinstance(world_size, bool) or not isinstance(world_size, (int, np.integer)) or world_size < 1:
            raise ValueError(f"world_size must be a positive int, got {world_size!r}.")
        if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be an int in 0 .. world_size - 1 = {world_size - 1}, got {rank!r}.")

        short = [v for v, q in enumerate(counts) if q < num_partitions]
        if short:
            if not drop_short:
                raise ValueError(
                    f"volumes {short} have fewer slices than num_partitions={num_partitions} (drop_short=False)."
                )
            logger.warning(
                "PartitionBatchSampler: excluding volumes %s, they have fewer slices than num_partitions=%d.",
                short,
                num_partitions,
            )
        eligible = [v for v, q in enumerate(counts) if q >= num_partitions]
        if not eligible:
            raise BundleError(f"no volume has at least num_partitions={num_partitions} slices (slice_counts={counts}).")
        if len(eligible) // world_size < volumes_per_batch:
            raise BundleError(
                f"volumes_per_batch={volumes_per_batch} exceeds the {len(eligible) // world_size} eligible volumes "
                f"available to each of the {world_size} rank(s) ({len(eligible)} eligible in all): lower "
                "global#volumes_per_batch / local#volumes_per_batch (pretrain.yaml) or add volumes."
            )
        self.slice_counts, self.eligible, self.excluded = counts, eligible, short
        self.volumes_per_batch, self.num_partitions = int(volumes_per_batch), int(num_partitions)
        self.num_batches = int(num_batches)
        self.seed, self.rank, self.world_size, self.epoch = int(seed), int(rank), int(world_size), 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose (deterministic) batches ``__iter__`` yields."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_batches

    def rank_volumes(self) -> list[int]:
        """This rank's volume shard for the current epoch."""
        shuffled = np.random.default_rng([self.seed, self.epoch, 0]).permutation(self.eligible)
        return [int(v) for v in shuffled[self.rank :: self.world_size]]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        rng = np.random.default_rng([self.seed, self.epoch, 1, self.rank])
        shard = self.rank_volumes()
        queue: list[int] = []
        parts = np.arange(self.num_partitions)
        for _ in range(self.num_batches):
            chosen = queue[: self.volumes_per_batch]
            queue = queue[self.volumes_per_batch :]
            if len(chosen) < self.volumes_per_batch:  # start a new pass over the shard, without repeating `chosen`
                fresh = [int(v) for v in rng.permutation(shard) if v not in chosen]
                missing = self.volumes_per_batch - len(chosen)
                chosen, queue = chosen + fresh[:missing], fresh[missing:]
            batch = []
            for volume in chosen:
                q = self.slice_counts[volume]
                first = (parts * q + self.num_partitions - 1) // self.num_partitions  # ceil(p * Q / S)
                stop = ((parts + 1) * q + self.num_partitions - 1) // self.num_partitions
                batch.extend((volume, int(k)) for k in rng.integers(first, stop))
            yield batch


class ShardedRandomSampler(DistributedSampler):
    """Fine-tuning slices under torchrun: ``num_samples`` indices per epoch and rank, drawn with replacement from the
    rank's shard of a permutation of the dataset; the shards of one epoch are disjoint across ranks.

    The multi-process counterpart of ``RandomSampler(replacement=True, num_samples=batch_size * iterations)``: every
    epoch is one whole pass of its own iterator, a function of (``seed``, epoch, rank) only, so a run resumed at an
    epoch boundary draws the same slices as one never interrupted. (A ``DistributedSampler`` cycled by the trainer's
    ``epoch_length`` carries its iterator across epochs, and a resumed run would start a fresh one.) MONAI's trainers
    call ``set_epoch`` at every epoch start, as for any ``DistributedSampler``.

    Args:
        dataset: the slices (any sized dataset), at least as many as ranks.
        num_samples: indices per epoch and rank (``batch_size * iterations_per_epoch``).
        seed: the draw's seed, the same on every rank.
        num_replicas, rank: default from the process group.
    """

    def __init__(self, dataset, num_samples: int, seed: int = 0, num_replicas: int | None = None,
                 rank: int | None = None):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
        if len(dataset) < self.num_replicas:
            raise BundleError(f"{len(dataset)} training slices cannot be shared by {self.num_replicas} processes: "
                              "label more volumes or run fewer processes.")
        self.num_samples = int(num_samples)
        self.total_size = self.num_samples * self.num_replicas

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        shard = torch.randperm(len(self.dataset), generator=generator)[self.rank::self.num_replicas]
        draws = torch.randint(len(shard), (self.num_samples,), generator=generator)
        return iter(shard[draws].tolist())

    def __len__(self) -> int:
        return self.num_samples
