"""The contrastive losses against slow loop-based references, literal positive/negative sets, stability, validation.

The references below are written from the definitions (the paper / the losses' docstrings) with explicit Python
loops over anchors and pairs, in float64; they share no code with ``scripts.losses``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from scripts.losses import (
    GLOBAL_STRATEGIES,
    GlobalContrastiveLoss,
    LocalContrastiveLoss,
    contrastive_pair_loss,
    global_pair_masks,
    grid_region_centres,
    local_pair_masks,
)

TEMPERATURE = 0.1

# ------------------------------------------------------------------------------------------------------------------
# hand-built batch: 2 volumes x 2 partitions x 2 views = 8 images, item = 4 * volume + 2 * partition + view
#   0: v0 p0 a   1: v0 p0 b   2: v0 p1 a   3: v0 p1 b   4: v1 p0 a   5: v1 p0 b   6: v1 p1 a   7: v1 p1 b
# slice positions: v0 p0 -> 0.10, v0 p1 -> 0.60, v1 p0 -> 0.30, v1 p1 -> 0.80
# ------------------------------------------------------------------------------------------------------------------
HB_VOLUME = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
HB_PARTITION = torch.tensor([0, 0, 1, 1, 0, 0, 1, 1])
HB_SAMPLE = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
HB_POSITION = torch.tensor([0.10, 0.10, 0.60, 0.60, 0.30, 0.30, 0.80, 0.80])

# strategy -> anchor -> (positives, negatives); everything else is neither
HB_EXPECTED = {
    "random": {0: ([1], [2, 3, 4, 5, 6, 7]), 6: ([7], [0, 1, 2, 3, 4, 5])},
    "domain_minus": {0: ([1], [2, 3, 6, 7]), 6: ([7], [0, 1, 4, 5])},
    "domain": {0: ([1, 4, 5], [2, 3, 6, 7]), 6: ([2, 3, 7], [0, 1, 4, 5])},
    # |0.10 - 0.30| = 0.2 < 0.35; |0.60 - 0.30| = 0.3 and |0.60 - 0.80| = 0.2 < 0.35; |0.60 - 0.10| = 0.5
    "positional": {0: ([1, 4, 5], [2, 3, 6, 7]), 2: ([3, 4, 5, 6, 7], [0, 1])},
}


# ------------------------------------------------------------------------------------------------------------------
# slow references
# ------------------------------------------------------------------------------------------------------------------
def slow_relation(strategy, i, j, volume, partition, sample, position, threshold=0.35):
    """'pos', 'neg' or None for candidate j of anchor i, straight from the definitions."""
    if i == j:
        return None
    same_sample = sample[i] == sample[j]
    if strategy == "random":
        return "pos" if same_sample else "neg"
    if strategy == "domain_minus":
        if same_sample:
            return "pos"
        if partition[i] == partition[j] and volume[i] != volume[j]:
            return None
        return "neg"
    if strategy == "domain":
        return "pos" if same_sample or partition[i] == partition[j] else "neg"
    if strategy == "positional":
        return "pos" if same_sample or abs(position[i] - position[j]) < threshold else "neg"
    raise AssertionError(strategy)


def slow_cosine(a, b):
    return float(a @ b) / max(float(np.sqrt(a @ a)), 1e-12) / max(float(np.sqrt(b @ b)), 1e-12)


def slow_pair_term(s_pos, s_negs, t):
    numerator = math.exp(s_pos / t)
    return -math.log(numerator / (numerator + sum(math.exp(s / t) for s in s_negs)))


def slow_global_loss(embeddings, volume, partition, sample, position, strategy, t=TEMPERATURE):
    z = embeddings.double().numpy()
    vol, part, smp = volume.tolist(), partition.tolist(), sample.tolist()
    pos = position.tolist() if position is not None else None
    n, terms = len(z), []
    for i in range(n):
        relations = [slow_relation(strategy, i, j, vol, part, smp, pos) for j in range(n)]
        negatives = [slow_cosine(z[i], z[j]) for j in range(n) if relations[j] == "neg"]
        for p in range(n):
            if relations[p] == "pos":
                terms.append(slow_pair_term(slow_cosine(z[i], z[p]), negatives, t))
    return sum(terms) / len(terms)


def slow_local_loss(features, sample, partition, centres, strategy, mode, region_size=3, t=TEMPERATURE):
    f = features.double().numpy()
    n, _, height, width = f.shape
    smp, part, r = sample.tolist(), partition.tolist(), region_size
    half = r // 2

    def window(i, y, x):
        return f[i, :, y - half : y - half + r, x - half : x - half + r].reshape(-1)

    everywhere = [(y, x) for y in range(half, height - r + half + 1) for x in range(half, width - r + half + 1)]
    anchors = [tuple(c) for c in centres.tolist()]
    terms = []
    for i in range(n):
        own_sample = [j for j in range(n) if smp[j] == smp[i]]
        for y, x in anchors:
            a = window(i, y, x)
            negative_positions = anchors if mode == "grid" else everywhere
            negatives = [
                slow_cosine(a, window(j, yy, xx))
                for j in own_sample
                for (yy, xx) in negative_positions
                if (yy, xx) != (y, x)
            ]
            for j in range(n):
                if j == i:
                    continue
                if smp[j] == smp[i] or (strategy == "domain" and part[j] == part[i]):
                    terms.append(slow_pair_term(slow_cosine(a, window(j, y, x)), negatives, t))
    return sum(terms) / len(terms)


def random_metadata(seed):
    """An irregular batch: 7 slices with 1-3 views each from 3 volumes, random partitions and positions."""
    g = torch.Generator().manual_seed(seed)
    views = [2, 2, 3, 1, 2, 2, 2]
    vol = torch.randint(0, 3, (len(views),), generator=g)
    part = torch.randint(0, 3, (len(views),), generator=g)
    posn = torch.rand(len(views), generator=g, dtype=torch.float64)
    sample = torch.repeat_interleave(torch.arange(len(views)), torch.tensor(views))
    order = torch.randperm(len(sample), generator=g)  # views not adjacent
    sample = sample[order]
    return vol[sample], part[sample], sample, posn[sample]


# ------------------------------------------------------------------------------------------------------------------
# the core
# ------------------------------------------------------------------------------------------------------------------
def test_core_matches_formula_per_pair():
    g = torch.Generator().manual_seed(0)
    s = torch.rand(5, 9, generator=g, dtype=torch.float64) * 2 - 1
    pos = torch.rand(5, 9, generator=g) < 0.3
    neg = ~pos & (torch.rand(5, 9, generator=g) < 0.6)
    neg[4] = False  # an anchor without negatives: its pairs give -log(e/e) = 0
    pos[4, 0] = True
    expected = np.zeros((5, 9))
    for i in range(5):
        for p in range(9):
            if pos[i, p]:
                expected[i, p] = slow_pair_term(float(s[i, p]), [float(s[i, n]) for n in range(9) if neg[i, n]], 0.2)
    per_pair = contrastive_pair_loss(s, pos, neg, 0.2, reduction="none")
    np.testing.assert_allclose(per_pair.numpy(), expected, atol=1e-12)
    assert contrastive_pair_loss(s, pos, neg, 0.2).item() == pytest.approx(expected.sum() / pos.sum().item(), abs=1e-12)
    assert contrastive_pair_loss(s, pos, neg, 0.2, reduction="sum").item() == pytest.approx(expected.sum(), abs=1e-12)


def test_core_no_positive_pairs_gives_zero_with_graph():
    s = torch.randn(3, 4, requires_grad=True)
    loss = contrastive_pair_loss(s, torch.zeros(3, 4, dtype=torch.bool), torch.ones(3, 4, dtype=torch.bool), 0.1)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(s.grad, torch.zeros(3, 4))


def test_core_very_large_logits():
    s = torch.tensor([[1000.0, 999.5, 990.0, -1000.0], [-5e4, 5e4, 4e4, 0.0]], requires_grad=True)
    pos = torch.tensor([[True, False, False, False], [True, False, False, False]])
    neg = ~pos
    loss = contrastive_pair_loss(s, pos, neg, TEMPERATURE, reduction="none")
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(s.grad).all()
    # softplus(LSE(negatives) - positive) in float64 as the reference
    row0 = math.log1p(math.exp(-5.0) + math.exp(-100.0))
    row1 = (5e4 + 5e4) / TEMPERATURE + math.log1p(math.exp(-1e4 / TEMPERATURE))
    assert loss[0, 0].item() == pytest.approx(row0, rel=1e-5)
    assert loss[1, 0].item() == pytest.approx(row1, rel=1e-5)


# ------------------------------------------------------------------------------------------------------------------
# global loss: literal sets, slow reference
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", GLOBAL_STRATEGIES)
def test_global_hand_built_positive_and_negative_sets(strategy):
    pos, neg = global_pair_masks(strategy, HB_VOLUME, HB_PARTITION, HB_SAMPLE, HB_POSITION, position_threshold=0.35)
    assert pos.shape == neg.shape == (8, 8)
    for anchor, (positives, negatives) in HB_EXPECTED[strategy].items():
        assert pos[anchor].nonzero().flatten().tolist() == positives
        assert neg[anchor].nonzero().flatten().tolist() == negatives
    assert not pos.diagonal().any() and not neg.diagonal().any()  # never its own positive or negative
    assert not (pos & neg).any()


def test_global_hand_built_full_masks_domain_minus():
    pos, neg = global_pair_masks("domain_minus", HB_VOLUME, HB_PARTITION, HB_SAMPLE)
    # every anchor: positive = its other view; excluded = the two same-partition images of the other volume
    for anchor in range(8):
        other_view = anchor ^ 1
        excluded = {(anchor + 4) % 8, ((anchor + 4) % 8) ^ 1}
        assert pos[anchor].nonzero().flatten().tolist() == [other_view]
        assert neg[anchor].nonzero().flatten().tolist() == sorted(set(range(8)) - {anchor, other_view} - excluded)


@pytest.mark.parametrize("strategy", GLOBAL_STRATEGIES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_global_matches_slow_reference_random_embeddings(strategy, dtype):
    for seed in range(3):
        vol, part, smp, posn = random_metadata(seed)
        emb = torch.randn(len(smp), 16, generator=torch.Generator().manual_seed(100 + seed), dtype=dtype)
        loss = GlobalContrastiveLoss(strategy, temperature=TEMPERATURE)(emb, vol, part, smp, position=posn)
        expected = slow_global_loss(emb, vol, part, smp, posn, strategy)
        assert loss.item() == pytest.approx(expected, abs=1e-5, rel=1e-5)


@pytest.mark.parametrize("strategy", GLOBAL_STRATEGIES)
def test_global_matches_slow_reference_hand_built(strategy):
    emb = torch.randn(8, 5, generator=torch.Generator().manual_seed(7))
    loss_fn = GlobalContrastiveLoss(strategy, temperature=TEMPERATURE)
    loss = loss_fn(emb, HB_VOLUME, HB_PARTITION, HB_SAMPLE, HB_POSITION)
    expected = slow_global_loss(emb, HB_VOLUME, HB_PARTITION, HB_SAMPLE, HB_POSITION, strategy)
    assert loss.item() == pytest.approx(expected, abs=1e-5, rel=1e-5)


def test_global_identical_embeddings_value():
    # all cosines are 1: every pair costs log(1 + |N(i)|)
    emb = torch.ones(8, 4, requires_grad=True)
    for strategy in GLOBAL_STRATEGIES:
        pos, neg = global_pair_masks(strategy, HB_VOLUME, HB_PARTITION, HB_SAMPLE, HB_POSITION)
        per_anchor = torch.log1p(neg.sum(1).double())
        expected = (per_anchor * pos.sum(1)).sum() / pos.sum()
        loss = GlobalContrastiveLoss(strategy)(emb, HB_VOLUME, HB_PARTITION, HB_SAMPLE, HB_POSITION)
        loss.backward()
        assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
        assert torch.isfinite(emb.grad).all()


# ------------------------------------------------------------------------------------------------------------------
# local loss: literal sets, slow reference
# ------------------------------------------------------------------------------------------------------------------
def test_local_hand_built_region_sets():
    # K = 2 anchor positions; region (image i, position k) has index 2 * i + k
    pos, neg = local_pair_masks("random", HB_VOLUME, HB_PARTITION, HB_SAMPLE, num_regions=2)
    assert pos[0].nonzero().flatten().tolist() == [2]  # (1, 0): the other view, same position
    assert neg[0].nonzero().flatten().tolist() == [1, 3]  # (0, 1), (1, 1): other position, both views
    assert pos[13].nonzero().flatten().tolist() == [15]  # anchor (6, 1) -> (7, 1)
    assert neg[13].nonzero().flatten().tolist() == [12, 14]  # (6, 0), (7, 0)
    pos, neg = local_pair_masks("domain", HB_VOLUME, HB_PARTITION, HB_SAMPLE, num_regions=2)
    assert pos[0].nonzero().flatten().tolist() == [2, 8, 10]  # (1, 0) + same partition, other volume: (4, 0), (5, 0)
    assert neg[0].nonzero().flatten().tolist() == [1, 3]  # L^D negatives = L^R negatives (own sample only)
    assert pos[13].nonzero().flatten().tolist() == [5, 7, 15]  # (2, 1), (3, 1), (7, 1)
    assert neg[13].nonzero().flatten().tolist() == [12, 14]


def _window(f, i, centre, r=3):
    y, x = centre
    return f[i, :, y - r // 2 : y - r // 2 + r, x - r // 2 : x - r // 2 + r].reshape(-1).double()


# one slice, two views (images 0, 1), 4x4 map, 3x3 windows: valid centres (1,1), (1,2), (2,1), (2,2);
# anchors at (1,1) and (2,2).
# anchor (image i, centre c): positive = (image 1-i, c); negatives, both views (image, centre):
LITERAL_NEGATIVES = {
    "grid": {  # the other anchor position
        (1, 1): [(0, (2, 2)), (1, (2, 2))],
        (2, 2): [(0, (1, 1)), (1, (1, 1))],
    },
    "dense": {  # every other valid position
        (1, 1): [(0, (1, 2)), (0, (2, 1)), (0, (2, 2)), (1, (1, 2)), (1, (2, 1)), (1, (2, 2))],
        (2, 2): [(0, (1, 1)), (0, (1, 2)), (0, (2, 1)), (1, (1, 1)), (1, (1, 2)), (1, (2, 1))],
    },
}


@pytest.mark.parametrize("mode", ["grid", "dense"])
def test_local_literal_negatives_one_sample(mode):
    f = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    meta = dict(volume=torch.tensor([0, 0]), partition=torch.tensor([0, 0]), sample=torch.tensor([0, 0]))
    loss_fn = LocalContrastiveLoss("random", region_mode=mode)  # explicit centres override the mode's positions
    loss = loss_fn(f, **meta, centres=torch.tensor([[1, 1], [2, 2]]))
    terms = []
    for i in (0, 1):
        for centre, negatives in LITERAL_NEGATIVES[mode].items():
            a = _window(f, i, centre).numpy()
            s_neg = [slow_cosine(a, _window(f, j, c).numpy()) for j, c in negatives]
            terms.append(slow_pair_term(slow_cosine(a, _window(f, 1 - i, centre).numpy()), s_neg, TEMPERATURE))
    assert loss.item() == pytest.approx(sum(terms) / 4, abs=1e-10)


@pytest.mark.parametrize("strategy", ["random", "domain"])
@pytest.mark.parametrize("mode", ["grid", "dense"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_local_matches_slow_reference(strategy, mode, dtype):
    for seed in range(2):
        vol, part, smp, _ = random_metadata(seed)
        feats = torch.randn(len(smp), 3, 7, 6, generator=torch.Generator().manual_seed(200 + seed), dtype=dtype)
        torch.manual_seed(seed)
        loss_fn = LocalContrastiveLoss(strategy, TEMPERATURE, region_size=3, region_mode=mode, num_regions=5)
        loss = loss_fn(feats, vol, part, smp)
        expected = slow_local_loss(feats, smp, part, loss_fn.last_centres, strategy, mode)
        assert loss.item() == pytest.approx(expected, abs=1e-5, rel=1e-5)


@pytest.mark.parametrize("strategy", ["random", "domain"])
@pytest.mark.parametrize("mode", ["grid", "dense"])
def test_local_matches_slow_reference_hand_built(strategy, mode):
    feats = torch.randn(8, 2, 6, 6, generator=torch.Generator().manual_seed(11))
    centres = torch.tensor([[1, 1], [1, 4], [4, 1], [4, 4], [2, 3]])
    loss_fn = LocalContrastiveLoss(strategy, region_mode=mode, num_regions=5)
    loss = loss_fn(feats, HB_VOLUME, HB_PARTITION, HB_SAMPLE, centres=centres)
    expected = slow_local_loss(feats, HB_SAMPLE, HB_PARTITION, centres, strategy, mode)
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    if mode == "grid":  # the default 5-point grid on a 6x6 map: the 4 corners of the valid area + its centre
        grid = grid_region_centres(6, 6, 3, 5)
        assert grid.tolist() == [[1, 1], [1, 4], [4, 1], [4, 4], [3, 3]]
        expected = slow_local_loss(feats, HB_SAMPLE, HB_PARTITION, grid, strategy, mode)
        assert loss_fn(feats, HB_VOLUME, HB_PARTITION, HB_SAMPLE).item() == pytest.approx(expected, abs=1e-5)


def test_grid_positions_paper_layout():
    # 13 = 3x3 at fractions 0, 1/2, 1 of the valid centre range + 2x2 at 1/4, 3/4 (48x48 map, 3x3 windows: 1..46)
    centres = grid_region_centres(48, 48, 3, 13).tolist()
    lattice = [[y, x] for y in (1, 24, 46) for x in (1, 24, 46)] + [[y, x] for y in (12, 35) for x in (12, 35)]
    assert centres == lattice
    assert grid_region_centres(9, 9, 3, 1).tolist() == [[4, 4]]


def test_dense_positions_deterministic_with_seed():
    feats = torch.randn(4, 3, 9, 9)
    ids = torch.tensor([0, 0, 1, 1])
    meta = dict(volume=ids, partition=torch.zeros(4, dtype=torch.long), sample=ids)
    loss_fn = LocalContrastiveLoss("domain", region_mode="dense", num_regions=6)
    torch.manual_seed(5)
    first, first_centres = loss_fn(feats, **meta), loss_fn.last_centres.clone()
    torch.manual_seed(5)
    assert loss_fn(feats, **meta).item() == first.item() and torch.equal(loss_fn.last_centres, first_centres)
    assert loss_fn(feats, **meta, centres=first_centres).item() == pytest.approx(first.item(), abs=1e-7)
    assert torch.unique(first_centres, dim=0).shape[0] == 6
    assert ((first_centres >= 1) & (first_centres <= 7)).all()  # inside the valid area


def test_local_random_ignores_other_samples():
    # L^R: a sample's loss terms never involve other samples, so they receive no gradient from it
    feats = torch.randn(8, 2, 6, 6, requires_grad=True)
    for mode in ("grid", "dense"):
        feats.grad = None
        single = LocalContrastiveLoss("random", region_mode=mode, num_regions=5)
        loss = single(feats, HB_VOLUME, HB_PARTITION, torch.where(HB_SAMPLE == 0, 0, -1 - torch.arange(8)))
        loss.backward()  # only sample 0 (images 0, 1) has positives; the others are singletons
        assert feats.grad[2:].abs().sum() == 0 and feats.grad[:2].abs().sum() > 0


def autograd_dense_loss(features, sample, partition, centres, strategy, region_size=3, t=TEMPERATURE):
    """Dense mode from the definitions, vectorised with plain autograd (for gradients): every window by F.unfold,
    the full (N*K) x (N*P) similarity with its positive/negative masks, the per-pair loss written out."""
    n, _, _, width = features.shape
    r, cols = region_size, width - region_size + 1
    windows = F.normalize(F.unfold(features, r), dim=1)  # (N, C*r*r, P): window q has top-left (q // cols, q % cols)
    anchor_q = (centres[:, 0] - r // 2) * cols + (centres[:, 1] - r // 2)
    anchors = windows[:, :, anchor_q].transpose(1, 2)  # (N, K, C*r*r)
    k, p = len(anchor_q), windows.shape[2]
    logits = torch.einsum("ikd,jdq->ikjq", anchors, windows).reshape(n * k, n * p) / t
    same_sample = sample[:, None] == sample[None, :]
    related = same_sample | (partition[:, None] == partition[None, :]) if strategy == "domain" else same_sample
    image_positive = related & ~torch.eye(n, dtype=torch.bool)
    at_anchor = torch.arange(p)[None, :] == anchor_q[:, None]  # (K, P)
    positive = (image_positive[:, None, :, None] & at_anchor[None, :, None, :]).reshape(n * k, n * p)
    negative = (same_sample[:, None, :, None] & ~at_anchor[None, :, None, :]).reshape(n * k, n * p)
    negative_lse = torch.logsumexp(logits.masked_fill(~negative, float("-inf")), dim=1, keepdim=True)
    return F.softplus(negative_lse - logits)[positive].sum() / positive.sum()


@pytest.mark.parametrize("strategy", ["random", "domain"])
@pytest.mark.parametrize("region_size", [1, 2, 3])
def test_dense_loss_and_gradient_match_autograd_reference(strategy, region_size):
    # irregular batch (1-3 views per slice), non-square maps, and all-zero areas: zero-norm windows and anchors
    vol, part, smp, _ = random_metadata(3)
    feats = torch.randn(len(smp), 3, 8, 7, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    feats[:3, :, :4, :4] = 0
    feats[5, :, 3:, 2:] = 0
    for seed in range(2):
        torch.manual_seed(seed)
        loss_fn = LocalContrastiveLoss(strategy, TEMPERATURE, region_size, region_mode="dense", num_regions=6)
        x = feats.clone().requires_grad_()
        loss = loss_fn(x, vol, part, smp)
        (grad,) = torch.autograd.grad(loss, x)
        y = feats.clone().requires_grad_()
        expected = autograd_dense_loss(y, smp, part, loss_fn.last_centres, strategy, region_size)
        (expected_grad,) = torch.autograd.grad(expected, y)
        assert loss.item() == pytest.approx(expected.item(), abs=1e-12, rel=1e-12)
        torch.testing.assert_close(grad, expected_grad, rtol=1e-9, atol=1e-12)
        if region_size < 3:  # the loop reference too (it covers r = 3 above)
            slow = slow_local_loss(feats, smp, part, loss_fn.last_centres, strategy, "dense", region_size)
            assert loss.item() == pytest.approx(slow, abs=1e-8)


@pytest.mark.parametrize("strategy", ["random", "domain"])
def test_dense_gradcheck(strategy):
    vol, part, smp, _ = random_metadata(1)
    feats = torch.randn(len(smp), 2, 5, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    loss_fn = LocalContrastiveLoss(strategy, 0.5, region_mode="dense", num_regions=4)
    centres = torch.tensor([[1, 1], [2, 4], [3, 2], [1, 3]])
    assert torch.autograd.gradcheck(lambda f: loss_fn(f, vol, part, smp, centres=centres), feats.requires_grad_())


def test_dense_single_window_map_has_no_negatives():
    # a 3x3 map holds one 3x3 window: no anchor has negatives, every pair gives 0 (as in the core), still a graph
    feats = torch.randn(8, 2, 3, 3, requires_grad=True)
    loss = LocalContrastiveLoss("domain", region_mode="dense", num_regions=1)(feats, HB_VOLUME, HB_PARTITION, HB_SAMPLE)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(feats.grad, torch.zeros_like(feats))


def test_dense_memory_layout_dtype_and_no_grad():
    feats = torch.randn(8, 4, 9, 10, generator=torch.Generator().manual_seed(2))
    loss_fn = LocalContrastiveLoss("domain", region_mode="dense", num_regions=7)
    centres = loss_fn.region_centres(9, 10)
    results = []
    for f in (feats, feats.to(memory_format=torch.channels_last), feats.double()):
        f = f.clone().requires_grad_()
        loss = loss_fn(f, HB_VOLUME, HB_PARTITION, HB_SAMPLE, centres=centres)
        loss.backward()
        results.append((loss.detach().double(), f.grad.double()))
    for loss, grad in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad, results[0][1], rtol=1e-4, atol=1e-8)
    with torch.no_grad():
        assert loss_fn(feats, HB_VOLUME, HB_PARTITION, HB_SAMPLE, centres=centres).item() == pytest.approx(
            results[0][0].item(), abs=1e-6
        )


# ------------------------------------------------------------------------------------------------------------------
# stability
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["random", "identical", "large", "zero"])
def test_low_precision_and_degenerate_inputs_are_finite(dtype, kind):
    g = torch.Generator().manual_seed(0)
    make = {
        "random": lambda *s: torch.randn(*s, generator=g),
        "identical": lambda *s: torch.ones(*s),
        "large": lambda *s: (torch.randn(*s, generator=g) * 3e4).clamp(-6e4, 6e4),
        "zero": lambda *s: torch.zeros(*s),
    }[kind]
    emb = make(8, 32).to(dtype).requires_grad_()
    for strategy in GLOBAL_STRATEGIES:
        emb.grad = None
        loss = GlobalContrastiveLoss(strategy, temperature=0.1)(emb, HB_VOLUME, HB_PARTITION, HB_SAMPLE, HB_POSITION)
        loss.backward()
        assert loss.dtype == torch.float32 and torch.isfinite(loss), (strategy, loss)
        assert emb.grad.dtype == dtype and torch.isfinite(emb.grad).all(), strategy
    feats = make(8, 4, 6, 6).to(dtype).requires_grad_()
    for strategy in ("random", "domain"):
        for mode in ("grid", "dense"):
            feats.grad = None
            loss_fn = LocalContrastiveLoss(strategy, 0.1, region_mode=mode, num_regions=5)
            loss = loss_fn(feats, HB_VOLUME, HB_PARTITION, HB_SAMPLE)
            loss.backward()
            assert torch.isfinite(loss) and torch.isfinite(feats.grad).all(), (strategy, mode)


def test_low_precision_close_to_float32():
    emb = torch.randn(8, 32, generator=torch.Generator().manual_seed(1))
    ref = GlobalContrastiveLoss("domain")(emb, HB_VOLUME, HB_PARTITION, HB_SAMPLE)
    half = GlobalContrastiveLoss("domain")(emb.half(), HB_VOLUME, HB_PARTITION, HB_SAMPLE)
    assert half.item() == pytest.approx(ref.item(), rel=1e-2)


# ------------------------------------------------------------------------------------------------------------------
# validation
# ------------------------------------------------------------------------------------------------------------------
def test_core_validation():
    s, m = torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="temperature"):
        contrastive_pair_loss(s, m, m, 0.0)
    with pytest.raises(ValueError, match="positive_mask"):
        contrastive_pair_loss(s, m.float(), m, 0.1)
    with pytest.raises(ValueError, match="negative_mask"):
        contrastive_pair_loss(s, m, m[:, :2], 0.1)
    with pytest.raises(ValueError, match="similarity"):
        contrastive_pair_loss(torch.zeros(6), m, m, 0.1)
    with pytest.raises(ValueError, match="overlap"):
        contrastive_pair_loss(s, ~m, ~m, 0.1)
    with pytest.raises(ValueError, match="reduction"):
        contrastive_pair_loss(s, m, m, 0.1, reduction="max")


def test_module_validation():
    with pytest.raises(ValueError, match="strategy"):
        GlobalContrastiveLoss("simclr")
    with pytest.raises(ValueError, match="temperature"):
        GlobalContrastiveLoss("domain", temperature=-1.0)
    with pytest.raises(ValueError, match="position_threshold"):
        GlobalContrastiveLoss("positional", position_threshold=0.0)
    with pytest.raises(ValueError, match="strategy"):
        LocalContrastiveLoss("domain_minus")
    with pytest.raises(ValueError, match="region_mode"):
        LocalContrastiveLoss(region_mode="sparse")
    with pytest.raises(ValueError, match="num_regions"):
        LocalContrastiveLoss(region_mode="grid", num_regions=12)
    with pytest.raises(ValueError, match="region_size"):
        LocalContrastiveLoss(region_size=0)
    loss = GlobalContrastiveLoss("domain")
    with pytest.raises(ValueError, match="embeddings"):
        loss(torch.randn(8), HB_VOLUME, HB_PARTITION, HB_SAMPLE)
    with pytest.raises(ValueError, match="sample"):
        loss(torch.randn(8, 4), HB_VOLUME, HB_PARTITION, HB_SAMPLE[:6])
    with pytest.raises(ValueError, match="partition"):
        loss(torch.randn(8, 4), HB_VOLUME, HB_PARTITION.float(), HB_SAMPLE)
    with pytest.raises(ValueError, match="position"):
        GlobalContrastiveLoss("positional")(torch.randn(8, 4), HB_VOLUME, HB_PARTITION, HB_SAMPLE)
    local = LocalContrastiveLoss("random", region_mode="dense", num_regions=5)
    with pytest.raises(ValueError, match="num_regions"):
        local(torch.randn(8, 2, 4, 4), HB_VOLUME, HB_PARTITION, HB_SAMPLE)  # only 4 valid positions
    with pytest.raises(ValueError, match="region_size"):
        local(torch.randn(8, 2, 2, 5), HB_VOLUME, HB_PARTITION, HB_SAMPLE)
    with pytest.raises(ValueError, match="features"):
        local(torch.randn(8, 2, 6), HB_VOLUME, HB_PARTITION, HB_SAMPLE)
    with pytest.raises(ValueError, match="centres"):
        local(torch.randn(8, 2, 6, 6), HB_VOLUME, HB_PARTITION, HB_SAMPLE, centres=torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match="distinct"):
        local(torch.randn(8, 2, 6, 6), HB_VOLUME, HB_PARTITION, HB_SAMPLE, centres=torch.tensor([[2, 2], [2, 2]]))
    with pytest.raises(ValueError, match="collide"):
        grid_region_centres(3, 4, 3, 5)
