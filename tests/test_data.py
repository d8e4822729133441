"""Datalists (patient-level roles, labelled subsets) and the slice view of pre-processed volumes."""

import json

import pytest
import torch

from scripts.data import VolumeSlices, check_datalist, find_images, load_datalist, split_patients, write_datalist


def _cases(num_patients, frames=1):
    return [
        {"image": f"/d/p{p:03d}_f{f}.nii.gz", "label": f"/d/p{p:03d}_f{f}_gt.nii.gz", "patient": f"p{p:03d}"}
        for p in range(num_patients)
        for f in range(frames)
    ]


def test_split_is_patient_level_seeded_and_disjoint():
    datalist = split_patients(_cases(20, frames=2), num_validation=2, num_test=5, subset_sizes=(1, 2, 8),
                              num_subsets=(3, 3, 1), seed=4)
    roles = {r: {c["patient"] for c in datalist[r]} for r in ("pretrain", "validation", "test")}
    assert len(roles["validation"]) == 2 and len(roles["test"]) == 5 and len(roles["pretrain"]) == 13
    assert not (roles["pretrain"] & roles["test"]) and not (roles["validation"] & roles["test"])
    assert not (roles["pretrain"] & roles["validation"])
    assert len(datalist["pretrain"]) == 26  # both frames of each pool patient
    assert all("label" not in c for c in datalist["pretrain"])  # pre-training never sees labels
    for size, count in ((1, 3), (2, 3), (8, 1)):
        for i in range(count):
            patients = {c["patient"] for c in datalist[f"labelled_{size}_{i}"]}
            assert len(patients) == size and patients <= roles["pretrain"]
    assert len({frozenset(c["patient"] for c in datalist[f"labelled_1_{i}"]) for i in range(3)}) == 3
    assert datalist == split_patients(_cases(20, frames=2), 2, 5, (1, 2, 8), (3, 3, 1), seed=4)
    assert datalist != split_patients(_cases(20, frames=2), 2, 5, (1, 2, 8), (3, 3, 1), seed=5)


def test_split_and_check_reject_bad_requests():
    with pytest.raises(ValueError, match="training pool"):
        split_patients(_cases(4), num_validation=2, num_test=2)
    with pytest.raises(ValueError, match="at least 8"):
        split_patients(_cases(8), num_validation=1, num_test=1, subset_sizes=(8,), num_subsets=(1,))
    cases = _cases(3)
    with pytest.raises(ValueError, match="both 'pretrain' and 'test'"):
        check_datalist({"pretrain": cases[:2], "validation": [], "test": cases[1:]})
    with pytest.raises(ValueError, match="not in the training pool"):
        check_datalist({"pretrain": cases[:1], "validation": cases[1:2], "test": [], "labelled_1_0": cases[1:2]})


def test_datalist_round_trip_with_relative_paths(tmp_path):
    cases = [{"image": str(tmp_path / "a" / "img.nii.gz"), "label": str(tmp_path / "a" / "lab.nii.gz"), "patient": "a"}]
    path = write_datalist(str(tmp_path / "datalist.json"), {"test": cases})
    assert json.load(open(path))["test"][0]["image"] == "a/img.nii.gz"
    assert load_datalist(path, "test") == cases
    with pytest.raises(ValueError, match="has no list 'validation'"):
        load_datalist(path, "validation")
    assert not list(tmp_path.glob("*.tmp"))


def test_find_images(tmp_path):
    (tmp_path / "b.nii.gz").write_bytes(b"")
    (tmp_path / "a.nii.gz").write_bytes(b"")
    assert [d["image"] for d in find_images(str(tmp_path / "*.nii.gz"))] == [
        str(tmp_path / "a.nii.gz"), str(tmp_path / "b.nii.gz")]
    with pytest.raises(FileNotFoundError, match="no input image matches"):
        find_images(str(tmp_path / "*.nii"))


def test_volume_slices_metadata_and_indexing():
    volumes = [{"image": torch.arange(2 * 3 * 8.0).reshape(1, 2, 3, 8)},
               {"image": torch.arange(2 * 3 * 5.0).reshape(1, 2, 3, 5) + 1000}]
    slices = VolumeSlices(volumes, num_partitions=4, keys=("image",))
    assert slices.slice_counts == [8, 5] and len(slices) == 13
    item = slices[(1, 3)]
    assert item["image"].shape == (1, 2, 3)
    assert torch.equal(item["image"], volumes[1]["image"][..., 3])
    assert (item["volume"], item["slice"], item["partition"], item["position"]) == (1, 3, 2, 3 / 5)  # floor(3*4/5)
    flat = slices[8 + 3]
    assert torch.equal(flat["image"], item["image"]) and flat["volume"] == 1 and flat["slice"] == 3
    assert [slices[(0, k)]["partition"] for k in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]
    with pytest.raises(ValueError):
        VolumeSlices(volumes, num_partitions=0)
