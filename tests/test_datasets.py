"""Dataset adapters (ACDC, Decathlon, MM-WHS, any folder, the synthetic data), bad-input checks, the prepare step
(split, datalist, disk cache) and the shared ACDC data (marked `realdata`, skipped when ../shared/data/acdc is
absent)."""

import json
import logging
import os

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from conftest import BUNDLE, CONFIGS, ROOT, config, run, write_nifti
from scripts.contract import make_contract
from scripts.data import CachedVolumes, datalist_info, label_names, load_datalist, split_patients
from scripts.datasets import (
    ACDC_LABELS,
    acdc,
    check_case,
    decathlon,
    fill_cache,
    folder,
    mmwhs,
    prepare,
    synthetic,
    validate,
)
from scripts.synthetic import write_dataset
from scripts.transforms import preprocessing

SHARED_ACDC = os.path.join(ROOT, "..", "shared", "data", "acdc")
SETTINGS = {"image_size": 16, "spacing": 3.0, "slice_axis": "auto", "placeholder_spacing": 1.5}
SMALL_SPLIT = {"num_validation": 1, "num_test": 1, "subset_sizes": [1, 2], "num_subsets": [2, 1]}


def _nii(path, array, affine=None):
    """A NIfTI file of 2 x 2 x 8 mm voxels unless ``affine`` is given; returns its path."""
    return write_nifti(path, array, affine, spacing=(2.0, 2.0, 8.0))


def _pair(seed, shape=(20, 18, 6), classes=4):
    rng = np.random.default_rng(seed)
    label = np.zeros(shape, np.uint8)
    for c in range(1, classes):
        label[2 + 3 * c : 5 + 3 * c, 3:12] = c
    image = (rng.random(shape) + label).astype(np.float32)
    return image, label


def _acdc_tree(root, num_patients=5, frames=(1, 2), info=False):
    for p in range(1, num_patients + 1):
        name = f"patient{p:03d}"
        for f in frames:
            image, label = _pair(p * 10 + f)
            _nii(root / name / f"{name}_frame{f:02d}.nii.gz", image)
            _nii(root / name / f"{name}_frame{f:02d}_gt.nii.gz", label)
        if info:
            (root / name / "Info.cfg").write_text(f"ED: {frames[-1]}\nES: {frames[0]}\nGroup: NOR\n")
    return root


# ---------------------------------------------------------------- adapters
def test_acdc_phases_from_frame_order_and_info_cfg(tmp_path):
    root = _acdc_tree(tmp_path / "raw", num_patients=3)
    ed = acdc(str(root))
    assert [(c["patient"], c["frame"], c["phase"]) for c in ed.cases] == [
        ("patient001", 1, "ED"), ("patient002", 1, "ED"), ("patient003", 1, "ED")]
    assert ed.cases[0]["label"].endswith("patient001_frame01_gt.nii.gz") and os.path.isabs(ed.cases[0]["image"])
    assert ed.labels == {"0": "background", "1": "right ventricle", "2": "myocardium", "3": "left ventricle"}
    both = acdc(str(root), phases="both")
    assert len(both.cases) == 6 and {c["patient"] for c in both.cases} == {"patient001", "patient002", "patient003"}
    assert [c["frame"] for c in acdc(str(root), phases=["ES"]).cases] == [2, 2, 2]
    # real ACDC: Info.cfg names the frames (here ED is frame 12, ES frame 3), nested under training/
    real = _acdc_tree(tmp_path / "release" / "training", num_patients=2, frames=(3, 12), info=True)
    cases = acdc(str(real.parent), phases=["ED", "ES"]).cases
    assert [(c["phase"], c["frame"]) for c in cases] == [("ED", 12), ("ES", 3)] * 2
    with pytest.raises(ValueError, match="phases"):
        acdc(str(root), phases="mid")


def test_decathlon_layout_channels_labels_and_test_images(tmp_path):
    task = tmp_path / "Task05_Prostate"
    training = []
    for i in range(3):
        image, label = _pair(i, classes=3)
        _nii(task / "imagesTr" / f"prostate_{i:02d}.nii.gz", np.stack([image, image * 2], axis=-1))
        _nii(task / "labelsTr" / f"prostate_{i:02d}.nii.gz", label)
        training.append({"image": f"./imagesTr/prostate_{i:02d}.nii.gz",
                         "label": f"./labelsTr/prostate_{i:02d}.nii.gz"})
    _nii(task / "imagesTs" / "prostate_90.nii.gz", np.stack([image, image], axis=-1))
    (task / "dataset.json").write_text(json.dumps({
        "name": "PROSTATE", "modality": {"0": "T2", "1": "ADC"},
        "labels": {"0": "background", "1": "PZ", "2": "TZ"},
        "training": training, "test": ["./imagesTs/prostate_90.nii.gz"]}))
    raw = decathlon(str(task), channel="T2")
    assert raw.channel == 0 and raw.labels == {"0": "background", "1": "PZ", "2": "TZ"}
    assert [c["patient"] for c in raw.cases] == ["prostate_00", "prostate_01", "prostate_02"]
    assert raw.cases[1]["image"] == str(task / "imagesTr" / "prostate_01.nii.gz")
    assert decathlon(str(tmp_path), task="Task05_Prostate", channel=1).channel == 1  # the parent folder + task
    assert len(decathlon(str(task), channel=0, include_test=True).cases) == 4
    with pytest.raises(ValueError, match="2 modalities"):
        decathlon(str(task))
    with pytest.raises(ValueError, match="'DWI' is not a modality"):
        decathlon(str(task), channel="DWI")
    # nnU-Net v2 style labels {name: value}
    meta = json.loads((task / "dataset.json").read_text())
    meta["labels"] = {"background": 0, "PZ": 1, "TZ": 2}
    (task / "dataset.json").write_text(json.dumps(meta))
    assert decathlon(str(task), channel=0).labels == {"0": "background", "1": "PZ", "2": "TZ"}


def test_decathlon_offline_download_path(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="download"):
        decathlon(str(tmp_path), task="Task05_Prostate")  # no dataset.json, download not asked: say how

    import monai.apps

    def offline(**kwargs):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(monai.apps, "download_and_extract", offline)
    with pytest.raises(RuntimeError, match="could not download Decathlon Task05_Prostate .* --raw_dir"):
        decathlon(str(tmp_path), task="Task05_Prostate", download=True, channel=0)

    def fake_download(url, filepath, output_dir, hash_val, hash_type):  # what MONAI's extraction leaves behind
        assert url.endswith("Task05_Prostate.tar") and hash_type == "md5"
        image, label = _pair(0, classes=3)
        _nii(os.path.join(output_dir, "Task05_Prostate", "imagesTr", "p.nii.gz"), image)
        _nii(os.path.join(output_dir, "Task05_Prostate", "labelsTr", "p.nii.gz"), label)
        with open(os.path.join(output_dir, "Task05_Prostate", "dataset.json"), "w") as f:
            json.dump({"labels": {"0": "bg", "1": "PZ", "2": "TZ"}, "modality": {"0": "T2"},
                       "training": [{"image": "./imagesTr/p.nii.gz", "label": "./labelsTr/p.nii.gz"}]}, f)

    monkeypatch.setattr(monai.apps, "download_and_extract", fake_download)
    raw = decathlon(str(tmp_path / "downloads"), task="Task05_Prostate", download=True)
    assert raw.root == str(tmp_path / "downloads" / "Task05_Prostate") and len(raw.cases) == 1


def test_mmwhs_remaps_raw_label_values(tmp_path):
    values = [205, 420, 500, 550, 600, 820, 850]
    for i in (1001, 1002):
        image, label = _pair(i, classes=8)
        raw_label = np.where(label > 0, np.array([0] + values)[label], 0).astype(np.int16)
        _nii(tmp_path / "mr_train" / f"mr_train_{i}_image.nii.gz", image)
        _nii(tmp_path / "mr_train" / f"mr_train_{i}_label.nii.gz", raw_label)
    _nii(tmp_path / "mr_test" / "mr_test_2001_image.nii.gz", image)  # unlabelled: ignored unless asked
    raw = mmwhs(str(tmp_path))
    assert [c["patient"] for c in raw.cases] == ["mr_train_1001", "mr_train_1002"] and not raw.problems
    assert raw.label_values == [0] + values and raw.labels["3"] == "left ventricle" and len(raw.labels) == 8
    assert len(mmwhs(str(tmp_path), include_unlabelled=True).cases) == 3
    assert check_case(raw.cases[0], label_values=raw.label_values) == []
    assert "unexpected label values [205" in check_case(raw.cases[0], label_values=range(8))[0][1]
    with pytest.raises(ValueError, match="label names for 8 classes"):
        mmwhs(str(tmp_path), labels=["background", "heart"])


def test_folder_pairs_by_wildcard_text_and_groups_patients(tmp_path):
    for name in ("p01_a", "p01_b", "p02_a", "p03_a"):
        image, label = _pair(len(name))
        _nii(tmp_path / "img" / f"{name}_0000.nii.gz", image)
        _nii(tmp_path / "seg" / f"{name}.nii.gz", label)
    raw = folder(str(tmp_path), "img/*_0000.nii.gz", "seg/*.nii.gz", labels=["bg", "a", "b", "c"],
                 patient_pattern=r"(p\d+)_")
    assert [(c["patient"], os.path.basename(c["label"])) for c in raw.cases] == [
        ("p01", "p01_a.nii.gz"), ("p01", "p01_b.nii.gz"), ("p02", "p02_a.nii.gz"), ("p03", "p03_a.nii.gz")]
    # per-case sub-folders: the folder name is the case id
    for name in ("x", "y"):
        image, label = _pair(1)
        _nii(tmp_path / "cases" / name / "image.nii.gz", image)
        _nii(tmp_path / "cases" / name / "mask.nii.gz", label)
    _nii(tmp_path / "cases" / "z" / "image.nii.gz", image)  # no mask
    raw = folder(str(tmp_path / "cases"), "*/image.nii.gz", "*/mask.nii.gz", allow_unlabelled=False)
    assert [c["patient"] for c in raw.cases] == ["x", "y"]
    assert raw.problems == [(str(tmp_path / "cases" / "z" / "image.nii.gz"),
                             "no label matching '*/mask.nii.gz' for case id 'z'")]
    default = folder(str(tmp_path / "cases"), "*/image.nii.gz", "*/mask.nii.gz")   # unlabelled: pre-training only
    assert [c["patient"] for c in default.cases] == ["x", "y", "z"] and not default.problems
    assert "label" not in default.cases[2]


# ---------------------------------------------------------------- bad input: one test per case
def _check(case, **kwargs):
    return [message for _, message in check_case(case, **kwargs)]


def _write_case(tmp_path, image, label=None, image_affine=None, label_affine=None):
    case = {"image": _nii(tmp_path / "img.nii.gz", image, image_affine), "patient": "p"}
    if label is not None:
        case["label"] = _nii(tmp_path / "lab.nii.gz", label, label_affine)
    return case


def test_synthetic_adapter_writes_the_volumes_and_prepares_them_like_any_dataset(tmp_path):
    """The synthetic data take the real datasets' path (validate, split, cache, datalist), and their split is the one
    split_patients gives write_dataset's cases (patient order) with the same seed: the datalists of earlier
    versions, which split without validating, are unchanged."""
    raw = synthetic(str(tmp_path / "data"), num_patients=4, seed=3)
    assert raw.kind == "synthetic" and raw.labels == ACDC_LABELS and raw.details == {"num_patients": 4}
    assert [c["patient"] for c in raw.cases] == ["patient001", "patient002", "patient003", "patient004"]
    assert all(os.path.isfile(c["image"]) and os.path.isfile(c["label"]) for c in raw.cases)
    split = {"num_validation": 1, "num_test": 1, "subset_sizes": [1, 2], "num_subsets": [2, 1]}
    path = prepare(raw, str(tmp_path / "data"), seed=3, preprocessing=SETTINGS, cache_dir=str(tmp_path / "cache"),
                   **split)
    content = json.loads(open(path).read())
    expected = split_patients(write_dataset(str(tmp_path / "data"), num_patients=4, seed=3), seed=3, **split)
    for key, cases in expected.items():
        assert [c["patient"] for c in content[key]] == [c["patient"] for c in cases], key
    assert set(content) == set(expected) | {"contract", "source"}
    assert content["contract"]["class_names"] == list(ACDC_LABELS.values())
    assert content["source"]["kind"] == "synthetic" and content["source"]["seed"] == 3
    cached = sum(len(content[k]) for k in ("pretrain", "labelled_all", "validation"))   # what fill_cache fills
    assert len([f for f in os.listdir(tmp_path / "cache") if f.endswith(".pt")]) == cached


def test_bad_input_truncated_file(tmp_path):
    image, label = _pair(0)
    case = _write_case(tmp_path, image, label)
    data = open(case["image"], "rb").read()
    open(case["image"], "wb").write(data[: len(data) // 2])
    assert _check(case) == [
        "cannot be read (EOFError: Compressed file ended before the end-of-stream marker was reached)"]


def test_bad_input_corrupt_file(tmp_path):
    image, label = _pair(0)
    case = _write_case(tmp_path, image, label)
    open(case["label"], "wb").write(b"not a nifti file at all")
    assert check_case(case) == [
        (case["label"], f"cannot be read (ImageFileError: File {case['label']} is not a gzip file)")]


def test_bad_input_shape_mismatch(tmp_path):
    image, label = _pair(0)
    assert _check(_write_case(tmp_path, image, label[:, :-2])) == [
        "label shape (20, 16, 6) differs from image shape (20, 18, 6)"]


def test_bad_input_affine_mismatch(tmp_path):
    image, label = _pair(0)
    shifted = np.diag([2.0, 2.0, 8.0, 1.0])
    shifted[0, 3] = 5.0
    assert _check(_write_case(tmp_path, image, label, label_affine=shifted)) == [
        "label affine differs from the image affine (largest difference 5)"]


def test_bad_input_unexpected_label_values(tmp_path):
    image, label = _pair(0)
    label[0, 0, 0] = 9
    assert _check(_write_case(tmp_path, image, label), label_values=range(4)) == [
        "unexpected label values [9] (expected [0, 1, 2, 3])"]
    label[0, 0, 0] = 0
    assert _check(_write_case(tmp_path, image, label + 0.5)) == ["label has non-integer values"]


def test_bad_input_nan_and_inf(tmp_path):
    image, label = _pair(0)
    image[1, 1, 1], image[2, 2, 2] = np.nan, np.inf
    assert _check(_write_case(tmp_path, image, label)) == ["2 NaN/Inf intensities"]


def test_bad_input_constant_image(tmp_path):
    _, label = _pair(0)
    assert _check(_write_case(tmp_path, np.full(label.shape, 7, np.float32), label)) == [
        "constant image (every voxel is 7)"]


def test_bad_input_2d_file(tmp_path):
    image, label = _pair(0)
    assert _check(_write_case(tmp_path, image[:, :, 0], label[:, :, 0])) == [
        "image is 2D (shape (20, 18)) where a 3D volume is expected",
        "label is 2D (shape (20, 18)) where a 3D volume is expected"]


def test_bad_input_4d_file_needs_a_channel(tmp_path):
    image, label = _pair(0)
    case = _write_case(tmp_path, np.stack([image, image + 1], axis=-1), label)
    assert _check(case) == [
        "image is 4D with 2 channels (shape (20, 18, 6, 2)) where a 3D volume is expected; choose a channel"]
    assert _check(case, channel=1) == []  # allowed when a channel is selected
    assert _check(case, channel=2) == ["image has 2 channel(s), channel 2 was asked for"]
    assert _check(_write_case(tmp_path, image[..., None], label)) == []  # a trailing singleton is 3D


def test_bad_input_fewer_slices_than_partitions(tmp_path):
    image, label = _pair(0, shape=(20, 18, 3))
    assert _check(_write_case(tmp_path, image, label), num_partitions=4) == [
        "3 slice(s) along axis 2, fewer than num_partitions = 4"]
    # the slice axis follows the spacing: 3 voxels along z but 8 mm along x -> axis 0 with 20 slices, fine
    assert _check(_write_case(tmp_path, image, label, np.diag([8, 2, 2, 1.0]), np.diag([8, 2, 2, 1.0]))) == []


def test_bad_input_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    for adapter in (acdc, mmwhs, lambda root: folder(root, "*.nii.gz", "*_gt.nii.gz")):
        with pytest.raises(ValueError, match=f"no .* volumes found in {tmp_path / 'empty'}"):
            adapter(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        acdc(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="raw_dir is not set"):
        acdc(None)


def test_every_problem_is_listed_and_nothing_written(tmp_path, caplog):
    root = _acdc_tree(tmp_path / "raw", num_patients=6)
    nan_image, _ = _pair(0)
    nan_image[0, 0, 0] = np.nan
    _nii(root / "patient002" / "patient002_frame01.nii.gz", nan_image)
    _nii(root / "patient004" / "patient004_frame01_gt.nii.gz", np.full((20, 18, 6), 5, np.uint8))
    os.remove(root / "patient005" / "patient005_frame01_gt.nii.gz")
    out = tmp_path / "prepared"
    with pytest.raises(ValueError) as error, caplog.at_level(logging.WARNING, logger="scripts.datasets"):
        prepare(acdc(str(root)), str(out), **SMALL_SPLIT, preprocessing=SETTINGS, cache_dir=str(out / "cache"))
    message = str(error.value)
    assert message.startswith("3 problem(s) in the acdc data at") and "\n" not in message  # one line
    assert "--on_error skip" in message and "listed above" in message
    assert "patient002_frame01.nii.gz: 1 NaN/Inf intensities" in caplog.text  # every problem, one log line each
    assert "patient004_frame01_gt.nii.gz: unexpected label values [5] (expected [0, 1, 2, 3])" in caplog.text
    assert "patient005_frame01.nii.gz: label file patient005_frame01_gt.nii.gz is missing" in caplog.text
    assert not out.exists()  # stopped before anything was written


def test_on_error_skip_leaves_bad_volumes_out_with_a_warning(tmp_path, caplog):
    root = _acdc_tree(tmp_path / "raw", num_patients=6)
    _nii(root / "patient003" / "patient003_frame01.nii.gz", np.zeros((20, 18, 6), np.float32))
    with caplog.at_level(logging.WARNING, logger="scripts.datasets"):
        path = prepare(acdc(str(root)), str(tmp_path / "out"), **SMALL_SPLIT, on_error="skip",
                       preprocessing=SETTINGS)
    assert "skipped: " in caplog.text and "patient003_frame01.nii.gz: constant image" in caplog.text
    content = json.load(open(path))
    used = {c["patient"] for key in ("pretrain", "validation", "test") for c in content[key]}
    assert used == {"patient001", "patient002", "patient004", "patient005", "patient006"}
    assert content["source"]["skipped"] == [str(root / "patient003" / "patient003_frame01.nii.gz")]
    with pytest.raises(ValueError, match="on_error"):
        validate(acdc(str(root)), on_error="ignore")


# ---------------------------------------------------------------- prepare: split, datalist, cache
def test_prepare_writes_a_patient_level_datalist_with_labels(tmp_path, monkeypatch):
    root = _acdc_tree(tmp_path / "raw", num_patients=6)
    out = tmp_path / "elsewhere" / "prepared"
    path = prepare(acdc(str(root), phases="both"), str(out), **SMALL_SPLIT, seed=3, preprocessing=SETTINGS)
    content = json.load(open(path))
    contract = content["contract"]
    assert contract["class_names"][3] == "left ventricle" and contract["channel"] is None
    assert contract["image_size"] == 16 and contract["num_classes"] == 4 and contract["label_values"] is None
    assert content["source"]["kind"] == "acdc" and content["source"]["phases"] == ["ED", "ES"]
    assert content["source"]["slices"] == 12 * 6
    assert content["test"][0]["image"].startswith(str(root))  # raw files outside dataset_dir: absolute paths
    roles = {k: {c["patient"] for c in content[k]} for k in ("pretrain", "validation", "test")}
    assert len(roles["test"]) == 1 and len(roles["validation"]) == 1 and len(roles["pretrain"]) == 4
    assert not (roles["pretrain"] & roles["test"]) and not (roles["validation"] & roles["test"])
    assert all(len(content[k]) == 2 for k in ("validation", "test"))  # both frames of a patient on one side
    assert {len({c["patient"] for c in content[f"labelled_1_{i}"]}) for i in range(2)} == {1}
    # read back from another working directory, through a relative path
    monkeypatch.chdir(tmp_path)
    assert load_datalist("elsewhere/prepared/datalist.json", "test")[0]["image"] == content["test"][0]["image"]
    assert datalist_info(path)["contract"] == contract and datalist_info(str(tmp_path / "none.json")) == {}
    assert label_names(path) == ["right ventricle", "myocardium", "left ventricle"]
    again = prepare(acdc(str(root), phases="both"), str(out), **SMALL_SPLIT, seed=3, preprocessing=SETTINGS)
    assert json.load(open(again)) == content


def test_unlabelled_volumes_only_pretrain(tmp_path):
    cases = [{"image": f"/d/{p}_{f}.nii.gz", "label": f"/d/{p}_{f}_gt.nii.gz", "patient": p}
             for p in ("a", "b", "c", "d", "e") for f in (0, 1)]
    cases += [{"image": f"/d/{p}_4d.nii.gz", "patient": p} for p in ("a", "b", "c", "d", "e")]  # unlabelled frames
    cases += [{"image": "/d/extra.nii.gz", "patient": "extra"}]  # an unlabelled-only patient
    from scripts.data import split_patients

    datalist = split_patients(cases, 1, 1, (1,), (2,), seed=0)
    held_out = {c["patient"] for c in datalist["validation"] + datalist["test"]}
    pretrain = {c["image"] for c in datalist["pretrain"]}
    assert "/d/extra.nii.gz" in pretrain and not any(f"/d/{p}_4d.nii.gz" in pretrain for p in held_out)
    assert all("label" in c for k, v in datalist.items() if k not in ("pretrain", "unlabelled") for c in v)
    assert {c["image"] for c in datalist["unlabelled"]} == pretrain - {c["image"] for c in datalist["labelled_all"]}
    assert len(datalist["labelled_all"]) == 6


def test_cache_is_reused_and_invalidated_by_settings_or_file_changes(tmp_path):
    root = _acdc_tree(tmp_path / "raw", num_patients=5)
    raw = acdc(str(root))
    datalist = {"pretrain": [{"image": c["image"], "patient": c["patient"]} for c in raw.cases[:3]],
                "labelled_all": raw.cases[:3], "validation": raw.cases[3:4]}
    cache = str(tmp_path / "cache")
    contract = make_contract(class_names=ACDC_LABELS, **SETTINGS)
    assert fill_cache(datalist, cache, contract) == {"computed": 7, "reused": 0}
    files = {f: os.path.getmtime(os.path.join(cache, f)) for f in os.listdir(cache)}
    assert len(files) == 7
    assert fill_cache(datalist, cache, contract) == {"computed": 0, "reused": 7}  # second run: no recomputation
    assert {f: os.path.getmtime(os.path.join(cache, f)) for f in os.listdir(cache)} == files
    assert fill_cache(datalist, cache, {**contract, "image_size": 24}) == {"computed": 7, "reused": 0}  # settings
    assert fill_cache(datalist, cache, {**contract, "placeholder_spacing": None})["computed"] == 7
    os.utime(raw.cases[0]["image"], ns=(1, 1))  # a replaced raw file: its two entries are recomputed
    assert fill_cache(datalist, cache, contract) == {"computed": 2, "reused": 5}
    # what a cached item holds: plain tensors, slice axis last
    item = CachedVolumes(datalist["labelled_all"], preprocessing(**SETTINGS), cache)[1]
    assert type(item["image"]) is torch.Tensor and item["image"].shape == (1, 16, 16, 6)


def _decathlon_folder(root, num_cases=6):
    """A small Decathlon-layout task from synthetic-like volumes, one of them 4D with two channels."""
    training = []
    for i in range(num_cases):
        image, label = _pair(i, shape=(24, 22, 5 + i % 3), classes=3)
        if i == 0:
            image = np.stack([image, 1 - image], axis=-1)  # a multi-channel case: channel 0 is used
        _nii(root / "imagesTr" / f"case_{i:02d}.nii.gz", image, np.diag([1.5, 1.5, 6.0, 1.0]))
        _nii(root / "labelsTr" / f"case_{i:02d}.nii.gz", label, np.diag([1.5, 1.5, 6.0, 1.0]))
        training.append({"image": f"./imagesTr/case_{i:02d}.nii.gz", "label": f"./labelsTr/case_{i:02d}.nii.gz"})
    (root / "dataset.json").write_text(json.dumps({
        "name": "toy", "modality": {"0": "MRI"}, "labels": {"0": "background", "1": "inner", "2": "outer"},
        "training": training}))
    return root


def test_prepare_command_fills_the_cache_the_workflows_read(tmp_path):
    """`monai.bundle run prepare_decathlon` in a fresh process; then train.yaml / pretrain.yaml, parsed here, find every
    volume in the cache (same keys across processes) and read the channel and label names from the datalist."""
    raw = _decathlon_folder(tmp_path / "Task99_Toy")
    out = tmp_path / "prepared"
    overrides = ["--raw_dir", str(raw), "--dataset_dir", str(out), "--image_size", "16", "--split#num_test", "1",
                 "--split#num_validation", "1", "--split#subset_sizes", "[1,2]", "--split#num_subsets", "[1,1]",
                 "--cache_workers", "2"]
    result = run(tmp_path, "run", "prepare_decathlon", "--config_file", config("train.yaml", "prepare.yaml"),
                 *overrides, timeout=None, env={"PYTHONPATH": str(BUNDLE)})
    assert "decathlon: 6 volumes of 6 patients" in result.stdout and "9 volumes pre-processed" in result.stdout
    parser = ConfigParser()
    parser.read_config([os.path.join(CONFIGS, "train.yaml"), os.path.join(CONFIGS, "pretrain.yaml")])
    parser.update({"dataset_dir": str(out), "image_size": 16})
    contract = parser.get_parsed_content("contract")
    assert contract["channel"] == 0 and contract["class_names"][1] == "inner"
    for key in ("train#dataset", "validate#dataset", "unlabelled#dataset"):
        dataset = parser.get_parsed_content(key)
        assert len(dataset) and all(os.path.isfile(dataset.cache_file(i)) for i in range(len(dataset))), key
    assert len(os.listdir(out / "cache")) == 9  # 4 pre-training images + 5 labelled/validation pairs, nothing else


# ---------------------------------------------------------------- the shared ACDC copy
@pytest.mark.realdata
def test_shared_acdc_copy():
    if not os.path.isdir(SHARED_ACDC):
        pytest.skip(f"the shared ACDC data is not at {SHARED_ACDC}")
    raw = acdc(SHARED_ACDC)
    assert len(raw.cases) == 80 and not raw.problems and all(c["frame"] == 1 for c in raw.cases)
    assert len(acdc(SHARED_ACDC, phases="both").cases) == 160
    case = raw.cases[0]
    assert check_case(case, label_values=range(4)) == []
    out = preprocessing(image_size=64, spacing=3.0, placeholder_spacing=1.5)(case)
    native = nib.load(case["image"]).shape
    assert out["image"].shape == (1, 64, 64, native[2]) and set(torch.unique(out["label"]).tolist()) <= {0, 1, 2, 3}
    np.testing.assert_allclose(np.diag(out["image"].affine)[:3], [3.0, 3.0, 1.0])  # identity affine: the fallback
