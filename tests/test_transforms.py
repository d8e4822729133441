"""Pre-processing with known answers, and the tensor augmentations of pre-training and fine-tuning."""

import os

import nibabel as nib
import numpy as np
import pytest
import torch
from ignite.engine import Engine
from monai.bundle import ConfigParser
from monai.transforms import Invertd, Rand2DElastic

from conftest import CONFIGS, write_nifti
from scripts.transforms import RandBrightnessContrast, RandCropResize, RandSpatialAugmentd, preprocessing


@pytest.fixture
def square_volume(tmp_path):
    """A 40 mm bright square centred in a 128 x 96 x 5 volume of 1 x 1 x 8 mm voxels, with a known intensity ramp."""
    image = np.zeros((128, 96, 5), np.float32)
    image[44:84, 28:68] = 100.0
    image += np.linspace(0, 1, 5, dtype=np.float32)  # slice-wise offset, tiny next to the square
    label = np.zeros((128, 96, 5), np.uint8)
    label[44:84, 28:68] = 2
    return {"image": write_nifti(tmp_path / "img.nii.gz", image, spacing=(1, 1, 8)),
            "label": write_nifti(tmp_path / "lab.nii.gz", label, spacing=(1, 1, 8))}


def test_resampling_keeps_physical_size_and_slices(square_volume):
    out = preprocessing(image_size=32, spacing=2.0)(square_volume)
    image, label = out["image"], out["label"]
    assert image.shape == (1, 32, 32, 5) and label.shape == (1, 32, 32, 5)  # z is not resampled
    assert torch.allclose(torch.abs(torch.diag(image.affine))[:3], torch.tensor([2.0, 2.0, 8.0], dtype=torch.float64))
    # 40 mm at 2 mm/px = 20 x 20 pixels, centred after the 64 x 48 grid is centre-cropped/padded to 32 x 32
    area = (label[0, :, :, 2] == 2).sum().item()
    assert area == 20 * 20
    rows = torch.nonzero(label[0, :, :, 2] == 2)[:, 0]
    assert abs(rows.float().mean().item() - 15.5) <= 0.5
    assert set(torch.unique(label).tolist()) == {0, 2}  # nearest interpolation


def test_percentile_normalisation(square_volume):
    image = preprocessing(image_size=32, spacing=2.0, keys=("image",))(square_volume)["image"]
    values = image.flatten()
    assert torch.quantile(values, 0.01).item() == pytest.approx(0.0, abs=1e-3)
    assert torch.quantile(values, 0.99).item() == pytest.approx(1.0, abs=1e-3)


def test_inverse_restores_native_grid(square_volume):
    pre = preprocessing(image_size=32, spacing=2.0, keys=("image",))
    data = pre({"image": square_volume["image"]})
    data["pred"] = data["image"].clone()
    restored = Invertd("pred", transform=pre, orig_keys="image", nearest_interp=True)(data)["pred"]
    assert restored.shape == (1, 128, 96, 5)
    native = nib.load(square_volume["image"]).get_fdata()
    inside = restored[0, 50:78, 34:62, 2]
    assert inside.min() > 0.9 and native[50:78, 34:62, 2].min() == pytest.approx(100.5)


def test_crop_resize_identity_at_full_area_and_zoom_otherwise():
    x = torch.rand(6, 1, 32, 32)
    torch.testing.assert_close(RandCropResize(area=1.0)(x), x, atol=1e-5, rtol=0)
    crop = RandCropResize(area=0.25)
    crop.set_random_state(0)
    y = crop(torch.arange(32.0).repeat(6, 1, 32, 1))  # a ramp: a crop of half the side, resized back, halves its slope
    slope = (y[:, 0, 16, 20] - y[:, 0, 16, 10]) / 10
    torch.testing.assert_close(slope, torch.full((6,), 0.5), atol=0.02, rtol=0)
    with pytest.raises(ValueError, match="global#crop_area_start"):  # names the settings a user can fix
        RandCropResize(area=0.0)


def test_brightness_contrast_per_slice_and_clipped():
    aug = RandBrightnessContrast()
    aug.set_random_state(1)
    y = aug(torch.rand(16, 1, 8, 8))
    assert y.shape == (16, 1, 8, 8) and y.min() >= 0.0 and y.max() <= 1.5
    assert y.mean(dim=(1, 2, 3)).std() > 0.05  # independent draws per slice
    again = RandBrightnessContrast()
    again.set_random_state(1)
    x = torch.rand(16, 1, 8, 8)
    aug.set_random_state(1)
    torch.testing.assert_close(aug(x), again(x))  # seeded like any MONAI Randomizable


def _monai_elastic(x, mode):
    """MONAI's Rand2DElastic at zero magnitude with the config's spacing (32 px at 64 px) and zero padding: what the
    replaced MONAI pipeline's elastic step does to a slice (its bicubic control grid is not exactly the identity)."""
    elastic = Rand2DElastic(spacing=32, magnitude_range=(0.0, 0.0), prob=1.0, padding_mode="zeros")
    return torch.as_tensor(elastic(x, mode=mode))


def test_spatial_augment_draws_one_of_five_transforms_per_slice_as_the_monai_pipeline_did():
    # no angle range, no zoom, no elastic offsets: each output must be the MONAI pipeline's result for one of
    # {none, flip, rotation by 90, 180, 270 degrees}, and every one of them must occur
    aug = RandSpatialAugmentd(["image", "label"], rotation_range=0.0, zoom_range=(1.0, 1.0), step_degrees=90,
                              elastic_spacing=32, elastic_magnitude=(0.0, 0.0))
    aug.set_random_state(0)
    image = torch.rand(40, 1, 64, 64)
    label = torch.randint(0, 4, (40, 1, 64, 64)).float()
    out = aug({"image": image, "label": label, "other": "kept"})
    assert out["other"] == "kept" and out["image"].shape == image.shape and out["label"].dtype == torch.float32
    seen = set()
    for i in range(40):
        candidates = {"none": image[i], "flip": image[i].flip(-1),
                      **{f"rot{k}": torch.rot90(image[i], k, dims=(1, 2)) for k in (1, 2, 3)}}
        matches = [name for name, x in candidates.items()
                   if torch.allclose(out["image"][i], _monai_elastic(x, "bilinear"), atol=1e-4)]
        assert len(matches) == 1, (i, matches)
        seen.add(matches[0])
        x = {"none": label[i], "flip": label[i].flip(-1)}.get(matches[0])
        x = torch.rot90(label[i], int(matches[0][3:]), dims=(1, 2)) if x is None else x
        assert torch.equal(out["label"][i], _monai_elastic(x, "nearest"))  # the same draw for the label
    assert seen == {"none", "flip", "rot1", "rot2", "rot3"}


def test_spatial_augment_moves_image_and_label_together_and_is_seeded():
    image = torch.zeros(16, 1, 64, 64)
    image[:, :, 20:44, 16:40] = 1.0  # an off-centre square
    label = (image > 0.5).to(torch.uint8)
    aug = RandSpatialAugmentd(["image", "label"])  # the config's ranges, elastic up to 2 px
    aug.set_random_state(3)
    out = aug({"image": image, "label": label})
    assert out["label"].dtype == torch.uint8 and set(out["label"].unique().tolist()) <= {0, 1}
    agree = ((out["image"] > 0.5).to(torch.uint8) == out["label"]).float().mean()
    assert agree > 0.99  # the same geometry for both keys
    moved = (out["label"] != label).flatten(1).any(1)
    assert moved.sum() >= 12  # elastic offsets move every slice a little; most slices also rotate, zoom or flip
    again = RandSpatialAugmentd(["image", "label"])
    again.set_random_state(3)
    assert torch.equal(again({"image": image, "label": label})["label"], out["label"])
    with pytest.raises(ValueError, match="step_degrees"):
        RandSpatialAugmentd(["image"], mode="bilinear", step_degrees=50)
    with pytest.raises(ValueError, match="mode"):
        RandSpatialAugmentd(["image", "label"], mode=["bilinear", "bicubic"])


@pytest.mark.parametrize("ramp, expected", [(0, [0.25] * 6), (4, [0.8125, 0.625, 0.4375, 0.25, 0.25, 0.25])])
def test_global_crop_area_follows_the_schedule_of_pretrain_yaml(ramp, expected):
    """pretrain.yaml's crop schedule sets the crop's area before each iteration: 1.0 -> crop_area over the ramp."""
    parser = ConfigParser()
    parser.read_config([os.path.join(CONFIGS, "train.yaml"), os.path.join(CONFIGS, "pretrain.yaml")])
    parser.update({"global#crop_area": 0.25, "global#crop_area_start": 1.0, "global#crop_ramp_iterations": ramp})
    crop = parser.get_parsed_content("global#crop")
    areas = []
    engine = Engine(lambda engine, batch: areas.append(crop.area))
    parser.get_parsed_content("global#crop_schedule").attach(engine)
    engine.run(range(6), max_epochs=1)
    assert areas == pytest.approx(expected)
    with pytest.raises(ValueError):
        crop.area = 0.0
