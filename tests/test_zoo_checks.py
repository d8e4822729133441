"""The model zoo's checks on the bundle as downloaded, before its weights (no models/ content): verify_metadata
against the local schema copy, verify_net_in_out and ckpt_export of a given checkpoint, run as the model card types
them from the bundle folder. Without models/model.pt the network is built from metadata.json's data contract (with a
warning); a models/model.pt that exists wins, and one that disagrees with metadata.json fails the check."""

from __future__ import annotations

import json
import logging
import os
import shutil

import pytest
import torch

from conftest import BUNDLE, ROOT, run
from scripts.contract import resolve
from scripts.networks import UNet2D

SCHEMA = os.path.join(ROOT, "docs", "scripts", "meta_schema_20240725.json")
METADATA = os.path.join(BUNDLE, "configs", "metadata.json")
CONTRACT = json.load(open(METADATA))["data_contract"]


def zoo_command(folder, *args, expect: int = 0) -> str:
    """``python -m monai.bundle <args>`` in the bundle folder ``folder``; asserts its exit code, returns its output."""
    result = run(folder, *args, expect=expect)
    return result.stdout + result.stderr


@pytest.fixture
def downloaded(tmp_path):
    """The bundle as `monai.bundle download` unpacks it before `download_large_files`: no weights."""
    folder = tmp_path / "cardiac_mri_contrastive_segmentation"
    for part in ("configs", "scripts", "docs"):
        shutil.copytree(os.path.join(BUNDLE, part), folder / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(os.path.join(BUNDLE, "LICENSE"), folder)
    os.makedirs(folder / "models")
    return folder


def test_zoo_checks_without_weights(downloaded, tmp_path):
    zoo_command(downloaded, "verify_metadata", "--meta_file", "configs/metadata.json", "--filepath", SCHEMA)
    output = zoo_command(downloaded, "verify_net_in_out", "--net_id", "network_def", "--meta_file",
                         "configs/metadata.json", "--config_file", "configs/inference.yaml")
    assert "models/model.pt not found: the network is built from" in output and "verified with no error" in output
    # ckpt_export of a checkpoint given on the command line (a fine-tuned model.pt kept elsewhere)
    torch.manual_seed(0)
    net = UNet2D(1, CONTRACT["num_classes"]).eval()
    given = tmp_path / "given.pt"
    torch.save({"model": net.state_dict(), "contract": CONTRACT}, given)
    zoo_command(downloaded, "ckpt_export", "network_def", "--filepath", tmp_path / "given.ts", "--ckpt_file", given,
                "--key_in_ckpt", "model", "--meta_file", "configs/metadata.json", "--config_file",
                "configs/inference.yaml")
    exported = torch.jit.load(str(tmp_path / "given.ts"))
    image = torch.rand(2, 1, CONTRACT["image_size"], CONTRACT["image_size"])
    with torch.no_grad():
        assert torch.allclose(exported(image), net(image), atol=1e-5)
    assert not os.listdir(downloaded / "models"), "a check wrote into models/"


def test_an_existing_checkpoint_wins_and_must_agree(downloaded):
    """models/model.pt with another class count than metadata.json: its contract builds the network (3 outputs), so
    verify_net_in_out, which checks metadata.json's 4 output channels, fails."""
    contract = {**CONTRACT, "num_classes": 3, "class_names": ["background", "blood pool", "myocardium"]}
    torch.save({"model": UNet2D(1, 3).state_dict(), "contract": contract}, downloaded / "models" / "model.pt")
    zoo_command(downloaded, "verify_net_in_out", "--net_id", "network_def", "--meta_file", "configs/metadata.json",
                "--config_file", "configs/inference.yaml", expect=1)


def test_resolve_falls_back_only_when_the_checkpoint_is_missing(tmp_path, caplog):
    missing = str(tmp_path / "model.pt")
    with caplog.at_level(logging.WARNING):
        assert resolve(model=missing, fallback=METADATA, model_optional=True) == CONTRACT
    assert "not found: the network is built from" in caplog.text
    with pytest.raises(Exception, match="not found"):   # not optional (fine-tuning from it): still an error
        resolve(model=missing, fallback=METADATA)
    other = {**CONTRACT, "image_size": 96}
    torch.save({"model": {}, "contract": other}, missing)
    assert resolve(model=missing, fallback=METADATA, model_optional=True)["image_size"] == 96
