"""Partition rule and the partition-aware batch sampler: composition, exclusions, determinism, loaders, rank shards."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from scripts.errors import BundleError
from scripts.sampler import PartitionBatchSampler, partition_of

SLICE_COUNTS = [10, 12, 8, 7, 9, 4, 15, 11]  # all >= 4
M, S = 3, 4


def test_partition_of_rule_and_vectorised():
    assert [partition_of(k, 10, 4) for k in range(10)] == [0, 0, 0, 1, 1, 2, 2, 2, 3, 3]
    assert [partition_of(k, 4, 4) for k in range(4)] == [0, 1, 2, 3]
    for q in range(1, 40):
        for s in range(1, 7):
            parts = partition_of(torch.arange(q), q, s)
            assert torch.equal(parts, torch.tensor([k * s // q for k in range(q)]))
            np.testing.assert_array_equal(partition_of(np.arange(q), q, s), parts.numpy())
            assert (parts[1:] >= parts[:-1]).all()  # contiguous
            if q >= s:  # every partition present, sizes differ by at most one
                sizes = torch.bincount(parts, minlength=s)
                assert sizes.min() >= 1 and sizes.max() - sizes.min() <= 1
    with pytest.raises(ValueError, match="slice_index"):
        partition_of(10, 10, 4)
    with pytest.raises(ValueError, match="num_partitions"):
        partition_of(1, 10, 0)
    with pytest.raises(ValueError, match="num_slices"):
        partition_of(0, 0, 4)


def _check_batch(batch, counts, m, s):
    assert len(batch) == m * s
    assert len(set(batch)) == len(batch)  # no item repeated
    volumes = [batch[i * s][0] for i in range(m)]
    assert len(set(volumes)) == m  # M distinct volumes
    for i, volume in enumerate(volumes):
        items = batch[i * s : (i + 1) * s]  # volume-major
        assert all(v == volume for v, _ in items)
        assert all(0 <= k < counts[volume] for _, k in items)
        assert [partition_of(k, counts[volume], s) for _, k in items] == list(range(s))  # one slice per partition
    return volumes


def test_batch_composition():
    sampler = PartitionBatchSampler(SLICE_COUNTS, volumes_per_batch=M, num_partitions=S, num_batches=20, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 20
    for batch in batches:
        assert all(isinstance(v, int) and isinstance(k, int) for v, k in batch)
        _check_batch(batch, SLICE_COUNTS, M, S)


def test_every_volume_used_each_pass():
    # 8 volumes, 3 per batch: the first 3 batches (9 draws) cover all 8 volumes
    sampler = PartitionBatchSampler(SLICE_COUNTS, volumes_per_batch=M, num_partitions=S, num_batches=30, seed=2)
    batches = list(sampler)
    first_pass = {v for batch in batches[:3] for v, _ in batch}
    assert first_pass == set(range(len(SLICE_COUNTS)))
    uses = np.bincount([v for batch in batches for v, _ in batch[::S]], minlength=len(SLICE_COUNTS))
    assert uses.min() >= 30 * M // len(SLICE_COUNTS) - 1 and uses.max() <= 30 * M // len(SLICE_COUNTS) + 2


def test_all_slices_of_a_partition_are_drawn():
    sampler = PartitionBatchSampler([8, 9], volumes_per_batch=2, num_partitions=4, num_batches=200)
    seen = {(v, k) for batch in sampler for v, k in batch}
    assert seen == {(0, k) for k in range(8)} | {(1, k) for k in range(9)}


def test_short_volumes_excluded_with_warning(caplog):
    counts = [10, 3, 8, 2, 12, 9]
    with caplog.at_level(logging.WARNING, logger="scripts.sampler"):
        sampler = PartitionBatchSampler(counts, volumes_per_batch=2, num_partitions=4, num_batches=25)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "[1, 3]" in warnings[0].getMessage()
    assert sampler.excluded == [1, 3] and sampler.eligible == [0, 2, 4, 5]
    for batch in sampler:
        _check_batch(batch, counts, 2, 4)
        assert not {v for v, _ in batch} & {1, 3}
    with pytest.raises(ValueError, match=r"\[1, 3\]"):
        PartitionBatchSampler(counts, volumes_per_batch=2, num_partitions=4, num_batches=5, drop_short=False)
    with pytest.raises(ValueError, match="no volume"):
        PartitionBatchSampler([1, 2, 3], volumes_per_batch=1, num_partitions=4, num_batches=5)


def test_determinism_seed_and_epoch():
    def batches(seed, epoch):
        sampler = PartitionBatchSampler(SLICE_COUNTS, M, S, num_batches=6, seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert batches(0, 0) == batches(0, 0)
    assert batches(0, 3) == batches(0, 3)
    assert batches(0, 0) != batches(0, 1)
    assert batches(0, 0) != batches(1, 0)
    sampler = PartitionBatchSampler(SLICE_COUNTS, M, S, num_batches=6, seed=0)
    assert list(sampler) == list(sampler)  # iterating twice in one epoch repeats the epoch
    sampler.set_epoch(1)
    assert list(sampler) == batches(0, 1)


class _SliceDataset(Dataset):
    """Receives (volume, slice) tuples; returns an image that encodes them."""

    def __len__(self):
        return sum(SLICE_COUNTS)

    def __getitem__(self, item):
        volume, k = item
        return {"image": torch.full((1, 4, 4), float(100 * volume + k)), "volume": volume, "slice": k}


def test_dataloader_with_workers_returns_the_sampled_items():
    sampler = PartitionBatchSampler(SLICE_COUNTS, M, S, num_batches=4, seed=3)
    sampler.set_epoch(2)
    expected = list(sampler)
    loader = DataLoader(_SliceDataset(), batch_sampler=sampler, num_workers=2)
    got = list(loader)
    assert len(got) == 4
    for batch, items in zip(got, expected):
        assert batch["image"].shape == (M * S, 1, 4, 4)
        assert batch["volume"].tolist() == [v for v, _ in items]
        assert batch["slice"].tolist() == [k for _, k in items]
        assert batch["image"][:, 0, 0, 0].tolist() == [100.0 * v + k for v, k in items]


def test_rank_shards_disjoint_and_covering():
    counts = [10] * 13 + [2]  # 13 eligible, 1 short
    for epoch in (0, 1):
        shards, used = [], []
        for rank in range(3):
            sampler = PartitionBatchSampler(counts, 2, 4, num_batches=10, seed=4, rank=rank, world_size=3)
            sampler.set_epoch(epoch)
            shards.append(set(sampler.rank_volumes()))
            used.append({v for batch in sampler for v, _ in batch})
            assert used[-1] <= shards[-1]
        assert sorted(len(s) for s in shards) == [4, 4, 5]
        assert not (shards[0] & shards[1]) and not (shards[0] & shards[2]) and not (shards[1] & shards[2])
        assert set().union(*shards) == set(range(13))
        assert used == shards  # 10 batches x 2 volumes cover each shard
    sampler = PartitionBatchSampler(counts, 2, 4, num_batches=1, seed=4, rank=0, world_size=3)
    first_epoch = sampler.rank_volumes()
    sampler.set_epoch(1)
    assert sampler.rank_volumes() != first_epoch  # shards are re-drawn every epoch (still disjoint)


def test_sampler_validation():
    with pytest.raises(ValueError, match="volumes_per_batch"):
        PartitionBatchSampler([10] * 5, volumes_per_batch=3, num_partitions=4, num_batches=1, rank=0, world_size=2)
    with pytest.raises(ValueError, match="volumes_per_batch"):
        PartitionBatchSampler([10] * 5, volumes_per_batch=0, num_partitions=4, num_batches=1)
    with pytest.raises(ValueError, match="rank"):
        PartitionBatchSampler([10] * 5, volumes_per_batch=1, num_partitions=4, num_batches=1, rank=2, world_size=2)
    with pytest.raises(ValueError, match="num_batches"):
        PartitionBatchSampler([10] * 5, volumes_per_batch=1, num_partitions=4, num_batches=0)
    with pytest.raises(ValueError, match="slice_counts"):
        PartitionBatchSampler([], volumes_per_batch=1, num_partitions=4, num_batches=1)
    with pytest.raises(ValueError, match="seed"):
        PartitionBatchSampler([10] * 5, volumes_per_batch=1, num_partitions=4, num_batches=1, seed=-1)


def test_sharded_random_sampler_is_a_function_of_seed_epoch_and_rank():
    """Under torchrun the fine-tuning draws num_samples slices per epoch and rank from the rank's shard: shards are
    disjoint within an epoch, every epoch is one whole pass of a fresh iterator (so a resume at an epoch boundary draws
    what an uninterrupted run draws), and the epochs differ."""
    from scripts.sampler import ShardedRandomSampler

    data = list(range(23))

    def epoch(rank, number, seed=3):
        sampler = ShardedRandomSampler(data, num_samples=8, seed=seed, num_replicas=2, rank=rank)
        sampler.set_epoch(number)
        return list(sampler)

    for number in range(3):
        draws = [epoch(rank, number) for rank in (0, 1)]
        assert [len(d) for d in draws] == [8, 8] and all(0 <= i < 23 for d in draws for i in d)
        assert not set(draws[0]) & set(draws[1])
        assert draws == [epoch(rank, number) for rank in (0, 1)]   # the same again: nothing carried over
    assert epoch(0, 0) != epoch(0, 1) and epoch(0, 0) != epoch(0, 0, seed=4)
    assert len(ShardedRandomSampler(data, num_samples=8, num_replicas=2, rank=1)) == 8
    with pytest.raises(BundleError, match="1 training slices cannot be shared by 2 processes"):
        ShardedRandomSampler([0], num_samples=4, num_replicas=2, rank=0)
