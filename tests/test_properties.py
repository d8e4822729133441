"""Property-based tests (hypothesis) of the pre-processing and the partition-aware sampler.

Pre-processing, over random volume shapes (single slices too), voxel spacings, affines (axis permutations, flips,
origins, the identity placeholder), image and label dtypes, and bad inputs (NaN/Inf, negative and sparse intensities,
constant volumes, labels beyond the classes): a bad input gives one BundleError naming the file and the problem
(predicted here from the arrays); any other gives no exception, and the image comes out float32, (1, size, size, Z)
with Z the number of slices along the chosen slice axis, finite, within the percentile-scaled input range; the label
has the same shape and only input label values.
Sampler, over random slice counts, partition numbers, batch sizes, ranks and epochs: either a ValueError for an
impossible request (fewer eligible volumes per rank than a batch needs) or batches of exactly M distinct volumes x
S partitions, volume-major, each slice inside its partition, every volume from this rank's shard, no blanks.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from monai.data import MetaTensor

from scripts.errors import find_bundle_error
from scripts.sampler import PartitionBatchSampler, partition_of
from scripts.transforms import choose_slice_axis, is_placeholder_affine, preprocessing

IMAGE_DTYPES = [np.uint8, np.int16, np.float32, np.float64]
LABEL_DTYPES = [np.uint8, np.int16, np.int32]


@st.composite
def volumes(draw):
    shape = tuple(draw(st.lists(st.integers(2, 20), min_size=3, max_size=3)))
    spacing = draw(st.lists(st.floats(0.5, 8.0, allow_nan=False), min_size=3, max_size=3))
    placeholder = draw(st.booleans())
    affine = np.eye(4)
    if not placeholder:
        order = draw(st.permutations([0, 1, 2]))
        signs = draw(st.lists(st.sampled_from([-1.0, 1.0]), min_size=3, max_size=3))
        affine[:3, :3] = np.eye(3)[:, order] * np.asarray(signs) * np.asarray(spacing)
        affine[:3, 3] = draw(st.lists(st.floats(-200, 200, allow_nan=False), min_size=3, max_size=3))
        affine[0, 3] += 1.0  # never the exact placeholder by chance
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    image_dtype = draw(st.sampled_from(IMAGE_DTYPES))
    high = 255 if image_dtype == np.uint8 else 1000
    constant = draw(st.booleans()) and draw(st.booleans())  # a blank volume now and then
    image = np.full(shape, 7) if constant else rng.integers(0, high, shape)
    label = rng.integers(0, 4, shape).astype(draw(st.sampled_from(LABEL_DTYPES)))
    return image.astype(image_dtype), label, affine


@st.composite
def any_volumes(draw):
    """``volumes`` and the bad inputs a user may bring: NaN/Inf voxels, negative intensities, sparse images (almost
    every voxel 0), single-slice volumes, label values beyond the classes (4 classes: 0..3)."""
    image, label, affine = draw(volumes())
    if draw(st.booleans()):  # a single slice along one axis
        axis = draw(st.integers(0, 2))
        image, label = (np.take(a, [0], axis=axis) for a in (image, label))
    kind = draw(st.sampled_from(["plain", "negative", "sparse", "non-finite", "bad label"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if kind == "negative":
        image = image.astype(np.float32) - 600.0
    elif kind == "sparse":
        image = np.zeros(image.shape, np.float32)
        image.flat[rng.integers(0, image.size, max(1, image.size // 200))] = 3000.0
    elif kind == "non-finite":
        image = image.astype(np.float32)
        image.flat[rng.integers(0, image.size)] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    elif kind == "bad label":
        label = label.astype(np.int16)
        label.flat[rng.integers(0, label.size)] = draw(st.sampled_from([4, 9, -1]))
    return image, label, affine


def expected_refusal(image: np.ndarray, label: np.ndarray) -> str | None:
    """The start of the error the pre-processing must give for this input (4 classes), or None: computed here from
    the arrays, independently of the bundle's check."""
    if not np.isfinite(image).all():
        return "NaN/Inf intensities"
    if image.min() == image.max():
        return "constant image"
    low, high = np.percentile(image.astype(np.float32), [1, 99])
    if not high > low:
        return "its intensity percentiles 1 and 99 are both"
    if label.min() < 0 or label.max() > 3:
        return "unexpected label values"
    return None


def _meta(array, affine):
    return MetaTensor(torch.as_tensor(array), affine=torch.as_tensor(affine),
                      meta={"original_channel_dim": "no_channel", "filename_or_obj": "volume.nii.gz"})


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(volume=any_volumes(), image_size=st.sampled_from([16, 32]), spacing=st.floats(0.8, 4.0),
       placeholder_spacing=st.sampled_from([None, 1.5]))
def test_preprocessing_output_contract(volume, image_size, spacing, placeholder_spacing):
    image, label, affine = volume
    transform = preprocessing(keys=("image", "label"), image_size=image_size, spacing=spacing, load=False,
                              placeholder_spacing=placeholder_spacing, num_classes=4)
    refusal = expected_refusal(image, label)
    if refusal is not None:  # a bad input: one BundleError naming the file, nothing else
        with pytest.raises(Exception) as error:
            transform({"image": _meta(image, affine), "label": _meta(label, affine)})
        found = find_bundle_error(error.value)
        assert found is not None and str(found).startswith("volume.nii.gz: ") and refusal in str(found), error.value
        return
    out = transform({"image": _meta(image, affine), "label": _meta(label, affine)})
    slices = image.shape[choose_slice_axis(affine)]
    assert tuple(out["image"].shape) == (1, image_size, image_size, slices)
    assert tuple(out["label"].shape) == (1, image_size, image_size, slices)
    assert out["image"].dtype == torch.float32
    assert torch.isfinite(out["image"]).all()
    # range: the 1st / 99th percentiles map to 0 / 1 (not clipped); resampling interpolates, padding adds 0
    p1, p99 = np.percentile(image.astype(np.float64), [1, 99])
    low, high = (image.min() - p1) / (p99 - p1), (image.max() - p1) / (p99 - p1)
    values = out["image"].double()
    assert values.min() >= min(low, 0.0) - 1e-4 and values.max() <= max(high, 0.0) + 1e-4, (low, high)
    assert set(torch.unique(out["label"]).tolist()) <= set(np.unique(label).tolist()) | {0}
    assert is_placeholder_affine(affine) == np.allclose(affine, np.eye(4))


@st.composite
def sampler_cases(draw):
    counts = draw(st.lists(st.integers(0, 30), min_size=1, max_size=12))
    partitions = draw(st.integers(1, 6))
    world = draw(st.integers(1, 3))
    return dict(slice_counts=counts, volumes_per_batch=draw(st.integers(1, 4)), num_partitions=partitions,
                num_batches=draw(st.integers(1, 6)), seed=draw(st.integers(0, 1000)), world_size=world,
                rank=draw(st.integers(0, world - 1))), draw(st.integers(0, 5))


@settings(max_examples=150, deadline=None)
@given(case=sampler_cases())
def test_sampler_batches_are_m_volumes_by_s_partitions_without_blanks(case):
    kwargs, epoch = case
    counts, m, s = kwargs["slice_counts"], kwargs["volumes_per_batch"], kwargs["num_partitions"]
    eligible = [v for v, q in enumerate(counts) if q >= s]
    try:
        sampler = PartitionBatchSampler(**kwargs)
    except ValueError as error:
        assert len(eligible) // kwargs["world_size"] < m, error  # refused only when a batch cannot be filled
        return
    assert len(eligible) // kwargs["world_size"] >= m
    sampler.set_epoch(epoch)
    shard = set(sampler.rank_volumes())
    batches = list(sampler)
    assert len(batches) == len(sampler) == kwargs["num_batches"]
    for batch in batches:
        assert len(batch) == m * s
        volumes = [batch[i * s][0] for i in range(m)]
        assert len(set(volumes)) == m and set(volumes) <= shard <= set(eligible)
        for i, volume in enumerate(volumes):
            for p in range(s):
                v, k = batch[i * s + p]
                assert v == volume and 0 <= k < counts[v] and partition_of(k, counts[v], s) == p
    assert batches == list(sampler)  # a function of (seed, epoch, rank)
