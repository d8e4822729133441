"""One rank of the 2-process gloo check of ``test_distributed.py``: ``python _dist_worker.py RANK WORLD INIT OUT``.

Each rank builds its own part of a fixed batch (rank-local volume/sample ids, unequal sizes across ranks), computes
every loss with ``gather_distributed=True`` through a tiny shared linear "network", back-propagates, all-reduces the
parameter gradients DDP-style (mean) and saves loss values, gradients, dense-mode centres and sampler draws to OUT.
The test recomputes the single-process losses on the concatenated batch from the same ``make_rank_batch`` data.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from scripts.losses import GLOBAL_STRATEGIES, GlobalContrastiveLoss, LocalContrastiveLoss
from scripts.sampler import PartitionBatchSampler

LOCAL_CASES = [("random", "grid"), ("domain", "grid"), ("random", "dense"), ("domain", "dense")]
SAMPLER_COUNTS = [10] * 9 + [3]  # volume 9 is too short for 4 partitions
ID_OFFSET = 10  # rank r's local ids + 10 r = ids in the concatenated single-process batch


def make_rank_batch(rank: int) -> dict[str, torch.Tensor]:
    """Rank-local items: 2 volumes x 2 partitions x 2 views on rank 0; rank 1 lacks one slice (6 images)."""
    volume = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    partition = torch.tensor([0, 0, 1, 1, 0, 0, 1, 1])
    sample = 2 * volume + partition
    keep = torch.arange(8) < (8 if rank == 0 else 6)
    g = torch.Generator().manual_seed(1000 + rank)
    position = (partition.double() + torch.rand(4, generator=g, dtype=torch.float64)[sample]) / 2
    n = int(keep.sum())
    return {
        "volume": volume[keep],
        "partition": partition[keep],
        "sample": sample[keep],
        "position": position[keep],
        "inputs": torch.randn(n, 8, generator=g),
        "feature_inputs": torch.randn(n, 3, 7, 7, generator=g),
    }


def make_parameters() -> tuple[torch.Tensor, torch.Tensor]:
    """The shared "network": embeddings = inputs @ w_global, features = 1x1 conv with w_local (same on every rank)."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, 6, generator=g).requires_grad_(), torch.randn(3, 4, generator=g).requires_grad_()


def embed(inputs: torch.Tensor, w_global: torch.Tensor) -> torch.Tensor:
    return inputs @ w_global


def project(feature_inputs: torch.Tensor, w_local: torch.Tensor) -> torch.Tensor:
    return torch.einsum("nchw,cd->ndhw", feature_inputs, w_local)


def _step(loss_fn, make_output, weight, batch, world, **kwargs) -> dict:
    weight.grad = None
    output = make_output()
    output.retain_grad()
    loss = loss_fn(output, batch["volume"], batch["partition"], batch["sample"], **kwargs)
    loss.backward()
    dist.all_reduce(weight.grad)  # what DistributedDataParallel does with parameter gradients: the mean over ranks
    weight.grad /= world
    return {"loss": loss.detach(), "output_grad": output.grad.detach(), "weight_grad": weight.grad.detach().clone()}


def main(rank: int, world: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    batch = make_rank_batch(rank)
    w_global, w_local = make_parameters()
    results: dict = {}
    for strategy in GLOBAL_STRATEGIES:
        loss_fn = GlobalContrastiveLoss(strategy, temperature=0.1, gather_distributed=True)
        results[("global", strategy)] = _step(
            loss_fn, lambda: embed(batch["inputs"], w_global), w_global, batch, world, position=batch["position"]
        )
    for strategy, mode in LOCAL_CASES:
        loss_fn = LocalContrastiveLoss(
            strategy, 0.1, region_size=3, region_mode=mode, num_regions=5, gather_distributed=True
        )
        torch.manual_seed(50 + rank)  # different RNG states: dense positions must come from rank 0's broadcast
        results[("local", strategy, mode)] = _step(
            loss_fn, lambda: project(batch["feature_inputs"], w_local), w_local, batch, world
        )
        results[("local", strategy, mode)]["centres"] = loss_fn.last_centres.clone()
    sampler = PartitionBatchSampler(SAMPLER_COUNTS, volumes_per_batch=2, num_partitions=4, num_batches=8, seed=0)
    results["sampler"] = {
        "rank": sampler.rank,
        "world_size": sampler.world_size,
        "shard": sampler.rank_volumes(),
        "used": sorted({v for b in sampler for v, _ in b}),
    }
    torch.save(results, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
