"""Bad inputs and states reach the user as one line naming the file, on every path (issue 25).

Each test reproduces one case of the issue that used to give a wrong answer without an error: a NaN voxel or an
almost empty image passing the pre-processing, an out-of-range or misaligned label, a datalist entry without a label,
two inputs of the same name overwriting each other's output, a file too large to read. The pre-processing is the one
every path builds (``scripts.contract.build_preprocessing``), so a check here holds for inference, evaluation,
fine-tuning, pre-training and MONAI Label alike."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from conftest import write_nifti
from scripts.contract import build_preprocessing, make_contract
from scripts.data import load_datalist
from scripts.datasets import check_case
from scripts.errors import BundleError, find_bundle_error
from scripts.inference import InputCheck
from scripts.transforms import preprocessing

CONTRACT = make_contract(16, 2.0, ["background", "a", "b"], placeholder_spacing=1.5)


def _write(path, array, affine=None):
    return write_nifti(path, array, affine, spacing=(2.0, 2.0, 5.0))


def _image(shape=(12, 12, 4)):
    return np.random.default_rng(0).uniform(0, 500, shape).astype(np.float32)


def _label(shape=(12, 12, 4)):
    label = np.zeros(shape, np.int16)
    label[3:8, 3:8] = 1
    label[8:10, 8:10] = 2
    return label


def _refusal(transform, data) -> str:
    """The BundleError message the transform raises on ``data`` (MONAI's Compose wraps it)."""
    with pytest.raises(Exception) as error:
        transform(data)
    found = find_bundle_error(error.value)
    assert found is not None, f"no BundleError, got {error.value!r}"
    return str(found)


# ---------------------------------------------------------------- the pre-processing's own check
def test_a_nan_voxel_is_refused_by_the_preprocessing_naming_the_file(tmp_path):
    image = _image()
    image[2, 3, 1] = np.nan
    path = _write(tmp_path / "nan.nii.gz", image)
    message = _refusal(build_preprocessing(CONTRACT, keys=("image",)), {"image": path})
    assert message.startswith(f"{path}: 1 NaN/Inf intensities"), message
    image[2, 3, 1] = np.inf
    path = _write(tmp_path / "inf.nii.gz", image)
    assert "inf.nii.gz: 1 NaN/Inf" in _refusal(build_preprocessing(CONTRACT, keys=("image",)), {"image": path})


def test_an_almost_empty_image_with_coinciding_percentiles_is_refused(tmp_path):
    image = np.zeros((12, 12, 4), np.float32)
    image[5, 5, :] = 3000.0  # 4 bright voxels of 576: the 1st and 99th percentiles are both 0
    path = _write(tmp_path / "sparse.nii.gz", image)
    message = _refusal(build_preprocessing(CONTRACT, keys=("image",)), {"image": path})
    assert message.startswith(f"{path}: its intensity percentiles 1 and 99 are both 0"), message
    # the prepare step / inference input check says the same, from the same function
    assert check_case({"image": path}, num_partitions=1) == [(path, message.removeprefix(f"{path}: "))]


def test_labels_outside_the_classes_are_refused_on_the_training_path(tmp_path):
    label = _label()
    label[0, 0, 0] = 3  # 3 classes: 0..2
    data = {"image": _write(tmp_path / "i.nii.gz", _image()), "label": _write(tmp_path / "l.nii.gz", label)}
    message = _refusal(build_preprocessing(CONTRACT, keys=("image", "label")), data)
    assert message == f"{data['label']}: unexpected label values [3] (expected 0..2).", message


def test_label_shape_and_affine_must_match_the_image(tmp_path):
    image = _write(tmp_path / "i.nii.gz", _image())
    shape = _write(tmp_path / "shape.nii.gz", _label((12, 12, 5)))
    moved = np.diag([2.0, 2.0, 5.0, 1.0])
    moved[0, 3] = 40.0
    affine = _write(tmp_path / "affine.nii.gz", _label(), moved)
    pre = build_preprocessing(CONTRACT, keys=("image", "label"))
    assert _refusal(pre, {"image": image, "label": shape}).startswith(
        f"{shape}: label shape (12, 12, 5) differs from image shape (12, 12, 4)")
    assert _refusal(pre, {"image": image, "label": affine}).startswith(
        f"{affine}: label affine differs from the image affine (largest difference 40)")
    assert pre({"image": image, "label": _write(tmp_path / "ok.nii.gz", _label())})["label"].shape == (1, 16, 16, 4)


def test_a_file_too_large_is_refused_from_its_header_before_reading(tmp_path, monkeypatch):
    from scripts.transforms import check_size

    path = _write(tmp_path / "big.nii.gz", _image())
    with pytest.raises(BundleError, match=r"big.nii.gz: 576 voxels \(shape \(12, 12, 4\)\), more than the 500"):
        check_size(path, max_voxels=500)
    import scripts.transforms as transforms

    monkeypatch.setattr(transforms, "MAX_VOXELS", 500)
    loaded = []
    monkeypatch.setattr(transforms.LoadImaged, "__call__", lambda self, d, *a, **k: loaded.append(d) or d)
    message = _refusal(build_preprocessing(CONTRACT, keys=("image",)), {"image": path})
    assert message.startswith(f"{path}: 576 voxels"), message
    assert not loaded  # refused from the header: the loader never ran
    assert check_case({"image": path}, num_partitions=1) == [(path, message.removeprefix(f"{path}: "))]


# ---------------------------------------------------------------- datalists and outputs
def test_a_datalist_entry_without_a_label_is_named_in_one_line(tmp_path):
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps({"labelled_1_0": [{"image": "a.nii.gz", "label": "a_gt.nii.gz"},
                                                 {"image": "b.nii.gz"}]}))
    with pytest.raises(BundleError) as error:
        load_datalist(str(path), "labelled_1_0", require_label=True)
    assert str(error.value) == (f"datalist {path}: entry 1 of 'labelled_1_0' ({{\"image\": \"b.nii.gz\"}}) has no "
                                "'label' path; every entry of 'labelled_1_0' needs 'image' and 'label'.")
    assert len(load_datalist(str(path), "labelled_1_0")) == 2  # pre-training reads images only


def test_inputs_of_the_same_name_in_two_folders_are_refused_or_kept_apart(tmp_path):
    from scripts.inference import glob_root, output_name, output_root

    for patient in ("p1", "p2"):
        (tmp_path / patient).mkdir()
        _write(tmp_path / patient / "image.nii.gz", _image())
    pattern = str(tmp_path / "*" / "image.nii.gz")
    with pytest.raises(BundleError, match=r"1 output name\(s\) would be written twice, nothing was written: "
                                          r".*p1/image.nii.gz and .*p2/image.nii.gz give the same label map name; "
                                          r"run with --keep_folders True"):
        InputCheck(pattern)
    assert glob_root(pattern) == str(tmp_path) == output_root(pattern, keep_folders=True)
    checked = InputCheck(pattern, keep_folders=True)
    assert [output_name(c["image"], glob_root(pattern)) for c in checked.images] == ["p1/image", "p2/image"]
    assert output_name(str(tmp_path / "x.nii.gz"), glob_root(str(tmp_path / "*.nii.gz"))) == "x"


def test_inputs_that_would_write_one_output_are_refused_before_writing(tmp_path):
    _write(tmp_path / "a.nii.gz", _image())
    _write(tmp_path / "a.nii", _image())
    with pytest.raises(BundleError, match=r"1 output name\(s\) would be written twice, nothing was written: "
                                          r".*a.nii and .*a.nii.gz give the same label map name"):
        InputCheck(str(tmp_path / "a.*"))


def test_an_image_only_pipeline_accepts_good_volumes(tmp_path):
    image = _write(tmp_path / "g.nii.gz", _image())
    out = preprocessing(keys=("image",), image_size=16, spacing=2.0)({"image": image})
    assert out["image"].shape == (1, 16, 16, 4)


# ---------------------------------------------------------------- a training state knows its run
def _toy_engine(path, run, resume=False):
    from _resume_worker import toy

    return toy(path, run, resume)


def test_a_training_state_of_another_run_is_refused_naming_the_settings(tmp_path):
    run = {"learning_rate": 0.001, "datalist_file": "/d/datalist.json", "train_key": "labelled_2_0"}
    _toy_engine(tmp_path / "state.pt", run).run(range(2), max_epochs=1)
    other = dict(run, learning_rate=0.5, train_key="labelled_8_0")
    with pytest.raises(BundleError) as error:
        _toy_engine(tmp_path / "state.pt", other, resume=True).run(range(2), max_epochs=2)
    assert str(error.value) == (
        f"training state {tmp_path / 'state.pt'}: it was written by another run (learning_rate = 0.001 in the state, "
        "0.5 now; train_key = \"labelled_2_0\" in the state, \"labelled_8_0\" now); resume with the same settings; "
        "delete it to start the stage again.")
    resumed = _toy_engine(tmp_path / "state.pt", run, resume=True)
    resumed.run(range(2), max_epochs=2)
    assert resumed.state.iteration == 4
    _toy_engine(tmp_path / "old.pt", None).run(range(2), max_epochs=1)  # a state that records no run
    with pytest.raises(BundleError, match="it records no run settings"):
        _toy_engine(tmp_path / "old.pt", run, resume=True).run(range(2), max_epochs=2)


def test_ranks_that_see_different_states_stop_together_with_one_error(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    here = Path(__file__).resolve().parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(here.parent / "bundle"), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, str(here / "_resume_worker.py"), str(r), "2", str(tmp_path / "init"),
                               str(tmp_path)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(2)]
    try:
        logs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], logs
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for rank, own_path in enumerate([tmp_path / "state.pt", tmp_path / "elsewhere" / "state.pt"]):
        message = results[rank]["split"]  # each rank names the file it looked for, then the same finding
        assert message.startswith(f"training state {own_path}: the ranks do not see the same file (rank 0: "
                                  "iteration 2, sha256 "), message
        assert message.endswith("rank 1: no file); every process must read the same model_dir (a shared file "
                                "system) to resume."), message
    assert [r["resumed_at"] for r in results] == [2, 2]


# ---------------------------------------------------------------- the cache heals
def test_a_truncated_cache_entry_is_recomputed_with_a_warning_naming_it(tmp_path, caplog):
    from scripts.data import CachedVolumes

    cache = tmp_path / "cache"
    data = [{"image": _write(tmp_path / "i.nii.gz", _image()), "label": _write(tmp_path / "l.nii.gz", _label())}]
    pre = build_preprocessing(CONTRACT, keys=("image", "label"))
    first = CachedVolumes(data, pre, str(cache))[0]
    entry = CachedVolumes(data, pre, str(cache)).cache_file(0)
    whole = open(entry, "rb").read()
    with open(entry, "wb") as f:
        f.write(whole[: len(whole) // 2])
    with caplog.at_level("WARNING"):
        again = CachedVolumes(data, pre, str(cache))[0]
    assert f"cache entry {entry} is damaged" in caplog.text and "recomputed" in caplog.text
    assert all(torch.equal(first[k], again[k]) for k in ("image", "label"))
    assert open(entry, "rb").read() == whole  # replaced by a whole entry
    assert sorted(p.name for p in cache.iterdir()) == [os.path.basename(entry)]  # no temporary file left


# ---------------------------------------------------------------- every file written atomically
def test_metric_csvs_are_written_through_a_temporary_file_in_their_folder(tmp_path, monkeypatch):
    from ignite.engine import Engine

    import scripts.engines as engines
    from scripts.engines import NamedMetricsSaver

    copied = []
    real_copy = engines.atomic_copy
    monkeypatch.setattr(engines, "atomic_copy", lambda source, path: copied.append(path) or real_copy(source, path))
    engine = Engine(lambda e, b: None)
    engine.state.metrics = {"mean_dice": 0.5}
    engine.state.metric_details = {"mean_dice": torch.tensor([[0.4, 0.6], [0.5, 0.5]])}
    saver = NamedMetricsSaver(class_names=["a", "b"], save_dir=str(tmp_path / "eval"), metrics="*",
                              metric_details="*", batch_transform=lambda batch: {})
    saver(engine)
    written = sorted(p.name for p in (tmp_path / "eval").iterdir())
    assert written == ["mean_dice_raw.csv", "metrics.csv"], written  # and no temporary folder left
    assert sorted(os.path.basename(p) for p in copied) == written
    assert (tmp_path / "eval" / "mean_dice_raw.csv").read_text().startswith("filename,a,b,mean\n0,0.4,0.6,0.5")


def test_the_packer_hashes_the_weight_copies_it_ships(tmp_path, monkeypatch):
    import yaml

    import scripts.files as files
    from study import release

    models = tmp_path / "models"
    models.mkdir()
    contract = release.read_metadata()["data_contract"]
    for index, name in enumerate(("pretrained_global.pt", "pretrained_local.pt")):
        torch.save({"model": {"w": torch.full((2,), float(index))}, "contract": contract}, models / name)
    real_copy = files.atomic_copy

    def copy_then_change_source(source, path):  # the source changes while the pack runs (e.g. a training writes it)
        written = real_copy(source, path)
        with open(source, "ab") as f:
            f.write(b"changed")
        return written

    monkeypatch.setattr(files, "atomic_copy", copy_then_change_source)
    written = release.pack(url="https://example.org/v{version}", models_dir=str(models), dist_dir=str(tmp_path / "d"),
                           dataset="test bytes", data_licence="none")
    for entry in yaml.safe_load(open(written["large_files"]))["large_files"]:
        shipped = tmp_path / "d" / os.path.basename(entry["path"])
        assert entry["hash_val"] == release.sha256(str(shipped))
    assert not [p for p in os.listdir(tmp_path / "d") if p.endswith(".tmp")]


def test_evaluation_labels_outside_the_classes_are_refused(tmp_path):
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

    from scripts.transforms import CheckLabelsd

    label = _label()
    label[1, 1, 1] = 5
    path = _write(tmp_path / "gt.nii.gz", label)
    chain = Compose([LoadImaged("label", image_only=True), EnsureChannelFirstd("label"), CheckLabelsd("label", 3)])
    assert _refusal(chain, {"label": path}) == f"{path}: unexpected label values [5] (expected 0..2)."


def test_a_bundle_error_from_a_reimported_scripts_package_is_still_one_line(capsys):
    """MONAI Label unloads and re-imports ``scripts`` for each task: the hook installed by the first import must still
    recognise a BundleError class of the second (it used to print the whole traceback through /train)."""
    import importlib.util

    import scripts.errors

    spec = importlib.util.spec_from_file_location("scripts.errors", scripts.errors.__file__)
    second = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(second)   # not registered in sys.modules: the installed module stays
    assert second.BundleError is not BundleError
    try:
        try:
            raise second.BundleError("label.nii.gz: unexpected   label values [7]")
        except Exception as inner:
            raise RuntimeError("Failed to instantiate component") from inner
    except RuntimeError as error:
        assert str(find_bundle_error(error)) == "label.nii.gz: unexpected label values [7]"
        scripts.errors._excepthook(RuntimeError, error, error.__traceback__)
    assert capsys.readouterr().err.splitlines()[-1] == "ERROR: label.nii.gz: unexpected label values [7]"


@pytest.mark.parametrize("error, expected", [
    (NotADirectoryError(20, "Not a directory", "/out/models"), "/out/models: a part of this path is a file"),
    (FileExistsError(17, "File exists", "/out/eval"), "/out/eval: exists and is not a folder"),
    (FileNotFoundError(2, "No such file or directory", "/raw/a.nii.gz"), "/raw/a.nii.gz: No such file or directory"),
    (OSError(28, "No space left on device", "/out/model.pt"), "/out/model.pt: no space left on the device"),
])
def test_a_file_system_error_naming_a_file_is_one_line(error, expected, capsys):
    """Files that change or cannot be written between two steps: the exception hook prints "<file>: <problem>" as
    the last line (wrapped by MONAI's config errors or not); an OSError naming no file keeps its traceback."""
    import scripts.errors

    try:
        try:
            raise error
        except OSError as inner:
            raise RuntimeError("Failed to evaluate ConfigExpression") from inner
    except RuntimeError as wrapped:
        scripts.errors._excepthook(RuntimeError, wrapped, wrapped.__traceback__)
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"ERROR: {expected}") and "(check the path" in last
    assert scripts.errors.one_line(OSError("no file named")) is None
