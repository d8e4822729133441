"""Bad inputs and states through the real commands (``python -m monai.bundle run``, tiny network, CPU; issue 25).

Each test is one case of the issue that used to end with a wrong result and exit status 0, or with a raw traceback:
a NaN voxel in a fine-tuning volume, a datalist entry without a label, a resume from another run's training state
(which then rewrote model.pt), and two inputs of the same name in two folders (the second label map replaced the
first). Each must now end with one ``ERROR:`` line naming the file or the settings, or with distinct outputs."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest

import conftest as br

FINE_TUNE = [*br.TINY, *br.FINETUNE, "--use_pretrained", "False", "--num_labelled", "1"]
TINY_INFERENCE = br.TINY_INFERENCE


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A prepared tiny dataset and a fine-tuning of 1 epoch (its training state and model.pt)."""
    work = tmp_path_factory.mktemp("bad_input")
    data = br.prepare(work)
    br.run(work, "run", "--config_file", br.config("train.yaml"), *data, *br.paths(work, "ft"), *FINE_TUNE,
           "--max_epochs", "1")
    return work, data


def _datalist_variant(work, name, change) -> str:
    """A copy of the prepared datalist (same folder) whose first 'labelled_1_0' entry is changed by ``change``."""
    content = json.loads((work / "data" / "datalist.json").read_text())
    change(content["labelled_1_0"][0], work / "data")
    path = work / "data" / name
    path.write_text(json.dumps(content))
    return str(path)


def test_a_nan_voxel_in_a_fine_tuning_volume_stops_naming_the_file(work):
    work, data = work

    def poison(entry, folder):
        image = nib.load(str(folder / entry["image"]))
        array = np.asarray(image.dataobj, dtype=np.float32)
        array[0, 0, 0] = np.nan
        br.write_nifti(folder / "nan_image.nii.gz", array, image.affine)
        entry["image"] = "nan_image.nii.gz"

    datalist = _datalist_variant(work, "nan.json", poison)
    result = br.run(work, "run", "--config_file", br.config("train.yaml"), *data, "--datalist_file", datalist,
                    *br.paths(work, "nan"), *FINE_TUNE, expect=None)
    assert result.returncode != 0
    assert br.last_line(result.stderr) == f"ERROR: {work / 'data' / 'nan_image.nii.gz'}: 1 NaN/Inf intensities", \
        result.stderr[-3000:]


def test_a_datalist_entry_without_a_label_is_named(work):
    work, data = work
    datalist = _datalist_variant(work, "unlabelled.json", lambda entry, folder: entry.pop("label"))
    result = br.run(work, "run", "--config_file", br.config("train.yaml"), *data, "--datalist_file", datalist,
                    *br.paths(work, "nolabel"), *FINE_TUNE, expect=None)
    assert result.returncode != 0
    line = br.last_line(result.stderr)
    assert line.startswith(f"ERROR: datalist {datalist}: entry 0 of 'labelled_1_0' (") and line.endswith(
        "has no 'label' path; every entry of 'labelled_1_0' needs 'image' and 'label'."), result.stderr[-3000:]


def test_resuming_another_runs_state_is_refused_and_model_pt_kept(work):
    work, data = work
    models = work / "ft" / "models"
    before = (models / "model.pt").read_bytes()
    result = br.run(work, "run", "--config_file", br.config("train.yaml"), *data, *br.paths(work, "ft"), *FINE_TUNE,
                    "--max_epochs", "2", "--learning_rate", "0.5", "--resume", "True", expect=None)
    assert result.returncode != 0
    assert br.last_line(result.stderr) == (
        f"ERROR: training state {models / 'state_train.pt'}: it was written by another run (learning_rate = 0.001 in "
        "the state, 0.5 now); resume with the same settings; delete it to start the stage again."
    ), result.stderr[-3000:]
    assert (models / "model.pt").read_bytes() == before
    # the same settings resume
    br.run(work, "run", "--config_file", br.config("train.yaml"), *data, *br.paths(work, "ft"), *FINE_TUNE,
           "--max_epochs", "2", "--resume", "True")


def test_inputs_of_the_same_name_in_two_folders_are_refused_or_kept_apart(work):
    work, _ = work
    images = sorted((work / "data").glob("patient*/patient*_frame01.nii.gz"))[:2]
    for index, image in enumerate(images):
        (work / "inputs" / f"p{index}").mkdir(parents=True)
        shutil.copy(image, work / "inputs" / f"p{index}" / "image.nii.gz")
    pattern = str(work / "inputs" / "*" / "image.nii.gz")
    arguments = ["--config_file", br.config("inference.yaml"), "--input_glob", pattern, "--checkpoint",
                 str(work / "ft" / "models" / "model.pt"), "--output_dir", str(work / "out"), *TINY_INFERENCE]
    refused = br.run(work, "run", *arguments, expect=None)  # one output folder: refused before writing anything
    assert refused.returncode != 0 and not (work / "out").exists()
    assert br.last_line(refused.stderr).startswith(
        "ERROR: 1 output name(s) would be written twice, nothing was written: "
        f"{work / 'inputs' / 'p0' / 'image.nii.gz'} and "), refused.stderr[-3000:]
    br.run(work, "run", *arguments, "--keep_folders", "True")
    written = sorted(str(p.relative_to(work / "out")) for p in (work / "out").rglob("*.nii.gz"))
    assert written == ["p0/image_seg.nii.gz", "p1/image_seg.nii.gz"]
    for index, image in enumerate(images):
        assert nib.load(str(work / "out" / f"p{index}" / "image_seg.nii.gz")).shape == nib.load(str(image)).shape


def test_pretraining_resume_with_another_temperature_is_refused(work):
    work, data = work
    configs = br.config("train.yaml", "pretrain.yaml")
    br.run(work, "run", "pretrain", "--config_file", configs, *data, *br.paths(work, "pre"), *br.TINY, *br.PRETRAIN)
    result = br.run(work, "run", "pretrain", "--config_file", configs, *data, *br.paths(work, "pre"), *br.TINY,
                    *br.PRETRAIN, "--global#temperature", "0.5", "--resume", "True", expect=None)
    assert result.returncode != 0
    line = br.last_line(result.stderr)
    assert line.startswith(f"ERROR: training state {work / 'pre' / 'models' / 'state_global.pt'}: it was written by "
                           "another run (loss = [\"domain\", 0.2, 0.35] in the state, [\"domain\", 0.5, 0.35] now)"), \
        result.stderr[-3000:]
    result = br.run(work, "run", "pretrain", "--config_file", configs, *data, *br.paths(work, "pre"), *br.TINY,
                    *br.PRETRAIN, "--local#temperature", "0.5", "--resume", "True", expect=None)
    line = br.last_line(result.stderr)
    assert "it was written by another run (loss = [\"random\", 0.1," in line, result.stderr[-3000:]
