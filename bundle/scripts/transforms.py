"""Pre-processing of 3D volumes and the tensor augmentations of the pre-training stages.

Pre-processing (``preprocessing``) turns a loaded volume into a channel-first (C, H, W, Z) stack of square slices
with the slice axis last: in-plane resampling to a target spacing (linear for images, nearest for labels, no
resampling along z), centre crop/pad to ``image_size``, and per-volume min-max normalisation between the 1st and
99th intensity percentile (no clipping), as in method.md. All of it is invertible with ``Invertd``, so predictions
go back to the native grid.

The pre-training augmentations work on a whole batch of slices (B, C, H, W) as tensors on the training device,
with an independent random draw per slice and no Python loop over slices.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    Randomizable,
    ResizeWithPadOrCropd,
    Rotated,
    ScaleIntensityRangePercentilesd,
    Spacingd,
    Transform,
)


def preprocessing(
    keys: Sequence[str] = ("image", "label"),
    image_size: int = 192,
    spacing: float = 1.36719,
    lower_percentile: float = 1.0,
    upper_percentile: float = 99.0,
    load: bool = True,
) -> Compose:
    """Dictionary pre-processing for ``keys`` (the first is the image, any others are label maps).

    Output: "image" float32 (1, image_size, image_size, Z) normalised to [0, 1] between the percentiles (values
    outside are kept), labels (1, image_size, image_size, Z). ``load=False`` drops the loader (MONAI Label and
    callers that hand over arrays with metadata load by themselves).
    """
    keys = tuple(keys)
    image, labels = keys[0], keys[1:]
    steps = [LoadImaged(keys, image_only=True)] if load else []
    steps += [
        EnsureChannelFirstd(keys),
        EnsureTyped(image, dtype=torch.float32),
        # in-plane only: a non-positive spacing keeps the original one along z
        Spacingd(keys, pixdim=(spacing, spacing, -1.0), mode=("bilinear",) + ("nearest",) * len(labels)),
        ResizeWithPadOrCropd(keys, spatial_size=(image_size, image_size, -1)),
        ScaleIntensityRangePercentilesd(
            image, lower=lower_percentile, upper=upper_percentile, b_min=0.0, b_max=1.0, clip=False
        ),
    ]
    return Compose(steps)


def _uniform(rng: np.random.RandomState, low: float, high: float, n: int, like: torch.Tensor) -> torch.Tensor:
    """n uniform draws in [low, high) from ``rng`` as a float tensor on ``like``'s device."""
    return torch.as_tensor(rng.uniform(low, high, n), dtype=torch.float32, device=like.device)


class RandCropResize(Randomizable, Transform):
    """Per slice, a random square crop covering ``area`` of the slice, resized back to the full size.

    (B, C, H, W) -> (B, C, H, W). The paper's crop is 100x100 out of 192x192 (about 0.27 of the area).
    Implemented as one batched affine resampling (bilinear), so it runs on the device of the input.
    """

    def __init__(self, area: float = 0.27, prob: float = 1.0):
        if not 0.0 < area <= 1.0:
            raise ValueError(f"area must be in (0, 1], got {area}.")
        self.area, self.prob = area, prob

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        b = images.shape[0]
        scale = torch.full((b,), float(np.sqrt(self.area)), device=images.device)
        scale = torch.where(_uniform(self.R, 0, 1, b, images) < self.prob, scale, torch.ones_like(scale))
        # crop centre anywhere that keeps the crop inside the slice (normalised coordinates in [-1, 1])
        shift = (1 - scale)[:, None] * (2 * torch.stack([_uniform(self.R, 0, 1, b, images) for _ in "xy"], 1) - 1)
        theta = torch.zeros(b, 2, 3, device=images.device)
        theta[:, 0, 0] = theta[:, 1, 1] = scale
        theta[:, :, 2] = shift
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        return F.grid_sample(images.float(), grid, mode="bilinear", align_corners=False).to(images.dtype)


class RandBrightnessContrast(Randomizable, Transform):
    """Per slice, ``x -> (x - mean) * c + mean + b`` with c ~ U(contrast), b ~ U(brightness), then clip.

    (B, C, H, W) -> (B, C, H, W). Paper: brightness +-0.3, contrast x0.7-1.3, clip to [0, 1.5].
    """

    def __init__(
        self,
        brightness: Sequence[float] = (-0.3, 0.3),
        contrast: Sequence[float] = (0.7, 1.3),
        clip: Sequence[float] = (0.0, 1.5),
    ):
        self.brightness, self.contrast, self.clip = tuple(brightness), tuple(contrast), tuple(clip)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        b = images.shape[0]
        shape = (b,) + (1,) * (images.ndim - 1)
        c = _uniform(self.R, *self.contrast, b, images).view(shape)
        offset = _uniform(self.R, *self.brightness, b, images).view(shape)
        mean = images.mean(dim=tuple(range(1, images.ndim)), keepdim=True)
        return ((images - mean) * c + mean + offset).clamp(*self.clip)


class RandRotateStepd(Randomizable, Transform):
    """Dictionary transform: rotate the (C, H, W) arrays of ``keys`` by k * ``step_degrees`` for a random k.

    k is drawn uniformly from 1 .. 360 / step_degrees - 1 (the paper's "rotation by k * 45 degrees"); all keys
    share the draw. ``mode`` per key ("bilinear" for images, "nearest" for labels).
    """

    def __init__(self, keys: Sequence[str], step_degrees: float = 45.0, mode: Sequence[str] = ("bilinear", "nearest")):
        if not 0 < step_degrees < 360 or (360 / step_degrees) % 1:
            raise ValueError(f"step_degrees must divide 360, got {step_degrees}.")
        self.steps = int(360 / step_degrees)
        self.step = np.deg2rad(step_degrees)
        self.keys, self.mode = tuple(keys), tuple(mode)

    def __call__(self, data: dict) -> dict:
        k = self.R.randint(1, self.steps)
        return Rotated(self.keys, angle=k * self.step, keep_size=True, mode=self.mode)(data)
