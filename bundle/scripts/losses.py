"""Global and local contrastive losses (Chaitanya et al., NeurIPS 2020), over one shared vectorised core.

Every strategy is written as "which (anchor, candidate) pairs are positive, which are negative": boolean masks
built from per-image metadata (volume id, partition, sample id, slice position). One function,
:func:`contrastive_pair_loss`, turns a similarity matrix and the two masks into the loss

    l(i, p) = -log( exp(s_ip / t) / ( exp(s_ip / t) + sum_{n in N(i)} exp(s_in / t) ) ),

averaged over all ordered positive pairs (i, p). Each positive sits in the numerator against the negatives of its
anchor only; other positives of the same anchor are not in its denominator. The dense region mode of
:class:`LocalContrastiveLoss` evaluates the same loss without materialising the masks: its negatives (every window
of the anchor's sample) only enter through their log-sum-exp, computed directly from the feature maps.

Metadata conventions (per image of the batch, all 1-D of length N):

- ``volume``: id of the volume the slice comes from.
- ``partition``: index of the slice's partition along z (see :func:`scripts.sampler.partition_of`).
- ``sample``: id of the source slice; the augmented views of one slice share it.
- ``position``: slice position in [0, 1] (``slice / num_slices``), only for the ``"positional"`` strategy.

Distributed training (``gather_distributed=True`` while ``torch.distributed`` is initialised with world size > 1):
each rank passes its own images with *rank-local* ``volume`` and ``sample`` ids; images of different ranks are
always treated as different samples and different volumes (partition and position are global quantities and are
compared across ranks). The embeddings are gathered from all ranks with a gradient-preserving all-gather; the
anchors are this rank's images, the candidates are the images of all ranks. Each rank returns
``world_size * (sum of its pair losses) / (number of positive pairs on all ranks)``, so the mean of the per-rank
losses, which is what DistributedDataParallel's gradient averaging optimises, equals the single-process loss on the
concatenated batch, and so do the averaged parameter gradients. The value a single rank reports is therefore
that rank's share of the global loss (scaled by the world size), not the global loss itself. Every rank must call
the loss and back-propagate it (the all-gather is a collective in both directions).

The local regions' geometry (the grid lattice, the windows) and the dense mode's autograd kernels are in
:mod:`scripts.regions`; the rank / world-size lookup and the gradient-preserving all-gather in
:mod:`scripts.distributed`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from scripts.distributed import all_gather_rows, gather_row_counts, rank_and_world_size
from scripts.errors import BundleError
from scripts.regions import (
    anchor_windows,
    check_centres,
    dense_negative_lse,
    dense_windows,
    grid_order,
    grid_region_centres,
    sample_members,
)

__all__ = [
    "GLOBAL_STRATEGIES",
    "LOCAL_STRATEGIES",
    "REGION_MODES",
    "contrastive_pair_loss",
    "global_pair_masks",
    "local_pair_masks",
    "grid_region_centres",
    "GlobalContrastiveLoss",
    "LocalContrastiveLoss",
]

GLOBAL_STRATEGIES = ("random", "domain_minus", "domain", "positional")
LOCAL_STRATEGIES = ("random", "domain")
REGION_MODES = ("grid", "dense")
REDUCTIONS = ("mean", "sum", "none")


# ----------------------------------------------------------------------------------------------------------------
# the shared core
# ----------------------------------------------------------------------------------------------------------------
def contrastive_pair_loss(
    similarity: Tensor, positive_mask: Tensor, negative_mask: Tensor, temperature: float, reduction: str = "mean"
) -> Tensor:
    """Per-positive-pair InfoNCE loss over a similarity matrix, with positives and negatives given as masks.

    For every positive pair (i, p) (``positive_mask[i, p]``)::

        l(i, p) = -log( exp(s_ip/t) / (exp(s_ip/t) + sum_n exp(s_in/t)) ) = softplus( LSE_n(s_in/t) - s_ip/t )

    where n runs over ``negative_mask[i]``. The log-sum-exp over the negatives is shifted by its row maximum and
    everything is computed in float32 (float64 input stays float64), so fp16/bf16 input, identical embeddings and
    very large logits give finite values and gradients. An anchor without negatives gives l = 0 for its pairs.

    Args:
        similarity: (A, N) similarities of A anchors against N candidates (any float dtype).
        positive_mask: (A, N) bool, True where (anchor, candidate) is a positive pair.
        negative_mask: (A, N) bool, True where the candidate is a negative of the anchor; disjoint from the positives.
        temperature: t > 0.
        reduction: ``"mean"`` (average over all positive pairs; 0 when there are none), ``"sum"`` (sum over all
            positive pairs; divide by ``positive_mask.sum()`` yourself, e.g. after an all-reduce) or ``"none"``
            (the (A, N) matrix of l(i, p), zero where ``positive_mask`` is False).

    Returns:
        a scalar (``"mean"``/``"sum"``) or an (A, N) tensor (``"none"``), float32 (float64 for float64 input).

    Example::

        >>> s = torch.tensor([[1.0, 0.2, 0.9]])
        >>> pos, neg = torch.tensor([[True, False, False]]), torch.tensor([[False, True, True]])
        >>> contrastive_pair_loss(s, pos, neg, temperature=0.1)  # -log(e^10 / (e^10 + e^2 + e^9))
        tensor(0.3135)
    """
    if not isinstance(similarity, Tensor) or similarity.ndim != 2 or not similarity.is_floating_point():
        raise ValueError(
            f"similarity must be a 2-D floating point tensor (A, N), got "
            f"{getattr(similarity, 'dtype', type(similarity))} of shape {tuple(getattr(similarity, 'shape', ()))}."
        )
    for name, mask in (("positive_mask", positive_mask), ("negative_mask", negative_mask)):
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.shape != similarity.shape:
            raise ValueError(
                f"{name} must be a bool tensor of the similarity's shape {tuple(similarity.shape)}, got "
                f"{getattr(mask, 'dtype', type(mask))} of shape {tuple(getattr(mask, 'shape', ()))}."
            )
    _check_temperature(temperature)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}.")
    if bool((positive_mask & negative_mask).any()):
        raise ValueError("positive_mask and negative_mask overlap: a pair cannot be both positive and negative.")

    logits = similarity.to(torch.promote_types(similarity.dtype, torch.float32)) / temperature
    has_negative = negative_mask.any(dim=1, keepdim=True)
    negative_logits = logits.masked_fill(~negative_mask, float("-inf"))
    shift = negative_logits.amax(dim=1, keepdim=True).detach()
    shift = torch.where(has_negative, shift, torch.zeros_like(shift))
    sum_exp = torch.exp(negative_logits - shift).sum(dim=1, keepdim=True)
    # rows without negatives: log(1) instead of log(0) keeps the backward pass finite; their pairs are zeroed below
    negative_lse = shift + torch.log(torch.where(has_negative, sum_exp, torch.ones_like(sum_exp)))
    pair_loss = F.softplus(negative_lse - logits)
    pair_loss = torch.where(positive_mask & has_negative, pair_loss, torch.zeros_like(pair_loss))
    if reduction == "none":
        return pair_loss
    total = pair_loss.sum()
    if reduction == "sum":
        return total
    return total / positive_mask.sum().clamp(min=1)


# ----------------------------------------------------------------------------------------------------------------
# masks from metadata
# ----------------------------------------------------------------------------------------------------------------
def _pair_masks(
    strategy: str,
    anchor_meta: dict[str, Tensor],
    candidate_meta: dict[str, Tensor],
    anchor_index: Tensor,
    position_threshold: float,
) -> tuple[Tensor, Tensor]:
    """(A, N) positive and negative masks of A anchors vs N candidates; anchor i is candidate ``anchor_index[i]``."""

    def same(key: str) -> Tensor:
        return anchor_meta[key][:, None] == candidate_meta[key][None, :]

    candidate_index = torch.arange(candidate_meta["sample"].shape[0], device=anchor_index.device)
    not_self = candidate_index[None, :] != anchor_index[:, None]
    same_sample = same("sample")
    if strategy in ("random", "domain_minus"):
        positive = same_sample & not_self
        negative = ~same_sample
        if strategy == "domain_minus":
            negative = negative & ~(same("partition") & ~same("volume"))
        return positive, negative
    if strategy == "domain":
        related = same_sample | same("partition")
    elif strategy == "positional":
        distance = (anchor_meta["position"][:, None] - candidate_meta["position"][None, :]).abs()
        related = same_sample | (distance < position_threshold)
    else:  # guarded by the callers
        raise BundleError(f"unknown global strategy {strategy!r} (pretrain.yaml: global#strategy); choose one of "
                          f"{', '.join(GLOBAL_STRATEGIES)}.")
    return related & not_self, ~related & not_self


def global_pair_masks(
    strategy: str,
    volume: Tensor,
    partition: Tensor,
    sample: Tensor,
    position: Tensor | None = None,
    position_threshold: float = 0.35,
) -> tuple[Tensor, Tensor]:
    """Which images are positives and negatives of which, for a global strategy (row = anchor, column = candidate).

    ``j != i`` always (an image is never its own positive or negative), and:

    - ``"random"`` (G^R, SimCLR): positive iff same sample (the other views of the slice); negative otherwise.
    - ``"domain_minus"`` (G^D-): positives as ``"random"``; negatives = all other images except those of the
      same partition from other volumes.
    - ``"domain"`` (G^D): positive iff same partition (any volume, i.e. the same-partition slices of the other
      volumes and their views, plus the anchor's own other views) or same sample; negative otherwise (other
      partitions).
    - ``"positional"`` (PCL-like, beyond the paper): positive iff ``|position_i - position_j| < position_threshold``
      (or same sample); negative otherwise.

    Args:
        strategy: one of ``GLOBAL_STRATEGIES``.
        volume, partition, sample: (N,) integer metadata (see the module docstring).
        position: (N,) float slice positions in [0, 1]; required for ``"positional"``.
        position_threshold: positional threshold (> 0), PCL's 0.35.

    Returns:
        ``(positive_mask, negative_mask)``, each (N, N) bool.

    Example::

        >>> # 2 volumes x 2 partitions x 2 views; item = 4 * volume + 2 * partition + view
        >>> v = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]); p = torch.tensor([0, 0, 1, 1, 0, 0, 1, 1])
        >>> pos, neg = global_pair_masks("domain", v, p, sample=2 * v + p)
        >>> pos[0].nonzero().flatten().tolist(), neg[0].nonzero().flatten().tolist()
        ([1, 4, 5], [2, 3, 6, 7])
    """
    _check_global_args(strategy, position_threshold)
    n = _check_length("volume", volume, None)
    meta = _metadata(volume, partition, sample, position if strategy == "positional" else None, n, strategy)
    return _pair_masks(strategy, meta, meta, torch.arange(n, device=meta["sample"].device), position_threshold)


def local_pair_masks(
    strategy: str, volume: Tensor, partition: Tensor, sample: Tensor, num_regions: int
) -> tuple[Tensor, Tensor]:
    """Positive and (grid-mode) negative masks over the anchor regions of a local strategy.

    Region ``(i, k)`` (image i, anchor position k) has index ``i * K + k``. A pair of regions is positive iff it is
    the same position k in two different images i != j that are

    - ``"random"`` (L^R): views of the same sample;
    - ``"domain"`` (L^D): views of the same sample, or images of the same partition (in a partition-aware batch:
      the same-partition slices of the other volumes and their views).

    Negatives (``"grid"`` mode, both strategies): the regions at the other anchor positions k' != k of the anchor's
    own sample, in every view of it (the anchor's own image included). In ``"dense"`` mode
    :class:`LocalContrastiveLoss` replaces these by every other valid window position of the own sample's views.

    Args:
        strategy: one of ``LOCAL_STRATEGIES``.
        volume, partition, sample: (N,) integer metadata.
        num_regions: K, anchor positions per image.

    Returns:
        ``(positive_mask, negative_mask)``, each (N*K, N*K) bool.

    Example::

        >>> v = torch.tensor([0, 0, 1, 1]); p = torch.tensor([0, 0, 0, 0])
        >>> pos, neg = local_pair_masks("domain", v, p, sample=v, num_regions=2)
        >>> pos[0].nonzero().flatten().tolist(), neg[0].nonzero().flatten().tolist()  # region (0, 0)
        ([2, 4, 6], [1, 3])
    """
    _check_local_strategy(strategy)
    if not isinstance(num_regions, int) or num_regions < 1:
        raise ValueError(f"num_regions must be a positive int, got {num_regions!r}.")
    n = _check_length("volume", volume, None)
    meta = _metadata(volume, partition, sample, None, n, strategy)
    anchor_index = torch.arange(n, device=meta["sample"].device)
    image_positive, same_sample = _local_image_relations(strategy, meta, meta, anchor_index)
    return _expand_to_regions(image_positive, same_sample, num_regions)


def _local_image_relations(strategy, anchor_meta, candidate_meta, anchor_index) -> tuple[Tensor, Tensor]:
    """(A, N) image-level positives of a local strategy (those of global random / domain) and same-sample masks."""
    image_positive, _ = _pair_masks(strategy, anchor_meta, candidate_meta, anchor_index, 0.0)
    same_sample = anchor_meta["sample"][:, None] == candidate_meta["sample"][None, :]
    return image_positive, same_sample


def _expand_to_regions(image_positive: Tensor, same_sample: Tensor, num_regions: int) -> tuple[Tensor, Tensor]:
    """Image-level (A, N) relations -> region-level (A*K, N*K) masks: positives at k == k', negatives at k != k'."""
    a, n = image_positive.shape
    same_position = torch.eye(num_regions, dtype=torch.bool, device=image_positive.device)
    positive = image_positive[:, None, :, None] & same_position[None, :, None, :]
    negative = same_sample[:, None, :, None] & ~same_position[None, :, None, :]
    shape = (a * num_regions, n * num_regions)
    return positive.reshape(shape), negative.reshape(shape)


# ----------------------------------------------------------------------------------------------------------------
# the loss modules
# ----------------------------------------------------------------------------------------------------------------
class GlobalContrastiveLoss(nn.Module):
    """Global contrastive loss on image embeddings (the encoder + g1 stage), strategies G^R, G^D-, G^D, positional.

    Positives/negatives per strategy: see :func:`global_pair_masks`. The loss is the mean over all ordered positive
    pairs of :func:`contrastive_pair_loss` on the cosine similarities.

    Args:
        strategy: ``"random"`` (G^R), ``"domain_minus"`` (G^D-), ``"domain"`` (G^D, default) or ``"positional"``.
        temperature: t (the paper: 0.1).
        position_threshold: ``"positional"`` only: positive iff the slice positions differ by less (PCL: 0.35).
        gather_distributed: under torch.distributed with world size > 1, contrast against the images of all ranks
            (see the module docstring for the id conventions and the normalisation).

    Forward:
        embeddings (N, F) any float dtype (L2-normalised inside, in float32); volume, partition, sample (N,) integer;
        position (N,) float, required for ``"positional"`` and ignored otherwise. Returns a scalar.

    Example::

        >>> loss = GlobalContrastiveLoss("domain", temperature=0.1)
        >>> v = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]); p = torch.tensor([0, 0, 1, 1, 0, 0, 1, 1])
        >>> loss(torch.randn(8, 128), volume=v, partition=p, sample=2 * v + p).shape
        torch.Size([])
    """

    def __init__(self, strategy: str = "domain", temperature: float = 0.1, position_threshold: float = 0.35,
                 gather_distributed: bool = True):
        super().__init__()
        _check_global_args(strategy, position_threshold)
        _check_temperature(temperature)
        self.strategy, self.temperature = strategy, float(temperature)
        self.position_threshold, self.gather_distributed = float(position_threshold), bool(gather_distributed)

    def forward(
        self, embeddings: Tensor, volume: Tensor, partition: Tensor, sample: Tensor, position: Tensor | None = None
    ) -> Tensor:
        _check_float_tensor("embeddings", embeddings, "(N, F)")
        n = embeddings.shape[0]
        position = position if self.strategy == "positional" else None
        meta = _metadata(volume, partition, sample, position, n, self.strategy)
        z = F.normalize(_as_compute_dtype(embeddings), dim=1)
        rank, world = _distributed_world(self.gather_distributed)
        candidates, candidate_meta, offset = _gather_batch(z, meta, rank, world)
        anchor_meta = _globalise_ids(meta, torch.full_like(meta["sample"], rank), world)
        anchor_index = offset + torch.arange(n, device=z.device)
        positive, negative = _pair_masks(
            self.strategy, anchor_meta, candidate_meta, anchor_index, self.position_threshold
        )
        total = contrastive_pair_loss(z @ candidates.T, positive, negative, self.temperature, reduction="sum")
        return _normalise(total, positive.sum(), world)


class LocalContrastiveLoss(nn.Module):
    """Local contrastive loss on projected decoder feature maps (the d_l + g2 stage), strategies L^R and L^D.

    A region is the ``region_size`` x ``region_size`` window centred at a position; its vector is the flattened
    (C * r * r) window, compared by cosine similarity. All images of the batch use the same K anchor positions:

    - ``region_mode="grid"``: the fixed quincunx lattice of :func:`grid_region_centres` (K = 13: the paper's
      positions). Negatives of the anchor region (i, k) = the regions at the other K-1 anchor positions in every
      view of the anchor's sample (own image included); all of them, no neighbour cut.
    - ``region_mode="dense"``: K = ``num_regions`` distinct positions drawn uniformly from the valid area once per
      call with torch's global RNG (reproducible with ``torch.manual_seed``; pass ``centres`` to fix them).
      Negatives of (i, k) = the regions at *every* other valid position (all (H-r+1)(W-r+1) of them except the
      anchor's) in every view of the anchor's sample.

    Positives of (i, k) (both modes) = the region at the same position k in

    - ``"random"`` (L^R): the other views of the same sample;
    - ``"domain"`` (L^D): the other views of the same sample and the images of the same partition (in a
      partition-aware batch: the same-partition slices of the other volumes and their views).

    The negatives of L^D are those of L^R (own sample only); regions of other images are never negatives.
    The views of one sample must be intensity-only augmentations (so positions correspond) and, under DDP, live on
    the same rank. With ``gather_distributed`` under world size > 1, ``"domain"`` gathers the anchor regions of all
    ranks (``"random"`` needs none: nothing crosses samples) and both normalise as described in the module docstring;
    in dense mode the positions are broadcast from rank 0 so all ranks use the same ones.

    Cost: grid mode builds the (N*K) x (N*K) region similarity and masks of :func:`local_pair_masks` (candidates:
    the images of all ranks for L^D) and runs :func:`contrastive_pair_loss`. Dense mode never builds them: the
    positives are K per-position image x image products, and the negatives of all anchors come from the correlation
    of every image's map with the V*K normalised anchor windows of its sample (V = most views of a sample), as r*r
    shifted batched matmuls (about 2 * N * V*K * C*r*r * H*W flops forward, twice that backward) reduced to
    per-anchor log-sum-exps; memory O(N * V*K * H*W), not O((N*K)^2).
    Everything runs in float32 (float64 stays float64) whatever the input dtype.

    Args:
        strategy: ``"random"`` (L^R, default) or ``"domain"`` (L^D).
        temperature: t (the paper: 0.1).
        region_size: r, window side (the paper: 3).
        region_mode: ``"grid"`` (default) or ``"dense"``.
        num_regions: K (the paper: 13; in grid mode one of 1, 5, 13, 25, 41, ...).
        gather_distributed: see above.

    Forward:
        features (N, C, H, W) any float dtype; volume, partition, sample (N,) integer; ``centres`` optional (K, 2)
        long (row, column) window centres overriding the mode's positions. Returns a scalar. The centres used last
        are kept in ``self.last_centres``.

    Example::

        >>> loss = LocalContrastiveLoss("random", region_mode="dense", num_regions=8)
        >>> s = torch.tensor([0, 1, 0, 1])  # 2 slices x 2 views
        >>> loss(torch.randn(4, 16, 12, 12), volume=s, partition=torch.zeros(4, dtype=torch.long), sample=s).shape
        torch.Size([])
    """

    def __init__(self, strategy: str = "random", temperature: float = 0.1, region_size: int = 3,
                 region_mode: str = "grid", num_regions: int = 13, gather_distributed: bool = False):
        super().__init__()
        _check_local_strategy(strategy)
        _check_temperature(temperature)
        if not isinstance(region_size, int) or region_size < 1:
            raise ValueError(f"region_size must be a positive int, got {region_size!r}.")
        if region_mode not in REGION_MODES:
            raise ValueError(f"region_mode must be one of {REGION_MODES}, got {region_mode!r}.")
        if not isinstance(num_regions, int) or num_regions < 1:
            raise ValueError(f"num_regions must be a positive int, got {num_regions!r}.")
        if region_mode == "grid":
            grid_order(num_regions)
        self.strategy, self.temperature, self.region_size = strategy, float(temperature), region_size
        self.region_mode, self.num_regions, self.gather_distributed = region_mode, num_regions, bool(gather_distributed)
        self.last_centres: Tensor | None = None

    def region_centres(self, height: int, width: int, device: torch.device | str | None = None) -> Tensor:
        """(K, 2) long window centres for a (height, width) map: the grid, or a fresh random draw in dense mode."""
        if self.region_mode == "grid":
            return grid_region_centres(height, width, self.region_size, self.num_regions).to(device)
        rows, cols = height - self.region_size + 1, width - self.region_size + 1
        if rows < 1 or cols < 1:
            raise ValueError(f"the feature map ({height}x{width}) is smaller than region_size={self.region_size}.")
        if self.num_regions > rows * cols:
            raise ValueError(f"num_regions={self.num_regions} exceeds the {rows * cols} valid positions of the map.")
        flat = torch.randperm(rows * cols)[: self.num_regions]
        half = self.region_size // 2
        return torch.stack([flat // cols + half, flat % cols + half], dim=1).to(device)

    def forward(
        self, features: Tensor, volume: Tensor, partition: Tensor, sample: Tensor, centres: Tensor | None = None
    ) -> Tensor:
        _check_float_tensor("features", features, "(N, C, H, W)")
        n, _, height, width = features.shape
        r, half = self.region_size, self.region_size // 2
        rows, cols = height - r + 1, width - r + 1
        if rows < 1 or cols < 1:
            raise ValueError(f"the feature map ({height}x{width}) is smaller than region_size={r}.")
        meta = _metadata(volume, partition, sample, None, n, self.strategy)
        rank, world = _distributed_world(self.gather_distributed)
        if centres is None:
            centres = self.region_centres(height, width, features.device)
            if world > 1 and self.region_mode == "dense":
                dist.broadcast(centres, src=0)
        centres = check_centres(centres, height, width, r).to(features.device)
        self.last_centres = centres
        k = centres.shape[0]

        x = _as_compute_dtype(features)
        top_left = centres - half
        dense = self.region_mode == "dense" and rows * cols > 1  # a single window: no dense negatives at all
        if dense:
            members, valid, rank_in_sample = sample_members(meta["sample"])  # (N, V), (N, V), (N,)
            anchors, dots, window_sq = dense_windows(x, top_left, members, r)
        else:
            anchors = anchor_windows(x, top_left, r)  # (N, K, C*r*r)

        # anchor regions vs the anchor regions of all images: positives in both modes, negatives in grid mode
        anchor_meta = _globalise_ids(meta, torch.full_like(meta["sample"], rank), world)
        if self.strategy == "domain":
            candidates, candidate_meta, offset = _gather_batch(anchors.reshape(n, -1), meta, rank, world)
            candidates = candidates.reshape(-1, k, anchors.shape[2])
        else:  # L^R never pairs different samples: nothing to gather
            candidates, candidate_meta, offset = anchors, anchor_meta, 0
        anchor_index = offset + torch.arange(n, device=x.device)
        image_positive, same_sample = _local_image_relations(self.strategy, anchor_meta, candidate_meta, anchor_index)

        if self.region_mode == "grid":
            positive, negative = _expand_to_regions(image_positive, same_sample, k)
            similarity = anchors.reshape(n * k, -1) @ candidates.reshape(-1, anchors.shape[2]).T
            total = contrastive_pair_loss(similarity, positive, negative, self.temperature, reduction="sum")
            return _normalise(total, positive.sum(), world)

        # dense mode: the per-pair loss of contrastive_pair_loss without building the (N*K) x (N*K + V*P) similarity
        # and masks: positives only pair equal positions (K per-position image x image products), and each anchor's
        # negatives (every other window of its sample's views) only enter through their log-sum-exp
        positive_logits = torch.bmm(anchors.transpose(0, 1), candidates.permute(1, 2, 0)) / self.temperature
        if dense:
            negative_lse = dense_negative_lse(
                dots, window_sq, members, valid, rank_in_sample, top_left, width, r, self.temperature
            )
            pair_loss = F.softplus(negative_lse.T[:, :, None] - positive_logits)  # (K, N, N_all)
            total = torch.where(image_positive[None, :, :], pair_loss, torch.zeros_like(pair_loss)).sum()
        else:  # a single window: no anchor has negatives, every pair gives 0 (as in the core), graph kept
            nothing = torch.zeros_like(positive_logits, dtype=torch.bool)
            total = torch.where(nothing, positive_logits, torch.zeros_like(positive_logits)).sum()
        return _normalise(total, image_positive.sum() * k, world)


# ----------------------------------------------------------------------------------------------------------------
# helpers: validation, metadata, distributed
# ----------------------------------------------------------------------------------------------------------------


def _check_float_tensor(name: str, value, shape: str) -> None:
    """Raise ValueError unless ``value`` is a float tensor with as many dimensions as ``shape`` (e.g. "(N, F)")."""
    ndim = shape.count(",") + 1
    if not isinstance(value, Tensor) or value.ndim != ndim or not value.is_floating_point():
        raise ValueError(f"{name} must be a {ndim}-D float tensor {shape}, got {getattr(value, 'dtype', type(value))}"
                         f" of shape {tuple(getattr(value, 'shape', ()))}.")


def _check_temperature(temperature) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 < temperature < float("inf"):
        raise BundleError(f"temperature must be a positive finite number, got {temperature!r} "
                          "(pretrain.yaml: global#temperature / local#temperature).")


def _check_global_args(strategy, position_threshold) -> None:
    if strategy not in GLOBAL_STRATEGIES:
        raise BundleError(f"unknown global strategy {strategy!r} (pretrain.yaml: global#strategy); choose one of "
                          f"{', '.join(GLOBAL_STRATEGIES)}.")
    number = isinstance(position_threshold, (int, float)) and not isinstance(position_threshold, bool)
    if not number or not position_threshold > 0:
        raise BundleError(f"position_threshold must be a positive number, got {position_threshold!r} "
                          "(pretrain.yaml: global#position_threshold).")


def _check_local_strategy(strategy) -> None:
    if strategy not in LOCAL_STRATEGIES:
        raise BundleError(f"unknown local strategy {strategy!r} (pretrain.yaml: local#strategy); choose one of "
                          f"{', '.join(LOCAL_STRATEGIES)}.")


def _check_length(name: str, value, n: int | None) -> int:
    if not isinstance(value, Tensor) or value.ndim != 1 or (n is not None and value.shape[0] != n):
        expected = "(N,)" if n is None else f"({n},)"
        raise ValueError(f"{name} must be a 1-D tensor of shape {expected}, got {tuple(getattr(value, 'shape', ()))}.")
    return value.shape[0]


def _metadata(volume, partition, sample, position, n: int, strategy: str) -> dict[str, Tensor]:
    meta = {}
    for name, value in (("volume", volume), ("partition", partition), ("sample", sample)):
        _check_length(name, value, n)
        if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
            raise ValueError(f"{name} must hold integer ids, got dtype {value.dtype}.")
        meta[name] = value.long()
    if strategy == "positional":
        if position is None:
            raise ValueError("position is required for strategy 'positional', got None.")
        _check_length("position", position, n)
        meta["position"] = position.to(torch.float64)
    return meta


def _as_compute_dtype(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _distributed_world(enabled: bool) -> tuple[int, int]:
    """(rank, world size) when gathering is enabled and torch.distributed runs with world size > 1, else (0, 1)."""
    if enabled:
        rank, world = rank_and_world_size()
        if world > 1:
            return rank, world
    return 0, 1


def _globalise_ids(meta: dict[str, Tensor], rank: Tensor, world: int) -> dict[str, Tensor]:
    """Rank-local volume/sample ids -> ids unique across ranks: id * world + rank (injective for 0 <= rank < world)."""
    if world == 1:
        return meta
    out = dict(meta)
    out["volume"] = meta["volume"] * world + rank
    out["sample"] = meta["sample"] * world + rank
    return out


def _gather_batch(z: Tensor, meta: dict[str, Tensor], rank: int, world: int) -> tuple[Tensor, dict[str, Tensor], int]:
    """Candidates of all ranks: (z gathered with gradient, metadata gathered with global ids, this rank's offset)."""
    if world == 1:
        return z, meta, 0
    counts = gather_row_counts(z.shape[0], world, z.device)
    gathered = all_gather_rows(z, counts, rank)
    keys = [key for key in ("volume", "partition", "sample") if key in meta]
    all_ids = all_gather_rows(torch.stack([meta[key] for key in keys], dim=1), counts, rank)
    candidate_meta = {key: all_ids[:, i] for i, key in enumerate(keys)}
    if "position" in meta:
        candidate_meta["position"] = all_gather_rows(meta["position"], counts, rank)
    owner = torch.repeat_interleave(torch.arange(world, device=z.device), torch.tensor(counts, device=z.device))
    return gathered, _globalise_ids(candidate_meta, owner, world), sum(counts[:rank])


def _normalise(total: Tensor, num_positive: Tensor, world: int) -> Tensor:
    """Local pair-loss sum -> this rank's loss, such that the mean over ranks is the loss on the whole batch."""
    if world == 1:
        return total / num_positive.clamp(min=1)
    num_positive = num_positive.to(total.dtype).reshape(1).clone()
    dist.all_reduce(num_positive)
    return total * world / num_positive.clamp(min=1)[0]
