"""Pre-processing of 3D volumes and the tensor augmentations of the pre-training stages.

Pre-processing (``preprocessing``) turns a loaded volume into a channel-first (C, H, W, Z) stack of square slices
with the slice axis last (the steps of docs/data.md, "Pre-processing"):

1. channel selection for multi-channel (4D) images, label remapping (e.g. MMWHS raw values -> 0..K);
2. per-volume min-max normalisation between the 1st and 99th intensity percentile, no clipping, on the native volume
   (so the zero padding added later is the 1st-percentile value and does not bias the percentiles);
3. the slice axis moved last (``SliceAxisLastd``; default: the axis with the largest voxel spacing);
4. in-plane resampling to a target spacing (linear for images, nearest for labels, none along the slice axis). A
   volume whose affine is a placeholder (unit voxels, axis-aligned, origin 0: the geometry was lost) is first given
   an assumed in-plane voxel size (``PlaceholderSpacingd``): ``placeholder_spacing`` mm, or, when that is None, the
   size that makes its longer in-plane side exactly ``image_size`` pixels after resampling (aspect ratio kept);
5. centre crop/pad of each slice to ``image_size`` x ``image_size``.

Steps 3-5 are invertible with ``Invertd``, so predictions go back to the native grid (steps 1-2 change no geometry).

The augmentations of pre-training (``RandCropResize``, ``RandBrightnessContrast``) and of fine-tuning
(``RandSpatialAugmentd``) work on a whole batch of slices (B, C, H, W) as tensors on the training device, with an
independent random draw per slice and no Python loop over slices: the data loader only gathers slices.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    InvertibleTransform,
    LoadImaged,
    MapTransform,
    Randomizable,
    ResizeWithPadOrCropd,
    ScaleIntensityRangePercentilesd,
    Spacingd,
    Transform,
)
from monai.transforms.utils import create_control_grid

from scripts.errors import BundleError


def voxel_spacing(affine) -> np.ndarray:
    """Voxel size along each array axis (the column norms of the affine's linear part)."""
    affine = np.asarray(affine, dtype=np.float64)
    return np.linalg.norm(affine[:-1, :-1], axis=0)


def is_placeholder_affine(affine, atol: float = 1e-6) -> bool:
    """True when ``affine`` carries no real geometry: unit voxels along the array axes (the linear part is a signed
    permutation matrix, e.g. identity or an ITK-style diag(-1, -1, 1)) and the origin at 0."""
    affine = np.asarray(affine, dtype=np.float64)
    linear = np.abs(affine[:3, :3])
    return bool(
        np.allclose(linear, np.round(linear), atol=atol)
        and np.allclose(linear.sum(0), 1.0, atol=atol)
        and np.allclose(linear.sum(1), 1.0, atol=atol)
        and np.allclose(affine[:3, 3], 0.0, atol=atol)
    )


def choose_slice_axis(affine, slice_axis: int | str = "auto") -> int:
    """The spatial axis (0, 1 or 2) the 2D slices are cut along.

    ``"auto"``: the axis with the largest voxel spacing; ties (within 0.1 %, e.g. a placeholder affine or an isotropic
    volume) go to the later axis, so an undecided volume keeps its last axis. An int (0, 1, 2 or -1) is used as is.
    """
    if isinstance(slice_axis, str):
        if slice_axis.strip().lstrip("-").isdigit():
            slice_axis = int(slice_axis)
        elif slice_axis != "auto":
            raise ValueError(f"slice_axis must be 'auto' or one of 0, 1, 2, -1; got {slice_axis!r}.")
    if slice_axis == "auto":
        spacing = voxel_spacing(affine)[:3]
        largest = spacing.max()
        return int(max(i for i in range(3) if spacing[i] >= largest * (1 - 1e-3)))
    if isinstance(slice_axis, bool) or slice_axis not in (0, 1, 2, -1):
        raise ValueError(f"slice_axis must be 'auto' or one of 0, 1, 2, -1; got {slice_axis!r}.")
    return int(slice_axis) % 3


def _source(img) -> str:
    """The file an array came from (for error messages)."""
    meta = getattr(img, "meta", None) or {}
    return str(meta.get("filename_or_obj", "<array>"))


def _check_3d(img, key: Hashable) -> None:
    if img.ndim != 4:
        raise BundleError(
            f"{_source(img)}: '{key}' has {img.ndim - 1} spatial dimensions (shape {tuple(img.shape[1:])}), "
            "a 3D volume is expected."
        )


# ---------------------------------------------------------------- input checks (one copy, used on every path)
MAX_VOXELS = 2**28  # largest volume accepted (voxels, all channels: 268 M, e.g. 512 x 512 x 1024): refused unread


def header_shape(path) -> tuple[int, ...] | None:
    """The array shape a NIfTI/Analyze file declares in its header, read without loading the data; None when the
    file is not one nibabel reads by its header (MONAI's loader then deals with it)."""
    import nibabel as nib

    try:
        return tuple(int(n) for n in nib.load(str(path)).shape)
    except Exception:  # not a nibabel format, unreadable: LoadImage reports it
        return None


def check_size(path, max_voxels: int | None = None) -> None:
    """Refuse a file whose header declares more than ``max_voxels`` voxels (None: ``MAX_VOXELS``) with a
    ``BundleError`` naming it, before its data are read into memory."""
    max_voxels = MAX_VOXELS if max_voxels is None else int(max_voxels)
    shape = header_shape(path)
    if shape is not None and int(np.prod(shape, dtype=np.int64)) > max_voxels:
        raise BundleError(f"{path}: {int(np.prod(shape, dtype=np.int64))} voxels (shape {shape}), more than the "
                          f"{max_voxels} this bundle accepts (scripts/transforms.py: MAX_VOXELS); crop or resample it.")


def _plain_tensor(array) -> torch.Tensor:
    """A plain tensor of an array, tensor or MetaTensor (no metadata to carry along)."""
    if isinstance(array, MetaTensor):
        return array.as_tensor()
    return array if isinstance(array, torch.Tensor) else torch.as_tensor(np.asarray(array))


def intensity_range(image, lower: float = 1.0, upper: float = 99.0) -> tuple[float, float]:
    """The ``lower`` and ``upper`` intensity percentiles of ``image`` (array or tensor, any shape), which the
    normalisation maps to 0 and 1, computed as MONAI's ``ScaleIntensityRangePercentiles`` does.

    Raises ``BundleError`` (the message names the problem, not the file: callers add it) when the image holds NaN or
    infinite values, is constant, or its two percentiles coincide (e.g. an image that is mostly zero with a few
    bright voxels): the scaling would return NaN everywhere or leave the image unscaled."""
    from monai.transforms.utils_pytorch_numpy_unification import percentile

    values = _plain_tensor(image).to(torch.float32)  # the pipeline's dtype (EnsureTyped)
    finite = torch.isfinite(values)
    if not bool(finite.all()):
        raise BundleError(f"{int((~finite).sum())} NaN/Inf intensities")
    low, high = float(values.min()), float(values.max())
    if low == high:
        raise BundleError(f"constant image (every voxel is {low:g})")
    a, b = (float(percentile(values, q)) for q in (lower, upper))
    if not b > a:
        raise BundleError(f"its intensity percentiles {lower:g} and {upper:g} are both {a:g} (most voxels share one "
                          f"value, e.g. an almost empty image), so the normalisation cannot scale it")
    return a, b


def label_problem(label, num_classes: int | None = None) -> str | None:
    """What is wrong with the values of a label map (array or tensor), or None: non-integer values, or values outside
    0..num_classes-1 (``num_classes`` None: outside the non-negative integers)."""
    values = torch.unique(_plain_tensor(label).to(torch.float64))
    if not bool(torch.isfinite(values).all()) or not bool((values == torch.round(values)).all()):
        return "label has non-integer values"
    bad = values[(values < 0) | (values >= num_classes)] if num_classes is not None else values[values < 0]
    if bad.numel():
        expected = "non-negative integers" if num_classes is None else f"0..{num_classes - 1}"
        return f"unexpected label values {[int(v) for v in bad.tolist()][:10]} (expected {expected})"
    return None


def geometry_problem(image_shape, image_affine, label_shape, label_affine) -> str | None:
    """What differs between an image and its label map (spatial shapes; affines beyond 0.1 % of the largest entry),
    or None. Affines may be None (not known: not compared)."""
    if tuple(label_shape) != tuple(image_shape):
        return f"label shape {tuple(label_shape)} differs from image shape {tuple(image_shape)}"
    if image_affine is None or label_affine is None:
        return None
    image_affine, label_affine = (np.asarray(a, dtype=np.float64) for a in (image_affine, label_affine))
    difference = float(np.abs(label_affine - image_affine).max())
    if difference > 1e-3 * max(1.0, float(np.abs(image_affine).max())):
        return f"label affine differs from the image affine (largest difference {difference:.4g})"
    return None


class CheckSized(MapTransform):
    """Before loading: refuse a file under ``keys`` whose header declares more than ``max_voxels`` voxels (None:
    ``MAX_VOXELS``; ``check_size``). Entries that are not paths (arrays) pass."""

    def __init__(self, keys: KeysCollection, max_voxels: int | None = None, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.max_voxels = max_voxels

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            if isinstance(d[key], (str, bytes, os.PathLike)):
                check_size(d[key], self.max_voxels)
        return d


class CheckLabelsd(MapTransform):
    """Refuse a label map under ``keys`` whose values lie outside ``0..num_classes-1`` (``label_problem``), naming the
    file: for paths that load labels apart from their image (evaluation)."""

    def __init__(self, keys: KeysCollection, num_classes: int | None = None, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.num_classes = None if num_classes is None else int(num_classes)

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            problem = label_problem(d[key], self.num_classes)
            if problem:
                raise BundleError(f"{_source(d[key])}: {problem}.")
        return d


class CheckVolumed(MapTransform):
    """The input check of the pre-processing, on every path (inference, evaluation, fine-tuning, pre-training, MONAI
    Label): on channel-first volumes (channel selected, labels remapped), before the normalisation, a ``BundleError``
    naming the file when the image holds NaN/Inf, is constant or has coinciding normalisation percentiles
    (``intensity_range``), or when a label map has more than one channel, values outside ``0..num_classes-1``
    (``label_problem``), or a shape or affine that differs from the image's (``geometry_problem``).

    ``keys``: the image first, then label maps (absent labels are skipped)."""

    def __init__(self, keys: KeysCollection, lower_percentile: float = 1.0, upper_percentile: float = 99.0,
                 num_classes: int | None = None):
        super().__init__(keys, allow_missing_keys=True)
        self.lower, self.upper = float(lower_percentile), float(upper_percentile)
        self.num_classes = None if num_classes is None else int(num_classes)

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        image_key, label_keys = self.keys[0], self.keys[1:]
        image = d[image_key]
        try:
            intensity_range(image, self.lower, self.upper)
        except BundleError as error:
            raise BundleError(f"{_source(image)}: {error}") from None
        for key in label_keys:
            if key not in d:
                continue
            label = d[key]
            problem = f"label has {label.shape[0]} channels" if label.shape[0] != 1 else geometry_problem(
                image.shape[1:], getattr(image, "affine", None), label.shape[1:], getattr(label, "affine", None))
            problem = problem or label_problem(label, self.num_classes)
            if problem:
                raise BundleError(f"{_source(label)}: {problem}.")
        return d


class SelectChanneld(MapTransform):
    """Keep channel ``channel`` of a channel-first multi-channel image (e.g. the T2 channel, 0, of the Decathlon
    prostate task): (C, H, W, Z) -> (1, H, W, Z). With ``channel=None`` the image must have a single channel; a
    multi-channel (4D) file then raises a ValueError naming the file."""

    def __init__(self, keys: KeysCollection, channel: int | None = None, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        if channel is not None and (isinstance(channel, bool) or int(channel) != channel or channel < 0):
            raise ValueError(f"channel must be None or an int >= 0, got {channel!r}.")
        self.channel = None if channel is None else int(channel)

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            n = img.shape[0]
            if self.channel is None:
                if n != 1:
                    raise BundleError(
                        f"{_source(img)}: '{key}' has {n} channels (a 4D file) where a 3D volume is expected; "
                        "choose one channel (image_channel / channel)."
                    )
            elif self.channel >= n:
                raise BundleError(f"{_source(img)}: channel {self.channel} requested, '{key}' has {n} channel(s).")
            else:
                d[key] = img[self.channel : self.channel + 1]
        return d


class RemapLabelsd(MapTransform):
    """Map raw label values to class indices: ``values[i]`` becomes class i (e.g. MMWHS: values
    (0, 205, 420, 500, 550, 600, 820, 850) -> 0..7). ``values=None`` leaves labels as they are. A value not in
    ``values`` raises a ValueError naming the file (a silent pass-through would break one-hot encoding later)."""

    def __init__(self, keys: KeysCollection, values: Sequence[int] | None = None, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.values = None if values is None else tuple(int(v) for v in values)
        if self.values is not None and len(set(self.values)) != len(self.values):
            raise ValueError(f"label values must be distinct, got {self.values}.")

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        if self.values is None:
            return d
        for key in self.key_iterator(d):
            img = d[key]
            raw = torch.as_tensor(img)
            table = torch.as_tensor(self.values, dtype=raw.dtype, device=raw.device)
            known = torch.isin(raw, table)
            if not bool(known.all()):
                unknown = [int(v) if float(v).is_integer() else v for v in torch.unique(raw[~known]).tolist()]
                raise BundleError(
                    f"{_source(img)}: unexpected label values {unknown[:10]}; expected {list(self.values)}."
                )
            out = torch.zeros_like(raw)
            for index, value in enumerate(self.values):
                out[raw == value] = index
            d[key] = out
        return d


class SliceAxisLastd(MapTransform, InvertibleTransform):
    """Move the slice axis of (C, X, Y, Z) volumes last, permuting the affine's columns with the array axes so that
    every voxel keeps its world position. Invertible.

    The axis is chosen once per call from the first key's affine (see ``choose_slice_axis``) and applied to every key.
    """

    def __init__(self, keys: KeysCollection, slice_axis: int | str = "auto", allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        choose_slice_axis(np.eye(4), slice_axis)  # validates the argument
        if isinstance(slice_axis, str) and slice_axis != "auto":
            slice_axis = int(slice_axis)
        self.slice_axis = slice_axis

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        axis = None
        for key in self.key_iterator(d):
            img = d[key]
            _check_3d(img, key)
            if axis is None:
                affine = img.affine if isinstance(img, MetaTensor) else np.eye(4)
                axis = choose_slice_axis(affine, self.slice_axis)
            order = [a for a in range(3) if a != axis] + [axis]
            out = img.permute(0, *(a + 1 for a in order))
            if isinstance(out, MetaTensor):
                out = self.push_transform(out, affine=torch.as_tensor(_axis_order_matrix(order)),
                                          extra_info={"order": order})
            d[key] = out
        return d

    def inverse(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            order = self.pop_transform(img)["extra_info"]["order"]
            back = [int(i) for i in np.argsort(order)]
            out = img.permute(0, *(a + 1 for a in back))
            out.affine = out.affine @ torch.as_tensor(_axis_order_matrix(order).T, dtype=torch.float64)
            d[key] = out
        return d


def _axis_order_matrix(order: Sequence[int]) -> np.ndarray:
    """(4, 4) homogeneous matrix that reorders the spatial axes: new axis i is old axis ``order[i]``."""
    matrix = np.eye(4)
    matrix[:3, :3] = np.eye(3)[:, list(order)]
    return matrix


class PlaceholderSpacingd(MapTransform, InvertibleTransform):
    """Give a volume whose affine is a placeholder (``is_placeholder_affine``) an assumed in-plane voxel size, so that
    the in-plane resampling that follows (``Spacingd``) scales it by a known factor. Only the affine changes (columns
    0 and 1 are scaled); volumes with a real affine pass unchanged. Invertible (the affine is restored).

    Args:
        placeholder_spacing: the in-plane voxel size in mm to assume, or None: the size that makes the longer in-plane
            side of the volume exactly ``image_size`` pixels at ``spacing`` mm (the whole slice fits, aspect kept;
            ``spacing * (image_size - 1) / (longer side - 1)``, as ``Spacingd`` maps voxel centres).
        image_size, spacing: the pre-processing's slice size and target in-plane spacing (for the None rule).
    """

    def __init__(
        self,
        keys: KeysCollection,
        placeholder_spacing: float | None = None,
        image_size: int = 192,
        spacing: float = 1.36719,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        if placeholder_spacing is not None and not float(placeholder_spacing) > 0:
            raise ValueError(f"placeholder_spacing must be None or > 0, got {placeholder_spacing!r}.")
        self.placeholder_spacing = None if placeholder_spacing is None else float(placeholder_spacing)
        self.image_size, self.spacing = int(image_size), float(spacing)

    def assumed_spacing(self, affine, spatial_shape: Sequence[int]) -> float | None:
        """The in-plane voxel size (mm) assumed for a volume (slice axis last), or None when its affine is real."""
        if not is_placeholder_affine(affine):
            return None
        if self.placeholder_spacing is not None:
            return self.placeholder_spacing
        longest = max(int(spatial_shape[0]), int(spatial_shape[1]))
        # Spacingd maps voxel centres: n voxels become round((n - 1) * assumed / spacing + 1) pixels
        return self.spacing * (self.image_size - 1) / max(longest - 1, 1)

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        scale = None
        for key in self.key_iterator(d):
            img = d[key]
            if not isinstance(img, MetaTensor):
                continue
            if scale is None:
                assumed = self.assumed_spacing(img.affine, img.shape[1:])
                scale = [1.0, 1.0] if assumed is None else [assumed, assumed]
            matrix = torch.diag(torch.tensor([*scale, 1.0, 1.0], dtype=torch.float64))
            d[key] = self.push_transform(img, affine=matrix, extra_info={"scale": scale})
        return d

    def inverse(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            scale = self.pop_transform(img)["extra_info"]["scale"]
            undo = torch.tensor([1 / scale[0], 1 / scale[1], 1.0, 1.0], dtype=torch.float64)
            img.affine = img.affine @ torch.diag(undo)
            d[key] = img
        return d


class InPlaneSpacingd(Spacingd):
    """MONAI's ``Spacingd``, untroubled by other entries named ``<key>_...`` that are not metadata dicts.

    After resampling a NIfTI image, monai 1.6's ``Spacingd`` calls ``.update(meta)`` on *every* data entry whose name
    starts with ``<key>_``. MONAI Label puts ``"image_path"`` (a str) in each inference request, so the plain
    transform fails there ("'str' object has no attribute 'update'"). Such entries are set aside during the call
    and put back unchanged; the resampling, its metadata and its inverse are ``Spacingd``'s own."""

    def __call__(self, data, lazy: bool | None = None):
        d = dict(data)
        prefixes = tuple(f"{key}_" for key in self.keys)
        aside = {k: d.pop(k) for k in list(d) if isinstance(k, str) and k.startswith(prefixes)
                 and not isinstance(d[k], dict)}
        d = super().__call__(d, lazy=lazy)
        d.update(aside)
        return d


def preprocessing(
    keys: Sequence[str] = ("image", "label"),
    image_size: int = 192,
    spacing: float = 1.36719,
    lower_percentile: float = 1.0,
    upper_percentile: float = 99.0,
    load: bool = True,
    slice_axis: int | str = "auto",
    placeholder_spacing: float | None = None,
    channel: int | None = None,
    label_values: Sequence[int] | None = None,
    num_classes: int | None = None,
) -> Compose:
    """Dictionary pre-processing for ``keys`` (the first is the image, any others are label maps).

    Args:
        image_size: slice side after resampling and centre crop/pad.
        spacing: in-plane target spacing (mm); the slice axis is never resampled.
        lower_percentile, upper_percentile: the image is scaled so these percentiles become 0 and 1 (values outside
            are kept).
        load: False drops the loader (MONAI Label and callers that hand over arrays with metadata load by themselves).
        slice_axis: "auto" (the axis with the largest spacing, see ``choose_slice_axis``) or 0, 1, 2, -1.
        placeholder_spacing: in-plane voxel size (mm) assumed when the affine is a placeholder (identity); None:
            resize so that the longer in-plane side fills ``image_size`` (see ``PlaceholderSpacingd``).
        channel: which channel of a multi-channel (4D) image to use; None: images must be 3D.
        label_values: raw value of each class in the label files (``values[i]`` -> class i), e.g. MMWHS; None: the
            files hold class indices already.
        num_classes: classes including the background: label values (after remapping) must lie in 0..num_classes-1;
            None: any non-negative integer.

    Every volume is checked on the way (``CheckSized`` before loading, ``CheckVolumed`` before the normalisation):
    a file too large, with NaN/Inf or without a usable intensity range, or a label that does not fit its image or the
    classes, stops with a ``BundleError`` naming the file, on every path that uses this pre-processing.

    Output: "image" float32 (1, image_size, image_size, Z), labels (1, image_size, image_size, Z), Z the number of
    slices along the slice axis. Arguments are normalised (floats, ints, tuples), so equal settings give equal
    transforms, whose pickled form keys the disk cache (``scripts.data.CachedVolumes``).
    """
    keys = tuple(keys)
    image, labels = keys[0], keys[1:]
    spacing, image_size = float(spacing), int(image_size)
    steps = [CheckSized(keys, allow_missing_keys=True), LoadImaged(keys, image_only=True)] if load else []
    steps += [
        EnsureChannelFirstd(keys),
        SelectChanneld(image, channel),
        EnsureTyped(image, dtype=torch.float32),
    ]
    if labels and label_values is not None:
        steps.append(RemapLabelsd(labels, label_values))
    steps += [
        CheckVolumed(keys, lower_percentile, upper_percentile, num_classes if labels else None),
        ScaleIntensityRangePercentilesd(
            image, lower=float(lower_percentile), upper=float(upper_percentile), b_min=0.0, b_max=1.0, clip=False
        ),
        SliceAxisLastd(keys, slice_axis),
        PlaceholderSpacingd(keys, placeholder_spacing, image_size, spacing),
        # in-plane only: a non-positive spacing keeps the original one along the slice axis
        InPlaneSpacingd(keys, pixdim=(spacing, spacing, -1.0), mode=("bilinear",) + ("nearest",) * len(labels)),
        ResizeWithPadOrCropd(keys, spatial_size=(image_size, image_size, -1)),
    ]
    return Compose(steps)


def _uniform(rng: np.random.RandomState, low: float, high: float, n: int, like: torch.Tensor) -> torch.Tensor:
    """n uniform draws in [low, high) from ``rng`` as a float tensor on ``like``'s device."""
    return torch.as_tensor(rng.uniform(low, high, n), dtype=torch.float32, device=like.device)


class RandCropResize(Randomizable, Transform):
    """Per slice, a random square crop covering ``area`` of the slice, resized back to the full size.

    (B, C, H, W) -> (B, C, H, W). The paper's crop is 100x100 out of 192x192 (about 0.27 of the area).
    Implemented as one batched affine resampling (bilinear), so it runs on the device of the input. ``area`` may be
    changed between calls (pretrain.yaml's crop schedule does).
    """

    def __init__(self, area: float = 0.27, prob: float = 1.0):
        self.area, self.prob = area, prob

    @property
    def area(self) -> float:
        return self._area

    @area.setter
    def area(self, value: float) -> None:
        if not 0.0 < value <= 1.0:
            raise ValueError(f"The crop area (pretrain.yaml: global#crop_area, and global#crop_area_start where "
                             f"its ramp begins) must be in (0, 1], got {value}.")
        self._area = float(value)

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


@functools.lru_cache(maxsize=8)
def _bicubic_upsampling(points: int, spacing: int, size: int) -> torch.Tensor:
    """(size, points): the centre ``size`` samples of ``F.interpolate(..., scale_factor=spacing, mode="bicubic",
    align_corners=False)`` along an axis of ``points`` values, as weights (bicubic upsampling is separable), so
    that only the samples kept are computed."""
    basis = torch.eye(points, dtype=torch.float64).view(points, 1, points, 1)
    up = F.interpolate(basis, scale_factor=(float(spacing), 1.0), mode="bicubic", align_corners=False)[:, 0, :, 0]
    start = (up.shape[1] - size) // 2
    return up[:, start:start + size].T.float()


class RandSpatialAugmentd(Randomizable, MapTransform):
    """Fine-tuning augmentation of a batch of slices and their labels, on the device, with one resampling per slice.

    Per slice, one of five spatial transforms, each with probability 1/5 (MONAI's ``OneOf``): a rotation by an angle
    ~ U(-``rotation_range``, ``rotation_range``) radians; a zoom by ~ U(``zoom_range``) about the centre; a left-right
    flip; a rotation by k * ``step_degrees`` with k ~ U{1 .. 360 / step_degrees - 1}; nothing. Then an elastic
    deformation as MONAI's ``Rand2DElastic`` draws it: a control grid ``elastic_spacing`` pixels apart (for
    spacing = size / 2, 3 x 3 points over the slice) whose points move by magnitude * N(0, 1) pixels per axis, with
    magnitude ~ U(``elastic_magnitude``), upsampled bicubically to a displacement field.

    Both steps are sampled at once: output(p) = input(A (p + d(p))) with A the slice's transform and d the
    displacement (pixel coordinates about the slice centre). As in the MONAI transforms it replaces (``RandRotated``,
    ``RandZoomd``, ``RandFlipd``, ``Rotated``, then ``Rand2DElasticd``, one slice at a time in the loader workers),
    points that the spatial transform maps outside the slice take the nearest border value and points that the
    deformation moves outside take 0. The result equals theirs for no transform, the flip and multiples of 90
    degrees (tested); for other angles and for zooms it interpolates once where they interpolated twice (MONAI's
    zoom resized the array and cropped or padded it back).

    Args:
        keys: the batch entries to transform, (B, C, H, W) each (e.g. image and label), with the same draws.
        mode: interpolation per key: "bilinear" (images) or "nearest" (labels).

    Call: a dict with (B, C, H, W) tensors under ``keys`` -> the same dict with those tensors augmented (float
    tensors come back in their dtype; others are resampled as float and cast back).
    """

    NUM_CHOICES = 5  # rotation, zoom, flip, rotation by a step, none

    def __init__(
        self,
        keys: KeysCollection,
        mode: Sequence[str] | str = ("bilinear", "nearest"),
        rotation_range: float = 0.2618,
        zoom_range: Sequence[float] = (0.95, 1.05),
        step_degrees: float = 45.0,
        elastic_spacing: int = 32,
        elastic_magnitude: Sequence[float] = (0.0, 2.0),
    ):
        super().__init__(keys)
        self.mode = (mode,) * len(self.keys) if isinstance(mode, str) else tuple(mode)
        if len(self.mode) != len(self.keys) or any(m not in ("bilinear", "nearest") for m in self.mode):
            raise ValueError(f"mode must be 'bilinear' or 'nearest' for each of {self.keys}, got {mode!r}.")
        if not 0 < step_degrees < 360 or (360 / step_degrees) % 1:
            raise ValueError(f"step_degrees must divide 360, got {step_degrees}.")
        if elastic_spacing < 1:
            raise ValueError(f"elastic_spacing must be >= 1 pixel, got {elastic_spacing}.")
        self.rotation_range, self.zoom_range = float(rotation_range), tuple(float(z) for z in zoom_range)
        self.steps, self.step = int(round(360 / step_degrees)), float(np.deg2rad(step_degrees))
        self.spacing, self.magnitude = int(elastic_spacing), tuple(float(m) for m in elastic_magnitude)

    def sampling_points(self, batch: int, height: int, width: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw the random transforms of ``batch`` slices: (B, H, W, 2) points in pixel coordinates about the slice
        centre, (x, y) order, where each output pixel samples the input; and (B, H, W, 2) the deformed points before
        the spatial transform (for the zero padding of the deformation)."""
        r = self.R
        choice = r.randint(0, self.NUM_CHOICES, batch)
        angle = np.where(choice == 0, r.uniform(-self.rotation_range, self.rotation_range, batch), 0.0)
        angle = angle + np.where(choice == 3, r.randint(1, self.steps, batch) * self.step, 0.0)
        zoom = np.where(choice == 1, r.uniform(*self.zoom_range, batch), 1.0)
        flip = np.where(choice == 2, -1.0, 1.0)
        # control points (MONAI's grid, pixels about the centre) moved by magnitude * N(0, 1), as Rand2DElastic
        control = create_control_grid((height, width), (self.spacing,) * 2, homogeneous=False)
        magnitude = r.uniform(*self.magnitude, batch)[:, None, None, None]
        moved = torch.as_tensor(control[None] + magnitude * r.normal(size=(batch, *control.shape)))
        rows, columns = (_bicubic_upsampling(n, self.spacing, size).to(device)
                         for n, size in zip(control.shape[1:], (height, width)))
        dense = torch.einsum("hg,bcgk,wk->bhwc", rows, moved.to(device=device, dtype=torch.float32), columns)
        deformed = dense.flip(-1)  # (B, H, W, [x, y])
        cos, sin = np.cos(angle) / zoom, np.sin(angle) / zoom
        matrix = np.stack([np.stack([cos * flip, -sin], -1), np.stack([sin * flip, cos], -1)], -2)
        matrix = torch.as_tensor(matrix, device=device, dtype=torch.float32)
        return torch.einsum("bij,bhwj->bhwi", matrix, deformed), deformed

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        first = d[self.keys[0]]
        b, _, h, w = first.shape
        points, deformed = self.sampling_points(b, h, w, first.device)
        size = torch.tensor([w / 2.0, h / 2.0], device=first.device)  # pixels about the centre -> [-1, 1]
        for key, mode in zip(self.keys, self.mode):
            x = d[key]
            inside = F.grid_sample(torch.ones_like(x[:, :1], dtype=torch.float32), deformed / size, mode=mode,
                                   padding_mode="zeros", align_corners=False)
            out = F.grid_sample(x.float(), points / size, mode=mode, padding_mode="border", align_corners=False)
            d[key] = (out * inside).to(x.dtype)
        return d
