"""End to end through `python -m monai.bundle run`, from a directory outside the bundle, with a tiny network:
prepare -> pretrain (global then local) -> fine-tune -> evaluate -> infer; plus MONAI's own bundle checks."""

import csv
import json
import os

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow

from conftest import BUNDLE, CONFIGS, ROOT, TINY, TINY_INFERENCE, TINY_NETWORK, config, run

SCHEMA = os.path.join(ROOT, "docs", "scripts", "meta_schema_20240725.json")   # the zoo schema, local copy


def bundle(cwd, *args, pythonpath=False):
    """Run `python -m monai.bundle <args>` in ``cwd``; fail the test with its output if it fails.

    ``run`` finds the bundle's ``scripts`` package itself; the checking commands (verify_net_in_out, ckpt_export)
    need it on PYTHONPATH, as the README says."""
    result = run(cwd, *args, timeout=None, env={"PYTHONPATH": str(BUNDLE)} if pythonpath else None)
    return result.stdout + result.stderr


def handler_index(stage: str, target: str) -> int:
    """The index of the handler ``target`` (its ``_target_``) in pretrain.yaml's ``<stage>#handlers``."""
    parser = ConfigParser()
    parser.read_config([os.path.join(CONFIGS, name) for name in ("train.yaml", "pretrain.yaml")])
    targets = [h.get("_target_") if isinstance(h, dict) else h for h in parser[f"{stage}#handlers"]]
    return targets.index(target)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Every stage once, run from a scratch directory (not the repository, not the bundle)."""
    work = tmp_path_factory.mktemp("work")
    paths = ["--dataset_dir", str(work / "data"), "--model_dir", str(work / "models"),
             "--output_dir", str(work / "eval")]
    logs = {}
    logs["prepare"] = bundle(work, "run", "prepare_synthetic", "--config_file", config("train.yaml", "prepare.yaml"),
                             *paths, "--synthetic#num_patients", "6", "--synthetic#split",
                             "{num_validation: 1, num_test: 1, subset_sizes: [1,2], num_subsets: [1,1]}")
    logs["pretrain"] = bundle(work, "run", "pretrain", "--config_file", config("train.yaml", "pretrain.yaml"), *paths,
                              *TINY, "--global#max_iterations", "4", "--local#max_iterations", "4",
                              "--pretrain_epoch_length", "2", "--global#volumes_per_batch", "2",
                              "--local#volumes_per_batch", "2", "--global#hidden_features", "16",
                              "--global#embedding_features", "8", "--global#lr_decay", "cosine",
                              f"--local#handlers#{handler_index('local', 'TensorBoardStatsHandler')}#_disabled_",
                              "True")
    logs["train"] = bundle(work, "run", "--config_file", config("train.yaml"), *paths, *TINY, "--max_epochs", "2",
                           "--iterations_per_epoch", "2", "--batch_size", "4")
    logs["evaluate"] = bundle(work, "run", "--config_file", config("train.yaml", "evaluate.yaml"), *paths, *TINY)
    logs["infer"] = bundle(work, "run", "--config_file", config("inference.yaml"), "--dataset_dir", str(work / "data"),
                           "--checkpoint", str(work / "models" / "model.pt"), "--output_dir", str(work / "pred"),
                           *TINY_INFERENCE)
    return work, logs


def test_pretraining_writes_both_stages(workspace):
    work, logs = workspace
    for name in ("pretrained_global.pt", "pretrained_local.pt"):
        saved = torch.load(work / "models" / name, weights_only=True)
        assert set(saved) == {"model", "contract"}  # the weights travel with the data contract
        assert "encoder.0.0.weight" in saved["model"] and "decoder.0.up_conv.1.weight" in saved["model"]
        assert saved["contract"]["image_size"] == 64 and saved["contract"]["class_names"][3] == "left ventricle"
    g = torch.load(work / "models" / "pretrained_global.pt", weights_only=True)["model"]
    loc = torch.load(work / "models" / "pretrained_local.pt", weights_only=True)["model"]
    for k in g:  # the local stage leaves the encoder (weights and BatchNorm statistics) exactly as stage 1 left it
        if k.startswith("encoder."):
            assert torch.equal(g[k], loc[k]), k
    assert any(not torch.equal(g[k], loc[k]) for k in g if k.startswith("decoder.2."))
    # each stage says when and why it stopped after 4 iterations: the global stage at the end of its cosine schedule
    # (lr_decay cosine, set above), the local stage (constant learning rate) at its budget
    for stage, reason in (("global", "schedule"), ("local", "budget")):
        stop = json.loads((work / "eval" / f"pretrain_{stage}_stop.json").read_text())
        assert stop["stage"] == stage and stop["reason"] == reason and stop["iteration"] == 4
        assert f"pretrain-{stage}: stopped at iteration 4" in logs["pretrain"]


def test_one_override_removes_a_handler_from_one_stage(workspace):
    """The workspace's pre-training ran with --local#handlers#<i>#_disabled_ True on the local TensorBoard handler:
    the global stage wrote its TensorBoard log, the local stage none, and both stages still ran to their end."""
    work, logs = workspace
    assert any((work / "eval" / "pretrain_global").iterdir())
    assert not (work / "eval" / "pretrain_local").exists()
    assert "pretrain-local: stopped at iteration 4" in logs["pretrain"]


def test_no_block_of_six_lines_appears_twice_in_pretrain_yaml():
    """pretrain.yaml writes each thing once: no run of six lines (comment lines and blank lines left out, spaces
    folded) stands in it twice."""
    lines = [" ".join(line.split()) for line in open(os.path.join(CONFIGS, "pretrain.yaml")).read().splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    seen = {}
    for start in range(len(lines) - 5):
        block = tuple(lines[start:start + 6])
        assert block not in seen, f"lines {seen[block]} and {start} (of the non-blank lines) repeat: {block}"
        seen[block] = start


def test_fine_tuning_starts_from_pretraining_and_selects_on_validation(workspace):
    work, logs = workspace
    assert "from " + str(work / "models" / "pretrained_local.pt") in logs["train"]
    assert "val_mean_dice" in logs["train"]
    saved = torch.load(work / "models" / "model.pt", weights_only=True)
    assert saved["model"]["out_conv.weight"].shape[0] == 4
    data_contract = json.load(open(work / "data" / "datalist.json"))["contract"]
    assert saved["contract"] == data_contract


def test_evaluation_writes_dice_per_test_volume(workspace):
    work, _ = workspace
    with open(work / "eval" / "test" / "test_mean_dice_raw.csv") as f:
        rows = list(csv.DictReader(f))
    names = ["right ventricle", "myocardium", "left ventricle"]  # the columns carry the contract's class names
    assert len(rows) == 1 and list(rows[0]) == ["filename", *names, "mean"]
    assert all(0.0 <= float(rows[0][c]) <= 1.0 for c in names)


def test_inference_writes_labels_on_the_input_grid(workspace):
    work, _ = workspace
    images = sorted((work / "data").glob("patient*/patient*_frame01.nii.gz"))
    assert len(images) == 6
    for image in images:
        pred = nib.load(work / "pred" / image.name.replace(".nii.gz", "_seg.nii.gz"))
        source = nib.load(image)
        assert pred.shape == source.shape and np.allclose(pred.affine, source.affine)
        assert pred.get_data_dtype() == np.uint8 and set(np.unique(np.asarray(pred.dataobj))) <= {0, 1, 2, 3}


def test_bundle_checks_metadata_network_and_export(workspace, tmp_path):
    work, _ = workspace
    bundle(tmp_path, "verify_metadata", "--meta_file", os.path.join(CONFIGS, "metadata.json"), "--filepath", SCHEMA)
    bundle(tmp_path, "verify_net_in_out", "network_def", "--meta_file", os.path.join(CONFIGS, "metadata.json"),
           "--config_file", os.path.join(CONFIGS, "inference.yaml"), "--n", "2", "--checkpoint", "",
           pythonpath=True)  # no weights: the data contract comes from metadata.json
    exported = tmp_path / "model.ts"
    bundle(tmp_path, "ckpt_export", "network_def", "--filepath", str(exported), "--ckpt_file",
           str(work / "models" / "model.pt"), "--key_in_ckpt", "model",
           "--checkpoint", str(work / "models" / "model.pt"),
           "--meta_file", os.path.join(CONFIGS, "metadata.json"),
           "--config_file", os.path.join(CONFIGS, "inference.yaml"),
           *TINY_INFERENCE, pythonpath=True)
    scripted = torch.jit.load(str(exported))
    assert scripted(torch.rand(1, 1, 64, 64)).shape == (1, 4, 64, 64)
    trained = torch.load(work / "models" / "model.pt", weights_only=True)["model"]
    assert torch.equal(scripted.state_dict()["out_conv.weight"], trained["out_conv.weight"])  # the trained weights


@pytest.mark.parametrize("name, kind", [("train.yaml", "train"), ("inference.yaml", "infer")])
def test_configs_have_the_properties_monai_label_reads(workspace, name, kind):
    """MONAI Label hands each file over alone, with its own data lists and a bundle folder that holds models/
    (here: the workspace's models, with the pre-trained checkpoint); every required property must resolve."""
    work, _ = workspace
    image = sorted((work / "data").glob("patient*/patient*_frame01.nii.gz"))[0]
    case = {"image": str(image), "label": str(image).replace(".nii.gz", "_gt.nii.gz")}
    if kind == "train":
        override = {"dataset_dir": str(work / "data"), "model_dir": str(work / "models"),
                    "train#dataset#data": [case], "validate#dataset#data": [case], **TINY_NETWORK}
    else:
        override = {"datalist": [{"image": case["image"]}], "checkpoint": str(work / "models" / "model.pt")}
    workflow = ConfigWorkflow(config_file=os.path.join(CONFIGS, name), workflow_type=kind, **override)
    workflow.initialize()
    assert workflow.check_properties() == []
