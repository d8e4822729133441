"""The local contrastive loss's regions: where the anchors sit, how windows are cut, and the dense-mode kernels.

A region is the r x r window of a feature map (N, C, H, W) centred at a (row, column) position; with ``top_left =
centre - r // 2`` it covers rows ``top_left[0] .. top_left[0] + r - 1`` (likewise columns). This module holds

- the geometry: the ``"grid"`` mode's fixed quincunx lattice (:func:`grid_region_centres`, :func:`grid_order`) and
  the check of caller-given centres (:func:`check_centres`);
- the grid mode's windows as L2-normalised vectors (:func:`anchor_windows`);
- the ``"dense"`` mode's two custom autograd kernels, which contrast every anchor window with *every* window of the
  own sample's views without unfolding the maps (:func:`dense_windows`, then :func:`dense_negative_lse`), and the
  per-image list of its sample's images they index with (:func:`sample_members`).

:class:`scripts.losses.LocalContrastiveLoss` composes them with the pair masks and the shared core of
:mod:`scripts.losses`; nothing here knows about strategies or torch.distributed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "grid_region_centres",
    "grid_order",
    "check_centres",
    "anchor_windows",
    "sample_members",
    "dense_windows",
    "dense_negative_lse",
]


# ----------------------------------------------------------------------------------------------------------------
# geometry
# ----------------------------------------------------------------------------------------------------------------
def grid_region_centres(height: int, width: int, region_size: int, num_regions: int = 13) -> Tensor:
    """The fixed anchor positions of ``"grid"`` mode: a centred-square (quincunx) lattice over the valid area.

    The valid area holds the window centres whose ``region_size`` x ``region_size`` window fits in the map: rows
    ``r//2 .. height - r + r//2`` (likewise columns). With g = the lattice order, the anchors are the g x g points
    at fractions ``0, 1/(g-1), ..., 1`` of the valid extent in each direction plus the (g-1) x (g-1) cell centres,
    so ``num_regions = g**2 + (g-1)**2``: 1, 5, 13 (the paper: 3 x 3 corners/edges/centre + 2 x 2 at 1/4, 3/4),
    25, 41, ... Fractions are rounded to the nearest integer position.

    Args:
        height, width: feature-map size.
        region_size: r, window side.
        num_regions: K, one of ``g**2 + (g-1)**2``.

    Returns:
        (K, 2) long tensor of (row, column) window centres, corner lattice first, in row-major order.

    Example::

        >>> grid_region_centres(48, 48, 3, 13)[:4].tolist()
        [[1, 1], [1, 24], [1, 46], [24, 1]]
    """
    if not isinstance(region_size, int) or region_size < 1:
        raise ValueError(f"region_size must be a positive int, got {region_size!r}.")
    if height < region_size or width < region_size:
        raise ValueError(f"the feature map ({height}x{width}) is smaller than region_size={region_size}.")
    order = grid_order(num_regions)
    if order == 1:
        corner, middle = torch.tensor([0.5], dtype=torch.float64), torch.zeros(0, dtype=torch.float64)
    else:
        corner = torch.arange(order, dtype=torch.float64) / (order - 1)
        middle = (torch.arange(order - 1, dtype=torch.float64) + 0.5) / (order - 1)
    half = region_size // 2

    def lattice(fractions: Tensor) -> Tensor:
        rows = half + torch.floor(fractions * (height - region_size) + 0.5).long()
        cols = half + torch.floor(fractions * (width - region_size) + 0.5).long()
        return torch.cartesian_prod(rows, cols).reshape(-1, 2)

    centres = torch.cat([lattice(corner), lattice(middle)])
    if torch.unique(centres, dim=0).shape[0] != num_regions:
        raise ValueError(
            f"num_regions={num_regions} grid positions collide on a {height}x{width} map with region_size="
            f"{region_size}; use fewer regions."
        )
    return centres


def grid_order(num_regions) -> int:
    """g with num_regions == g**2 + (g-1)**2, else ValueError."""
    order = 1
    while isinstance(num_regions, int) and order**2 + (order - 1) ** 2 < num_regions:
        order += 1
    if isinstance(num_regions, bool) or not isinstance(num_regions, int) or order**2 + (order - 1) ** 2 != num_regions:
        allowed = [g**2 + (g - 1) ** 2 for g in range(1, 6)]
        raise ValueError(f"num_regions must be g**2 + (g-1)**2 ({allowed}, ...) in 'grid' mode, got {num_regions!r}.")
    return order


def anchor_windows(x: Tensor, top_left: Tensor, region_size: int) -> Tensor:
    """(N, K, C*r*r) L2-normalised anchor windows (flattened in (c, dy, dx) order) with top-left corners top_left."""
    n, k, r = x.shape[0], top_left.shape[0], region_size
    offsets = torch.arange(r, device=x.device)
    win_rows = top_left[:, 0, None, None] + offsets[None, :, None]  # (K, r, 1)
    win_cols = top_left[:, 1, None, None] + offsets[None, None, :]  # (K, 1, r)
    windows = x[:, :, win_rows, win_cols]  # (N, C, K, r, r)
    return F.normalize(windows.permute(0, 2, 1, 3, 4).reshape(n, k, -1), dim=2)


def check_centres(centres, height: int, width: int, region_size: int) -> Tensor:
    """``centres`` as a (K, 2) long tensor, after checking that it is (K, 2) with K >= 1, that every ``region_size``
    window it centres lies inside the ``height`` x ``width`` map, and that the positions are distinct (else
    ValueError)."""
    if not isinstance(centres, Tensor) or centres.ndim != 2 or centres.shape[1] != 2 or centres.shape[0] < 1:
        shape = tuple(getattr(centres, "shape", ()))
        raise ValueError(f"centres must be a (K, 2) tensor of (row, column), got shape {shape}.")
    centres = centres.long()
    half = region_size // 2
    low = centres.min(dim=0).values - half
    high = centres.max(dim=0).values - half + region_size
    if bool((low < 0).any()) or high[0] > height or high[1] > width:
        raise ValueError(f"centres must keep the {region_size}x{region_size} window inside the {height}x{width} map.")
    if torch.unique(centres, dim=0).shape[0] != centres.shape[0]:
        raise ValueError("centres must be distinct positions.")
    return centres


# ----------------------------------------------------------------------------------------------------------------
# dense mode: anchors vs every window of the own sample's views
# ----------------------------------------------------------------------------------------------------------------
def sample_members(sample: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The images of each image's sample: (N, V) indices in increasing order (padded with the first), (N, V)
    validity, and (N,) the position of each image in its own list (V = most views of any sample)."""
    same = sample[:, None] == sample[None, :]
    counts = same.sum(dim=1)
    width = int(counts.max())
    order = torch.argsort((~same).to(torch.int8), dim=1, stable=True)[:, :width]
    valid = torch.arange(width, device=sample.device)[None, :] < counts[:, None]
    members = torch.where(valid, order, order[:, :1])
    itself = members == torch.arange(sample.shape[0], device=sample.device)[:, None]
    rank_in_sample = itself.to(torch.int8).argmax(dim=1)
    return members, valid, rank_in_sample


class _DenseWindows(torch.autograd.Function):
    """Everything dense mode needs from the feature maps, in one pass whose backward writes one map-sized gradient.

    Forward ``(x, top_left, members, region_size)`` with x (N, C, H, W) in the compute dtype, returns

    - ``anchors`` (N, K, C*r*r): the L2-normalised anchor windows (exactly ``anchor_windows``);
    - ``dots`` (N, V*K, L): ``dots[m, v*K + k, p]`` = anchors[members[m, v], k] . (the r x r window of image m
      whose top-left pixel is the row-major flat position p), i.e. every image's windows against the anchors of
      every image of its sample (``members`` (N, V), see :func:`sample_members`);
    - ``window_sq`` (N, L): the squared norm of that window.

    Flat positions p < L = (H-r)*W + (W-r) + 1 cover every window plus r-1 wrapped-around ones per row
    (p % W > W - r; their ``window_sq`` is 1) that the caller must ignore. The window at p covers p + dy*W + dx,
    so ``dots`` is a sum over the r*r offsets o = dy*W + dx of (V*K, C) @ (C, L) matmuls of the kernels with the
    strided view ``x[n, :, o : o + L]``, batched over the images: no unfolded copy of the map and no grouped
    convolution. The backward pass runs the same matmuls against the zero-padded output gradient (for x) and the
    same views (for the kernels), and adds the gradients of the window norms, of the anchor windows (through the
    normalisation, as ``F.normalize`` differentiates it) and of their gather into that one gradient in place.
    Once differentiable (no double backward).
    """

    @staticmethod
    def forward(ctx, x: Tensor, top_left: Tensor, members: Tensor, region_size: int):
        n, channels, height, width = x.shape
        k, views, r = top_left.shape[0], members.shape[1], region_size
        rows, cols = height - r + 1, width - r + 1
        flat = x.contiguous().reshape(n, channels, height * width)
        shifts = [dy * width + dx for dy in range(r) for dx in range(r)]
        length = (rows - 1) * width + cols
        # anchor windows: the pixels top_left + offset of every anchor, (N, K, C, r*r) -> normalised as F.normalize
        corner = top_left[:, 0] * width + top_left[:, 1]
        pixels = (corner[:, None] + torch.tensor(shifts, device=x.device)[None, :]).reshape(-1)  # (K*r*r,)
        windows = flat[:, :, pixels].reshape(n, channels, k, r * r).permute(0, 2, 1, 3).reshape(n, k, -1)
        norm = torch.linalg.vector_norm(windows, dim=2, keepdim=True)
        denom = norm.clamp_min(1e-12)
        anchors = windows / denom
        # kernels of image m: the anchors of its sample's images, offset-major (r*r, N, V*K, C)
        kernels = anchors.reshape(n, k, channels, r * r).permute(3, 0, 1, 2)[:, members]  # (r*r, N, V, K, C)
        kernels = kernels.reshape(r * r, n, views * k, channels).contiguous()  # batched matmuls need plain strides
        dots = flat.new_empty(n, views * k, length)
        for o, shift in enumerate(shifts):
            dots.baddbmm_(kernels[o], flat[:, :, shift : shift + length], beta=1 if o else 0)
        # sum of squares over the channels, a few images at a time (no map-sized temporary)
        chunk = max(1, (1 << 19) // flat[0].numel())
        pixel_sq = torch.cat([(part * part).sum(dim=1) for part in flat.split(chunk)])
        window_sq = F.avg_pool2d(pixel_sq.reshape(n, 1, height, width), r, 1, divisor_override=1)
        window_sq = F.pad(window_sq, (0, r - 1), value=1.0).reshape(n, rows * width)[:, :length]
        ctx.save_for_backward(flat, kernels, anchors, norm, denom, members, pixels)
        ctx.geometry = (n, channels, height, width, k, views, r, shifts, length)
        return anchors, dots, window_sq

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_anchors: Tensor, grad_dots: Tensor, grad_window_sq: Tensor):
        flat, kernels, anchors, norm, denom, members, pixels = ctx.saved_tensors
        n, channels, height, width, k, views, r, shifts, length = ctx.geometry
        rows, cols = height - r + 1, width - r + 1
        grad_dots = grad_dots.contiguous()
        # kernels: (C, L) @ (L, V*K) per offset, then summed onto the anchors they were copied from
        grad_kernels = flat.new_empty(r * r, n, channels, views * k)
        for o, shift in enumerate(shifts):
            grad_kernels[o].baddbmm_(flat[:, :, shift : shift + length], grad_dots.transpose(1, 2), beta=0)
        grad_kernels = grad_kernels.reshape(r * r, n, channels, views, k).permute(1, 3, 4, 2, 0)
        grad_anchors = grad_anchors.contiguous().clone()
        grad_anchors.index_add_(0, members.reshape(-1), grad_kernels.reshape(n * views, k, -1))
        # through anchors = windows / max(|windows|, eps)
        radial = (anchors * grad_anchors).sum(dim=2, keepdim=True) * (norm >= 1e-12)
        grad_windows = (grad_anchors - anchors * radial) / denom
        # x: the transposed correlation; grad_x[:, :, p] = sum_o kernels[o]^T grad_dots[:, :, p - o], read from
        # the output gradient zero-padded by the largest shift on both sides, so every column is written
        pad, size = shifts[-1], height * width
        padded = grad_dots.new_empty(n, views * k, length + 2 * pad)
        padded[:, :, :pad] = 0
        padded[:, :, pad : pad + length] = grad_dots
        padded[:, :, pad + length :] = 0
        grad_x = torch.empty_like(flat)
        for o, shift in enumerate(shifts):
            shifted = padded[:, :, pad - shift : pad - shift + size]
            grad_x.baddbmm_(kernels[o].transpose(1, 2), shifted, beta=1 if o else 0)
        # window norms: d window_sq / dx = 2 x summed over the windows covering the pixel (the adjoint box sum)
        grad_sq = F.pad(grad_window_sq, (0, rows * width - length)).reshape(n, 1, rows, width)[:, :, :, :cols]
        grad_sq = F.avg_pool2d(F.pad(grad_sq, (r - 1,) * 4), r, 1, divisor_override=1)  # (N, 1, H, W)
        grad_x.addcmul_(flat, grad_sq.reshape(n, 1, size), value=2)
        # anchor windows: back to the pixels they were gathered from (overlapping windows add up)
        grad_windows = grad_windows.reshape(n, k, channels, r * r).permute(0, 2, 1, 3).reshape(n, channels, -1)
        grad_x.index_add_(2, pixels, grad_windows)
        return grad_x.reshape(n, channels, height, width), None, None, None


def dense_windows(x: Tensor, top_left: Tensor, members: Tensor, region_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(anchors, dots, window_sq)`` of x (N, C, H, W) for the K windows with corners ``top_left`` (K, 2) and the
    sample lists ``members`` (N, V): see :class:`_DenseWindows` for the shapes and the layout of ``dots``."""
    return _DenseWindows.apply(x, top_left, members, region_size)


class _ScaledLogSumExp(torch.autograd.Function):
    """``LSE_l(dots[..., l] * scale[n, l] + bias[k, l])`` over the last dim of dots (N, V, K, L), scale (N, L),
    bias (K, L) of 0 / -inf (the -inf positions drop out; every row must keep one). Shifted by the row maximum;
    keeps only the softmax for the backward pass (grad_logits = softmax * grad), computed in place."""

    @staticmethod
    def forward(ctx, dots: Tensor, scale: Tensor, bias: Tensor) -> Tensor:
        weights = torch.addcmul(bias, dots, scale[:, None, None, :])
        shift = weights.amax(dim=3, keepdim=True)
        total = weights.sub_(shift).exp_().sum(dim=3, keepdim=True)
        ctx.save_for_backward(weights.div_(total), dots, scale)  # the softmax over l
        return (shift + total.log()).squeeze(3)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        softmax, dots, scale = ctx.saved_tensors
        grad_logits = softmax * grad[..., None]
        grad_scale = (grad_logits * dots).sum(dim=(1, 2)) if ctx.needs_input_grad[1] else None
        grad_dots = grad_logits.mul_(scale[:, None, None, :]) if ctx.needs_input_grad[0] else None
        return grad_dots, grad_scale, None


def dense_negative_lse(
    dots: Tensor, window_sq: Tensor, members: Tensor, valid: Tensor, rank_in_sample: Tensor,
    top_left: Tensor, width: int, region_size: int, temperature: float,
) -> Tensor:
    """(N, K) dense-mode negative log-sum-exps: LSE over every other window of every view of the anchor's sample.

    From the outputs of :func:`dense_windows`: anchor (i, k)'s negatives are the windows of every image u of i's
    sample (i included) at every valid position except the anchor's; the result is
    ``LSE_{u, q} cos(anchor(i, k), window(u, q)) / t``, the quantity :func:`scripts.losses.contrastive_pair_loss`
    computes (each LSE shifted by its maximum), in two exact stages: over the positions q for each (window image m,
    anchor image, k), where the masked positions are a (K, L) pattern shared by all rows, then over the views u of
    the sample.
    Needs at least two windows per map (else there are no negatives).
    """
    n, views, k = members.shape[0], members.shape[1], top_left.shape[0]
    length, cols = dots.shape[2], width - region_size + 1
    position = torch.arange(length, device=dots.device)
    corner = top_left[:, 0] * width + top_left[:, 1]
    negative = (position % width < cols)[None, :] & (position[None, :] != corner[:, None])  # (K, L)
    bias = torch.zeros(negative.shape, dtype=dots.dtype, device=dots.device).masked_fill_(~negative, float("-inf"))
    scale = (window_sq.clamp(min=1e-24).sqrt() * temperature).reciprocal()  # cosine = dot / |window|, over t
    # (N window image m, V anchor image members[m, v], K)
    per_image = _ScaledLogSumExp.apply(dots.reshape(n, views, k, length), scale, bias)
    # anchor i's u-th view is members[i, u], and i sits at rank_in_sample[i] in that image's member list
    per_view = per_image[members, rank_in_sample[:, None]]  # (N anchor image, V, K)
    per_view = per_view.masked_fill(~valid[:, :, None], float("-inf"))  # padding: never a view (u = i always is)
    return torch.logsumexp(per_view, dim=1)
