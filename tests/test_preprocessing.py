"""Pre-processing with known answers: in-plane resampling, the placeholder-affine fallback, the slice-axis rule,
percentile normalisation, channel selection, label remapping, and the inverse back to the native grid."""

import numpy as np
import pytest
import torch
from monai.transforms import Invertd

from conftest import write_nifti
from scripts.transforms import choose_slice_axis, is_placeholder_affine, preprocessing


def _ramp(shape):
    """A smooth, non-constant image (percentile normalisation needs a spread)."""
    return (1.0 + np.arange(np.prod(shape), dtype=np.float32).reshape(shape) / np.prod(shape)).astype(np.float32)


def test_placeholder_affine_detection():
    assert is_placeholder_affine(np.eye(4))
    assert is_placeholder_affine(np.diag([-1.0, -1.0, 1.0, 1.0]))  # ITK-style identity direction
    assert is_placeholder_affine(np.eye(4)[[1, 0, 2, 3]])  # axes permuted, still unit voxels at the origin
    assert not is_placeholder_affine(np.diag([1.37, 1.37, 10.0, 1.0]))
    shifted = np.eye(4)
    shifted[:3, 3] = [-120.0, 80.0, 5.0]
    assert not is_placeholder_affine(shifted)  # a real 1 mm scan has an origin


def test_slice_axis_rule():
    assert choose_slice_axis(np.diag([1.5, 1.5, 10.0, 1.0])) == 2
    assert choose_slice_axis(np.diag([8.0, 1.2, 1.2, 1.0])) == 0
    assert choose_slice_axis(np.diag([1.0, 6.0, 1.0, 1.0])) == 1
    assert choose_slice_axis(np.eye(4)) == 2  # ties (placeholder, isotropic): the last axis
    assert choose_slice_axis(np.diag([5.0, 5.0, 1.0, 1.0])) == 1  # tie between 0 and 1: the later one
    assert choose_slice_axis(np.diag([8.0, 1.2, 1.2, 1.0]), 2) == 2  # explicit
    assert choose_slice_axis(np.eye(4), -1) == 2
    with pytest.raises(ValueError, match="slice_axis"):
        choose_slice_axis(np.eye(4), 3)
    with pytest.raises(ValueError, match="slice_axis"):
        preprocessing(slice_axis="largest")


def test_in_plane_resampling_with_real_spacing(tmp_path):
    """2 mm voxels, a 24 mm x 16 mm rectangle: at 1 mm it covers 24 x 16 pixels; 5 mm slices are kept as they are."""
    label = np.zeros((30, 20, 4), np.uint8)
    label[9:21, 6:14] = 1  # 12 x 8 voxels = 24 x 16 mm
    image = _ramp(label.shape) + 10 * label
    affine = np.diag([2.0, 2.0, 5.0, 1.0])
    data = {"image": write_nifti(tmp_path / "i.nii.gz", image, affine),
            "label": write_nifti(tmp_path / "l.nii.gz", label, affine)}
    out = preprocessing(image_size=64, spacing=1.0, placeholder_spacing=1.5)(data)
    assert out["image"].shape == (1, 64, 64, 4) and out["label"].shape == (1, 64, 64, 4)
    np.testing.assert_allclose(np.diag(out["image"].affine)[:3], [1.0, 1.0, 5.0])  # the fallback did not apply
    rows, cols = np.nonzero(out["label"][0, :, :, 1].numpy())
    assert rows.max() - rows.min() + 1 == 24 and cols.max() - cols.min() + 1 == 16
    assert abs(rows.mean() - 31.5) <= 1 and abs(cols.mean() - 31.5) <= 1  # centred by the crop/pad


def test_placeholder_affine_gets_the_nominal_spacing(tmp_path):
    """Identity affine + placeholder_spacing 1.5 mm, target 3 mm: every in-plane length halves."""
    label = np.zeros((40, 36, 5), np.uint8)
    label[10:30, 8:28] = 2  # 20 x 20 voxels -> 10 x 10 pixels
    image = _ramp(label.shape) + 5 * label
    data = {"image": write_nifti(tmp_path / "i.nii.gz", image, np.eye(4)),
            "label": write_nifti(tmp_path / "l.nii.gz", label, np.eye(4))}
    pre = preprocessing(image_size=32, spacing=3.0, placeholder_spacing=1.5)
    out = pre(data)
    assert out["label"].shape == (1, 32, 32, 5)
    assert int((out["label"][0, :, :, 2] == 2).sum()) == 10 * 10
    np.testing.assert_allclose(np.diag(out["image"].affine)[:3], [3.0, 3.0, 1.0])


def test_placeholder_affine_fit_mode_keeps_the_aspect_ratio(tmp_path):
    """placeholder_spacing None: the longer side (100 voxels) becomes image_size (32) pixels, the other 50 -> 16."""
    label = np.ones((100, 50, 6), np.uint8)
    data = {"image": write_nifti(tmp_path / "i.nii.gz", _ramp(label.shape), np.eye(4)),
            "label": write_nifti(tmp_path / "l.nii.gz", label, np.eye(4))}
    out = preprocessing(image_size=32, spacing=3.0, placeholder_spacing=None)(data)
    mask = out["label"][0, :, :, 0].numpy() == 1
    rows, cols = np.nonzero(mask)
    assert (rows.min(), rows.max()) == (0, 31)  # fills the height exactly
    assert cols.max() - cols.min() + 1 == 16 and abs(cols.mean() - 15.5) <= 0.5  # half the width, centred


@pytest.mark.parametrize("slice_axis, expected_axis", [("auto", 0), (0, 0), (1, 1)])
def test_slice_axis_ends_last_and_inverts(tmp_path, slice_axis, expected_axis):
    """Spacing (8, 1.2, 1.2): auto picks axis 0. Slab k along the slice axis is output slice k; Invertd restores the
    native array and affine exactly (nearest interpolation)."""
    shape = (6, 40, 30)
    label = np.zeros(shape, np.uint8)
    index = [slice(None)] * 3
    index[expected_axis] = 3
    label[tuple(index)] = 1  # one slab along the chosen axis
    affine = np.diag([8.0, 1.2, 1.2, 1.0])
    affine[:3, 3] = [10.0, -20.0, 30.0]
    image_path = write_nifti(tmp_path / "i.nii.gz", _ramp(shape) + 3 * label, affine)
    label_path = write_nifti(tmp_path / "l.nii.gz", label, affine)
    pre = preprocessing(image_size=48, spacing=1.2, slice_axis=slice_axis)
    out = pre({"image": image_path, "label": label_path})
    assert out["label"].shape[-1] == shape[expected_axis]
    per_slice = out["label"][0].sum(dim=(0, 1))
    assert per_slice[3] > 0 and per_slice.sum() == per_slice[3]  # the slab is exactly output slice 3

    image_only = preprocessing(keys=("image",), image_size=48, spacing=1.2, slice_axis=slice_axis)
    data = image_only({"image": label_path})
    data["pred"] = data["image"].clone()
    restored = Invertd("pred", transform=image_only, orig_keys="image", nearest_interp=True)(data)["pred"]
    assert restored.shape == (1, *shape)
    np.testing.assert_allclose(restored.affine.numpy(), affine, atol=1e-6)
    np.testing.assert_array_equal(restored[0].numpy() > 0.5, label > 0)


def test_inverse_of_the_placeholder_fallback_restores_identity(tmp_path):
    label = np.zeros((40, 36, 5), np.uint8)
    label[10:30, 8:28] = 1
    path = write_nifti(tmp_path / "l.nii.gz", label, np.eye(4))
    for placeholder_spacing in (1.5, None):
        pre = preprocessing(keys=("image",), image_size=32, spacing=3.0, placeholder_spacing=placeholder_spacing)
        data = pre({"image": path})
        data["pred"] = data["image"].clone()
        restored = Invertd("pred", transform=pre, orig_keys="image", nearest_interp=True)(data)["pred"]
        assert restored.shape == (1, 40, 36, 5)
        np.testing.assert_allclose(restored.affine.numpy(), np.eye(4), atol=1e-6)
        assert (restored[0].numpy() > 0.5).sum() == pytest.approx(label.sum(), rel=0.05)


def test_percentile_normalisation_known_answer(tmp_path):
    """Native-grid normalisation: (x - p1) / (p99 - p1) on the native volume, nothing clipped; with the target spacing
    equal to the file's and image_size equal to the slice size, the geometry is the identity."""
    rng = np.random.default_rng(0)
    image = rng.gamma(2.0, 50.0, size=(16, 16, 4)).astype(np.float32)
    path = write_nifti(tmp_path / "i.nii.gz", image, np.diag([2.0, 2.0, 6.0, 1.0]))
    out = preprocessing(keys=("image",), image_size=16, spacing=2.0)({"image": path})["image"][0].numpy()
    low, high = np.percentile(image, [1, 99])
    np.testing.assert_allclose(out, (image - low) / (high - low), rtol=1e-4, atol=1e-5)
    assert out.min() < 0 and out.max() > 1  # no clipping


def test_channel_selection_and_label_remapping(tmp_path):
    """A 4D (H, W, Z, 2) file: channel 1 is used; MM-WHS-like raw label values map to class indices."""
    affine = np.diag([2.0, 2.0, 5.0, 1.0])
    channels = np.stack([_ramp((12, 12, 4)), 100 + _ramp((12, 12, 4))[::-1]], axis=-1)
    label = np.zeros((12, 12, 4), np.int16)
    label[2:6, 2:6] = 500
    label[7:10, 7:10] = 205
    data = {"image": write_nifti(tmp_path / "i4.nii.gz", channels, affine),
            "label": write_nifti(tmp_path / "l.nii.gz", label, affine)}
    pre = preprocessing(image_size=12, spacing=2.0, channel=1, label_values=[0, 205, 500])
    out = pre(data)
    single = preprocessing(keys=("image",), image_size=12, spacing=2.0)(
        {"image": write_nifti(tmp_path / "c1.nii.gz", channels[..., 1], affine)})
    torch.testing.assert_close(out["image"], single["image"])
    image_only = preprocessing(keys=("image",), image_size=12, spacing=2.0, channel=1)
    inverted = image_only({"image": data["image"]})
    inverted["pred"] = torch.cat([inverted["image"]] * 3)  # e.g. 3 class probabilities
    restored = Invertd("pred", transform=image_only, orig_keys="image")(inverted)["pred"]
    assert restored.shape == (3, 12, 12, 4)  # back on the 3D native grid
    assert set(torch.unique(out["label"]).tolist()) == {0, 1, 2}
    assert int((out["label"] == 2).sum()) == 16 * 4 and int((out["label"] == 1).sum()) == 9 * 4
    with pytest.raises(RuntimeError) as error:  # MONAI's Compose wraps the transform's ValueError
        preprocessing(image_size=12, spacing=2.0)(data)
    assert "i4.nii.gz: 'image' has 2 channels" in str(error.value.__cause__)  # 4D without a channel, file named
    label[0, 0, 0] = 7
    data["label"] = write_nifti(tmp_path / "bad.nii.gz", label, affine)
    with pytest.raises(RuntimeError) as error:
        pre(data)
    assert "bad.nii.gz: unexpected label values [7]" in str(error.value.__cause__)
