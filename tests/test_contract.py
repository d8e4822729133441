"""The data contract travels with the weights, and every bad input or configuration reaches the user in one line.

The workflow tests run the real command (`python -m monai.bundle run ...`) in a subprocess, on a tiny dataset
prepared at a resolution other than the defaults (32 px, 6 mm), so that a stage that ignored the contract would
silently use the wrong pre-processing."""

import json
import logging
import os
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

import conftest as br
from conftest import CONFIGS, TINY, TINY_INFERENCE, config, last_line, write_nifti
from scripts.contract import make_contract, resolve
from scripts.errors import BundleError

LABELS = ["background", "right ventricle", "myocardium", "left ventricle"]


def run(cwd, *args, env=None):
    """`python -m monai.bundle run <args>` in ``cwd``: (returncode, stdout, stderr), whatever the return code."""
    result = br.run(cwd, "run", *args, expect=None, env=env)
    return result.returncode, result.stdout, result.stderr


def ok(cwd, *args):
    result = br.run(cwd, "run", *args)
    return result.stdout + result.stderr


def files_under(folder):
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A dataset prepared at 32 px / 6 mm, a model fine-tuned on it (random init, a few steps), and a folder of
    inputs: two good volumes, a truncated file and a 2D file."""
    work = tmp_path_factory.mktemp("contract")
    paths = ["--dataset_dir", str(work / "data"), "--model_dir", str(work / "models"),
             "--output_dir", str(work / "eval")]
    ok(work, "prepare_synthetic", "--config_file", config("train.yaml", "prepare.yaml"), *paths, "--image_size", "32",
       "--spacing", "6.0", "--synthetic#num_patients", "5", "--synthetic#split",
        "{num_validation: 1, num_test: 1, subset_sizes: [1], num_subsets: [1]}")
    ok(work, "--config_file", config("train.yaml"), *paths, *TINY, "--use_pretrained", "False", "--max_epochs", "1",
       "--iterations_per_epoch", "2", "--batch_size", "4", "--num_labelled", "1")
    images = sorted((work / "data").glob("patient*/patient*_frame01.nii.gz"))
    good = work / "inputs" / "good"
    good.mkdir(parents=True)
    for image in images[:2]:
        shutil.copy(image, good / image.name)
    mixed = work / "inputs" / "mixed"
    shutil.copytree(good, mixed)
    data = images[2].read_bytes()
    (mixed / "truncated.nii.gz").write_bytes(data[: len(data) // 2])
    write_nifti(mixed / "flat.nii.gz", np.random.default_rng(0).random((40, 40)).astype(np.float32), np.eye(4))
    return work


def infer(work, inputs, output, *extra):
    return run(work, "--config_file", config("inference.yaml"), "--input_glob", str(work / "inputs" / inputs / "*"),
               "--checkpoint", str(work / "models" / "model.pt"), "--output_dir", str(work / output), *TINY_INFERENCE,
               *extra)


def read_labels(folder):
    return {name: np.asarray(nib.load(os.path.join(folder, name)).dataobj) for name in sorted(os.listdir(folder))}


# ---------------------------------------------------------------- settings travel with the weights
def test_checkpoint_carries_the_contract_of_its_data(trained):
    saved = torch.load(trained / "models" / "model.pt", weights_only=True)
    assert saved["contract"]["image_size"] == 32 and saved["contract"]["spacing"] == 6.0
    assert saved["contract"] == json.load(open(trained / "data" / "datalist.json"))["contract"]
    assert saved["contract"]["class_names"] == LABELS


def test_inference_takes_its_settings_from_the_checkpoint(trained):
    code, out, err = infer(trained, "good", "pred_plain")
    assert code == 0, err[-3000:]
    assert "data contract from " + str(trained / "models" / "model.pt") in out + err
    code, _, err = infer(trained, "good", "pred_explicit", "--image_size", "32", "--spacing", "6")
    assert code == 0, err[-3000:]
    plain, explicit = read_labels(trained / "pred_plain"), read_labels(trained / "pred_explicit")
    assert sorted(plain) == sorted(explicit) and len(plain) == 2
    for name in plain:
        np.testing.assert_array_equal(plain[name], explicit[name])
    # the same network run at the old defaults (64 px, 3 mm) would see other inputs: the contract is what is used
    code, _, err = infer(trained, "good", "pred_wrong", "--image_size", "64")
    assert code != 0 and not (trained / "pred_wrong").exists()
    line = last_line(err)
    assert line.startswith("ERROR: --image_size 64 contradicts image_size = 32") and "model.pt" in line, err[-2000:]


# ---------------------------------------------------------------- errors in one line, nothing half-written
def _bad_datalist(work):
    """A copy of the datalist whose contract says 3 classes (the model has 4)."""
    content = json.load(open(work / "data" / "datalist.json"))
    content["contract"] = make_contract(32, 6.0, LABELS[:3], placeholder_spacing=1.5)
    path = work / "data" / "three_classes.json"
    path.write_text(json.dumps(content))
    return str(path)


CASES = {
    "missing checkpoint": (lambda w: ["--config_file", config("inference.yaml"), "--checkpoint", str(w / "nope.pt"),
                                      "--input_glob", str(w / "inputs" / "good" / "*")],
                           "checkpoint {w}/nope.pt not found"),
    "corrupt checkpoint": (lambda w: ["--config_file", config("inference.yaml"), "--checkpoint", str(w / "cut.pt"),
                                      "--input_glob", str(w / "inputs" / "good" / "*")],
                           "checkpoint {w}/cut.pt is truncated or corrupt"),
    "contract mismatch": (lambda w: ["--config_file", config("inference.yaml"), "--spacing", "1.5", "--input_glob",
                                     str(w / "inputs" / "good" / "*"), "--checkpoint", str(w / "models" / "model.pt")],
                          "--spacing 1.5 contradicts spacing = 6.0"),
    "unreadable image": (lambda w: ["--config_file", config("inference.yaml"), "--checkpoint",
                                    str(w / "models" / "model.pt"), "--input_glob",
                                    str(w / "inputs" / "mixed" / "tr*")],
                         "1 of 1 input(s) cannot be segmented, nothing was written: truncated.nii.gz: cannot be read"),
    "wrong dimensionality": (lambda w: ["--config_file", config("inference.yaml"), "--checkpoint",
                                        str(w / "models" / "model.pt"), "--input_glob",
                                        str(w / "inputs" / "mixed" / "flat*")],
                             "flat.nii.gz: image is 2D (shape (40, 40)) where a 3D volume is expected"),
    "wrong class count": (lambda w: ["--config_file", config("train.yaml"), "--datalist_file", _bad_datalist(w),
                                     "--pretrained_checkpoint", str(w / "models" / "model.pt"), "--num_labelled", "1",
                                     *TINY],
                          "the data and the checkpoint disagree: num_classes = 3 in {w}/data/three_classes.json but 4"),
    "missing datalist": (lambda w: ["--config_file", config("train.yaml"), "--dataset_dir", str(w / "absent"),
                                    "--use_pretrained", "False", *TINY],
                         "datalist {w}/absent/datalist.json not found"),
    "unknown strategy": (lambda w: ["pretrain", "--config_file", config("train.yaml", "pretrain.yaml"), "--dataset_dir",
                                    str(w / "data"), "--global#strategy", "nearby", "--global#volumes_per_batch", "2",
                                    *TINY],
                         "unknown global strategy 'nearby' (pretrain.yaml: global#strategy)"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_error_reaches_the_terminal_as_one_line(trained, tmp_path, case):
    arguments, expected = CASES[case]
    shutil.copy(trained / "models" / "model.pt", trained / "cut.pt")
    data = (trained / "cut.pt").read_bytes()
    (trained / "cut.pt").write_bytes(data[: len(data) // 3])
    outputs = ["--output_dir", str(tmp_path / "out"), "--model_dir", str(tmp_path / "models")]
    code, out, err = run(tmp_path, *arguments(trained), *outputs)
    assert code != 0
    line = last_line(err)
    assert line.startswith("ERROR: ") and expected.format(w=trained) in line, err[-3000:]
    assert "Traceback" not in err and "BUNDLE_DEBUG=1" in err  # the traceback only on request
    assert files_under(tmp_path) == []  # nothing written, not even partly


def test_debug_switch_shows_the_traceback(trained, tmp_path):
    arguments, expected = CASES["missing checkpoint"]
    code, _, err = run(tmp_path, *arguments(trained), env={"BUNDLE_DEBUG": "1"})
    assert code != 0 and "Traceback (most recent call last)" in err and expected.format(w=trained) in err


# ---------------------------------------------------------------- a folder with bad files among good ones
def test_inference_over_a_folder_skips_bad_files_by_name(trained):
    code, out, err = infer(trained, "mixed", "pred_mixed")
    assert code != 0  # something was skipped
    line = last_line(err)
    assert line.startswith("ERROR: 2 of 4 input(s) skipped (") and "the other 2 were segmented" in line, err[-2000:]
    assert "flat.nii.gz: image is 2D" in line and "truncated.nii.gz: cannot be read" in line
    written = read_labels(trained / "pred_mixed")
    good = os.listdir(trained / "inputs" / "good")
    assert sorted(written) == sorted(n.replace(".nii.gz", "_seg.nii.gz") for n in good)
    if not (trained / "pred_plain").exists():
        assert infer(trained, "good", "pred_plain")[0] == 0
    for name, labels in read_labels(trained / "pred_plain").items():  # each good file's output is the right one
        np.testing.assert_array_equal(written[name], labels)
    code, _, err = infer(trained, "mixed", "pred_strict", "--on_error", "raise")
    assert code != 0 and "2 of 4 input(s) cannot be segmented, nothing was written" in last_line(err)
    assert not (trained / "pred_strict").exists()


# ---------------------------------------------------------------- resolve, in process
def _checkpoint(path, contract):
    torch.save({"model": {}, "contract": contract}, path)
    return str(path)


def _datalist(path, contract):
    path.write_text(json.dumps({"pretrain": [], "contract": contract}))
    return str(path)


def test_data_and_checkpoint_must_agree_unless_transfer_is_asked_for(tmp_path, caplog):
    cardiac = make_contract(64, 3.0, LABELS, placeholder_spacing=1.5)
    prostate = make_contract(64, 3.0, ["background", "PZ", "TZ"], channel=0)
    model = _checkpoint(tmp_path / "pre.pt", cardiac)
    data = _datalist(tmp_path / "datalist.json", prostate)
    with pytest.raises(BundleError, match="num_classes = 3 in .*datalist.json but 4 in .*pre.pt.*--transfer True"):
        resolve(data=data, model=model)
    with caplog.at_level(logging.WARNING, logger="scripts.contract"):
        assert resolve(data=data, model=model, transfer=True) == prostate
    assert "transfer: the fine-tuning data's contract replaces the checkpoint's" in caplog.text
    assert "channel = 0 in" in caplog.text and "class_names" in caplog.text
    assert resolve(data=_datalist(tmp_path / "same.json", cardiac), model=model) == cardiac


def test_overrides_must_agree_with_the_contract(tmp_path):
    contract = make_contract(32, 6.0, LABELS, slice_axis=2)
    model = _checkpoint(tmp_path / "m.pt", contract)
    assert resolve(model=model, overrides={"image_size": "32", "spacing": 6, "slice_axis": "2", "num_classes": 4,
                                           "channel": None}) == contract
    refused = r"--num_classes 3 contradicts num_classes = 4 in the data contract of .*m.pt"
    with pytest.raises(BundleError, match=refused):
        resolve(model=model, overrides={"num_classes": 3})
    with pytest.raises(BundleError, match="'colour' is not a data contract entry"):
        resolve(model=model, overrides={"colour": 1})


def test_fallbacks_metadata_and_old_checkpoints(tmp_path, caplog):
    metadata = os.path.join(CONFIGS, "metadata.json")
    shipped = json.load(open(metadata))["data_contract"]
    assert resolve(fallback=metadata) == shipped and shipped["class_names"] == LABELS  # what MONAI Label lists
    channel_def = json.load(open(metadata))["network_data_format"]["outputs"]["pred"]["channel_def"]
    assert [channel_def[k] for k in sorted(channel_def, key=int)] == shipped["class_names"]
    torch.save({"encoder.0.weight": torch.zeros(1)}, tmp_path / "old.pt")  # written before contracts existed
    with caplog.at_level(logging.WARNING, logger="scripts.contract"):
        assert resolve(model=str(tmp_path / "old.pt"), fallback=metadata) == shipped
    assert "carries no data contract" in caplog.text
    with pytest.raises(BundleError, match="no data contract found"):
        resolve(data=str(tmp_path / "absent.json"))


def test_contract_is_copied_into_the_metadata(tmp_path):
    from scripts.cli import contract as copy_contract

    metadata = tmp_path / "metadata.json"
    shutil.copy(os.path.join(CONFIGS, "metadata.json"), metadata)
    prostate = make_contract(96, 0.625, ["background", "peripheral zone", "transition zone"], channel=0)
    copy_contract(_checkpoint(tmp_path / "m.pt", prostate), str(metadata))
    meta = json.load(open(metadata))
    assert meta["data_contract"] == prostate
    pred = meta["network_data_format"]["outputs"]["pred"]
    assert pred["channel_def"] == {"0": "background", "1": "peripheral zone", "2": "transition zone"}
    assert pred["num_channels"] == 3 and meta["network_data_format"]["inputs"]["image"]["spatial_shape"] == [96, 96]
    with pytest.raises(BundleError, match="carries no data contract"):
        torch.save({"model": {}}, tmp_path / "old.pt")
        copy_contract(str(tmp_path / "old.pt"), str(metadata))
