"""Tests of the synthetic short-axis cardiac MRI generator (bundle/scripts/synthetic.py)."""

import logging
import os

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from scripts import synthetic
from scripts.synthetic import make_volume, patient_group, patient_seed, write_dataset

SEEDS = list(range(12))


@pytest.fixture(scope="module")
def volumes():
    return {s: make_volume(s) for s in SEEDS}


def _radius_mm(shape, spacing):
    h, w = shape
    x = (np.arange(h) - (h - 1) / 2.0) * spacing[0]
    y = (np.arange(w) - (w - 1) / 2.0) * spacing[1]
    return np.hypot(x[:, None], y[None, :])


def _area(label, cls):
    return (label == cls).sum(axis=(0, 1))


def test_shapes_dtypes_ranges(volumes):
    for image, label, spacing in volumes.values():
        assert image.dtype == np.float32 and label.dtype == np.uint8
        assert image.ndim == 3 and image.shape == label.shape
        h, w, z = image.shape
        assert h in synthetic.IN_PLANE_SIZES and w in synthetic.IN_PLANE_SIZES
        assert synthetic.NUM_SLICES_RANGE[0] <= z <= synthetic.NUM_SLICES_RANGE[1]
        assert len(spacing) == 3 and spacing[0] == spacing[1] and spacing[2] == synthetic.SLICE_SPACING
        assert synthetic.IN_PLANE_SPACING_RANGE[0] <= spacing[0] <= synthetic.IN_PLANE_SPACING_RANGE[1]
        assert np.isfinite(image).all() and image.min() >= 0.0 and image.max() <= 1.0
        assert image.max() - image.min() > 0.99  # min-max scaled
        assert set(np.unique(label)) <= {0, 1, 2, 3}


def test_deterministic_and_seed_dependent(volumes):
    image, label, spacing = make_volume(SEEDS[0])
    np.testing.assert_array_equal(image, volumes[SEEDS[0]][0])
    np.testing.assert_array_equal(label, volumes[SEEDS[0]][1])
    assert spacing == volumes[SEEDS[0]][2]
    other = volumes[SEEDS[1]]
    assert image.shape != other[0].shape or not np.array_equal(image, other[0])


def test_options_override_only_what_they_name(volumes):
    image, label, spacing = volumes[3]
    quiet = make_volume(3, noise_level=0.0)
    np.testing.assert_array_equal(quiet[1], label)  # anatomy does not depend on the noise stream
    assert not np.array_equal(quiet[0], image)
    img, lab, sp = make_volume(3, num_slices=5, shape=(96, 128), in_plane_spacing=2.0, slice_spacing=8.0)
    assert img.shape == lab.shape == (96, 128, 5) and sp == (2.0, 2.0, 8.0)
    assert (lab[..., 2] == 3).any()


@pytest.mark.parametrize(
    "seed, options",
    [(-1, {}), (1.5, {}), (True, {}), (0, {"bogus": 1}), (0, {"num_slices": 1}), (0, {"shape": (10, 10)}),
     (0, {"in_plane_spacing": 0.0}), (0, {"noise_level": -0.1})],
)
def test_make_volume_rejects_bad_arguments(seed, options):
    with pytest.raises(ValueError):
        make_volume(seed, **options)


def test_mid_slices_have_all_classes_and_nested_structure(volumes):
    for image, label, spacing in volumes.values():
        z = label.shape[2]
        for k in range(z // 4, z // 2 + 1):  # basal-to-mid slices: RV still present
            assert {1, 2, 3} <= set(np.unique(label[..., k])), k
        for k in range(1, z):  # the myocardium surrounds the LV (slice 0 may show an open outflow tract)
            lv = label[..., k] == 3
            if lv.any():
                assert not (ndimage.binary_dilation(lv) & (label[..., k] == 0)).any(), k
        for k in range(z):  # RV crescent sits against the myocardium (septum)
            rv = label[..., k] == 1
            if rv.any():
                assert (ndimage.binary_dilation(rv) & (label[..., k] == 2)).any(), k
                assert not (ndimage.binary_dilation(rv) & (label[..., k] == 3)).any(), k


def test_depth_cue_base_to_apex(volumes):
    for image, label, spacing in volumes.values():
        z = label.shape[2]
        lv, rv, myo = _area(label, 3), _area(label, 1), _area(label, 2)
        q = max(1, z // 4)
        assert lv[:q].mean() > 1.5 * lv[-q:].mean()  # LV shrinks towards the apex
        assert rv[-1] == 0 and rv[0] == rv.max()  # RV largest at the base, absent in the last slice
        assert np.all(np.diff(rv) <= 0)  # and it only shrinks
        assert myo[-1] > 0 and lv[-1] < 0.2 * lv.max()  # apex: (almost) myocardium only
        # relative wall thickness grows: myo / (myo + LV) larger at the apex than at the base
        assert (myo[-q:] / (myo[-q:] + lv[-q:])).mean() > (myo[:q] / (myo[:q] + lv[:q])).mean()


def test_relative_depth_profiles_agree_across_volumes(volumes):
    """Slices at the same relative depth of different volumes show similar anatomy (the partition cue)."""
    grid = np.linspace(0, 1, 9)
    profiles = []
    for image, label, spacing in volumes.values():
        z = label.shape[2]
        lv_mm2 = _area(label, 3) * spacing[0] * spacing[1]
        profiles.append(np.interp(grid, np.linspace(0, 1, z), lv_mm2 / lv_mm2.max()))
    profiles = np.array(profiles)
    assert profiles.std(axis=0).max() < 0.25
    assert profiles[:, 0].mean() > 0.8 and profiles[:, -1].mean() < 0.15


def _compositions(label):
    """(Z, 3) areas of RV, myocardium and LV per slice, over the volume's largest heart cross-section: what a slice
    shows, wherever the heart sits and whatever its size."""
    areas = np.array([[(label[..., k] == c).sum() for c in (1, 2, 3)] for k in range(label.shape[2])], float)
    return areas / areas.sum(axis=1).max()


def test_partition_cue_same_partition_slices_alike(volumes):
    """Slices of the same partition (floor(k * S / Z), S = 4) of different volumes show more similar anatomy than
    slices of different partitions: the cue the G^D / L^D strategies rely on."""
    slices = []  # (volume, partition, composition)
    for v, (image, label, spacing) in volumes.items():
        z = label.shape[2]
        slices += [(v, k * 4 // z, c) for k, c in enumerate(_compositions(label))]
    same, other = [], []
    for i, (v1, p1, c1) in enumerate(slices):
        for v2, p2, c2 in slices[i + 1 :]:
            if v1 != v2:
                (same if p1 == p2 else other).append(np.abs(c1 - c2).sum())
    # ~0.56 here; slices shuffled within each volume (no cue) give ~1.0
    assert np.mean(same) < 0.7 * np.mean(other), (np.mean(same), np.mean(other))


def test_patient_groups_and_intensity_response_vary():
    """Every ACDC-like group occurs, changes the heart as documented, and each volume has its own gamma."""
    seeds = range(60)
    drawn = [patient_group(s) for s in seeds]
    groups = {g for g, _ in drawn}
    assert groups == set(synthetic.PATHOLOGIES)
    gammas = np.array([g for _, g in drawn])
    lo, hi = synthetic.GAMMA_RANGE
    assert lo <= gammas.min() and gammas.max() <= hi and gammas.min() < 0.7 and gammas.max() > 1.4
    # mid-ventricular wall thickness / cavity radius: hypertrophic hearts have thick walls, dilated ones thin walls
    ratio = {}
    for s, (group, _) in zip(seeds, drawn):
        if group in ("dilated", "hypertrophic") and len(ratio.setdefault(group, [])) < 3:
            image, label, spacing = make_volume(s)
            k = label.shape[2] // 3
            myo, lv = (label[..., k] == 2).sum(), (label[..., k] == 3).sum()
            ratio[group].append(myo / lv)
    assert min(ratio["hypertrophic"]) > max(ratio["dilated"]), ratio


def test_labels_consistent_with_image(volumes):
    """Labels mark what the image shows: the LV blood pool is brighter than the myocardium in every volume and
    (nearly) every slice, so the labels do not drift from the anatomy whatever the gamma."""
    for image, label, spacing in volumes.values():
        bright = [np.median(image[..., k][label[..., k] == 3]) > np.median(image[..., k][label[..., k] == 2])
                  for k in range(label.shape[2]) if (label[..., k] == 3).sum() > 20]
        assert np.mean(bright) >= 0.9, bright


def test_heart_size_and_position(volumes):
    for image, label, spacing in volumes.values():
        radius = _radius_mm(label.shape[:2], spacing)
        for k in range(label.shape[2]):
            fg = label[..., k] > 0
            assert radius[fg].max() < synthetic.MAX_HEART_EXTENT
        lv_outer = (label[..., 0] >= 2).sum() * spacing[0] * spacing[1]
        diameter = 2 * np.sqrt(lv_outer / np.pi)
        assert 40.0 < diameter < 70.0, diameter


def test_volumes_vary(volumes):
    centroids, blood, myo, shapes = [], [], [], set()
    for image, label, spacing in volumes.values():
        k = label.shape[2] // 2
        ij = np.argwhere(label[..., k] == 3).mean(0)
        centroids.append((ij - (np.array(label.shape[:2]) - 1) / 2.0) * spacing[0])
        blood.append(image[label == 3].mean())
        myo.append(image[label == 2].mean())
        shapes.add(image.shape)
    assert np.array(centroids).std(0).min() > 2.0  # mm
    assert np.std(blood) > 0.03 and np.std(myo) > 0.01
    assert len(shapes) > 3


def test_not_trivially_thresholdable(volumes):
    for image, label, spacing in volumes.values():
        image = image / np.percentile(image, 99)  # as the pre-processing scales it (bias fields make outliers)
        lv_blood = np.median(image[label == 3])
        assert lv_blood > image[label == 2].mean() + 0.1  # blood brighter than myocardium
        bright_background = (image >= lv_blood) & (label == 0)
        assert bright_background.sum() > 100  # fat, aorta, atrium, vessels share the blood-pool intensity
        # the myocardium is not separable from the background by intensity alone
        lo, hi = np.percentile(image[label == 2], [10, 90])
        assert ((image >= lo) & (image <= hi) & (label == 0)).sum() > 5 * (label == 2).sum()


def _files(folder):
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs)


def test_write_dataset_layout_roundtrip_and_skip(tmp_path, caplog, capsys):
    out = tmp_path / "data"
    with caplog.at_level(logging.INFO, logger="scripts.synthetic"):
        records = write_dataset(str(out), num_patients=3, seed=7)
    assert capsys.readouterr().out == ""
    assert len([r for r in caplog.records if r.name == "scripts.synthetic"]) == 1
    assert [r["patient"] for r in records] == ["patient001", "patient002", "patient003"]
    assert _files(out) == sorted(
        f"patient00{i}/patient00{i}_frame01{sfx}.nii.gz" for i in (1, 2, 3) for sfx in ("", "_gt")
    )  # nothing else (no temporary files)
    for i, rec in enumerate(records):
        assert rec["image"] == str(out / rec["patient"] / f"{rec['patient']}_frame01.nii.gz")
        assert rec["label"] == str(out / rec["patient"] / f"{rec['patient']}_frame01_gt.nii.gz")
        image, label, spacing = make_volume(patient_seed(7, i))
        img_nii, lab_nii = nib.load(rec["image"]), nib.load(rec["label"])
        np.testing.assert_allclose(img_nii.affine, np.diag([*spacing, 1.0]), rtol=1e-6)
        np.testing.assert_allclose(lab_nii.affine, np.diag([*spacing, 1.0]), rtol=1e-6)
        np.testing.assert_allclose(img_nii.header.get_zooms(), spacing, rtol=1e-6)
        assert img_nii.get_data_dtype() == np.float32 and lab_nii.get_data_dtype() == np.uint8
        np.testing.assert_array_equal(np.asarray(img_nii.dataobj), image)
        np.testing.assert_array_equal(np.asarray(lab_nii.dataobj), label)

    # existing files are kept unless overwrite=True
    victim = records[1]["image"]
    with open(victim, "wb") as f:
        f.write(b"sentinel")
    assert write_dataset(str(out), num_patients=3, seed=7) == records
    assert open(victim, "rb").read() == b"sentinel"
    # a missing half of a pair is regenerated
    os.remove(records[2]["label"])
    write_dataset(str(out), num_patients=3, seed=7)
    assert os.path.isfile(records[2]["label"])
    write_dataset(str(out), num_patients=3, seed=7, overwrite=True)
    assert open(victim, "rb").read() != b"sentinel"
    np.testing.assert_array_equal(np.asarray(nib.load(victim).dataobj), make_volume(patient_seed(7, 1))[0])
    assert len(_files(out)) == 6


def test_write_dataset_deterministic_bytes_and_prefix_stable(tmp_path):
    a = write_dataset(str(tmp_path / "a"), num_patients=2, seed=3)
    b = write_dataset(str(tmp_path / "b"), num_patients=1, seed=3)
    c = write_dataset(str(tmp_path / "c"), num_patients=1, seed=4)
    for key in ("image", "label"):
        assert open(a[0][key], "rb").read() == open(b[0][key], "rb").read()
        assert open(a[0][key], "rb").read() != open(c[0][key], "rb").read()
    assert open(a[0]["image"], "rb").read() != open(a[1]["image"], "rb").read()


@pytest.mark.parametrize(
    "kwargs",
    [{"num_patients": 0}, {"num_patients": -2}, {"num_patients": 2.5}, {"num_patients": True}, {"seed": -1},
     {"seed": "0"}, {"output_dir": ""}],
)
def test_write_dataset_rejects_bad_arguments(tmp_path, kwargs):
    args = {"output_dir": str(tmp_path / "x"), "num_patients": 1, "seed": 0, **kwargs}
    with pytest.raises(ValueError):
        write_dataset(**args)
    assert not (tmp_path / "x").exists()
