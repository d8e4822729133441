"""2-process gloo check (CPU): distributed losses and gradients equal the single-process ones on the whole batch.

Two ranks run ``_dist_worker.py``; each holds part of a batch (8 and 6 images, rank-local ids) and computes every
loss with ``gather_distributed=True``. What must hold, with L the single-process loss on the concatenated batch:

- the mean over ranks of the per-rank losses equals L (DDP optimises that mean);
- the DDP-averaged gradient of the shared parameters equals dL/dw of the single process;
- the gradient w.r.t. a rank's own embeddings equals world_size * dL/d(those embeddings): rank r's loss is
  world_size * (its share of L), and the all-gather's backward adds every rank's contribution; DDP's division by
  world_size then gives back exactly dL/dw.

Also: dense-mode positions are broadcast from rank 0, and the samplers of the two ranks draw disjoint volumes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import _dist_worker as worker
from conftest import BUNDLE
from scripts.losses import GLOBAL_STRATEGIES, GlobalContrastiveLoss, LocalContrastiveLoss

WORLD = 2
HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(BUNDLE), os.environ.get("PYTHONPATH", "")]))
    env.setdefault("OMP_NUM_THREADS", "1")
    outs = [tmp / f"rank{r}.pt" for r in range(WORLD)]
    procs = [
        subprocess.Popen(
            [sys.executable, str(HERE / "_dist_worker.py"), str(r), str(WORLD), str(tmp / "init"), str(outs[r])],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(WORLD)
    ]
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=60)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for r, proc in enumerate(procs):
        assert proc.returncode == 0, f"rank {r} failed:\n{logs[r]}"
    return [torch.load(out, weights_only=False) for out in outs]


def _concatenated_batch():
    parts = [worker.make_rank_batch(r) for r in range(WORLD)]
    batch = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
    offsets = torch.cat([torch.full((len(p["sample"]),), worker.ID_OFFSET * r) for r, p in enumerate(parts)])
    batch["volume"] = batch["volume"] + offsets  # globally unique ids for the single process
    batch["sample"] = batch["sample"] + offsets
    return batch, [len(p["sample"]) for p in parts]


def _reference(loss_fn, output, weight, batch, **kwargs):
    output.retain_grad()
    loss = loss_fn(output, batch["volume"], batch["partition"], batch["sample"], **kwargs)
    loss.backward()
    return loss.detach(), output.grad, weight.grad


def _assert_matches(results, key, reference, sizes):
    loss, output_grad, weight_grad = reference
    per_rank = [results[r][key] for r in range(WORLD)]
    assert torch.stack([p["loss"] for p in per_rank]).mean().item() == pytest.approx(loss.item(), rel=1e-5)
    for r in range(WORLD):  # DDP-averaged parameter gradient == single-process gradient, on every rank
        torch.testing.assert_close(per_rank[r]["weight_grad"], weight_grad, rtol=1e-5, atol=1e-6)
    own_grads = torch.cat([p["output_grad"] for p in per_rank])
    assert [len(p["output_grad"]) for p in per_rank] == sizes
    torch.testing.assert_close(own_grads, WORLD * output_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("strategy", GLOBAL_STRATEGIES)
def test_global_loss_and_gradients_match_single_process(rank_results, strategy):
    batch, sizes = _concatenated_batch()
    w_global, _ = worker.make_parameters()
    loss_fn = GlobalContrastiveLoss(strategy, temperature=0.1, gather_distributed=False)
    embeddings = worker.embed(batch["inputs"], w_global)
    reference = _reference(loss_fn, embeddings, w_global, batch, position=batch["position"])
    _assert_matches(rank_results, ("global", strategy), reference, sizes)


@pytest.mark.parametrize("strategy, mode", worker.LOCAL_CASES)
def test_local_loss_and_gradients_match_single_process(rank_results, strategy, mode):
    batch, sizes = _concatenated_batch()
    _, w_local = worker.make_parameters()
    key = ("local", strategy, mode)
    centres = rank_results[0][key]["centres"]
    assert torch.equal(rank_results[1][key]["centres"], centres)  # dense: broadcast from rank 0; grid: fixed
    loss_fn = LocalContrastiveLoss(strategy, 0.1, region_size=3, region_mode=mode, num_regions=5)
    features = worker.project(batch["feature_inputs"], w_local)
    reference = _reference(loss_fn, features, w_local, batch, centres=centres)
    _assert_matches(rank_results, key, reference, sizes)


def test_domain_loss_really_crosses_ranks(rank_results):
    # without gathering, G^D on rank 1 would miss rank 0's same-partition positives: the value must differ
    batch = worker.make_rank_batch(1)
    w_global, _ = worker.make_parameters()
    alone = GlobalContrastiveLoss("domain", gather_distributed=False)(
        worker.embed(batch["inputs"], w_global), batch["volume"], batch["partition"], batch["sample"]
    )
    assert abs(alone.item() - rank_results[1][("global", "domain")]["loss"].item()) > 1e-3


def test_sampler_ranks_draw_disjoint_volumes(rank_results):
    info = [rank_results[r]["sampler"] for r in range(WORLD)]
    assert [i["rank"] for i in info] == [0, 1] and all(i["world_size"] == WORLD for i in info)
    shards = [set(i["shard"]) for i in info]
    assert not shards[0] & shards[1]
    assert shards[0] | shards[1] == set(range(9))  # volume 9 is too short
    for i in info:
        assert set(i["used"]) <= set(i["shard"]) and i["used"]
