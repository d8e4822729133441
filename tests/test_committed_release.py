"""The release committed in bundle/models (``make release DATA=<ACDC> INSTALL=1``), as a fresh clone uses it: no data
prepared, no release run. Its files match ``bundle/large_files.yml``; inference.yaml segments a cardiac volume of the
shared ACDC copy with it as it stands; pre-training continues from its ``pretrained_local.pt``."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import yaml

from conftest import BUNDLE, PRETRAIN, ROOT, config, run
from scripts.files import file_hash

MODELS = BUNDLE / "models"
SHARED_ACDC = ROOT.parent / "shared" / "data" / "acdc"


def test_large_files_list_the_committed_weights_with_their_sha256():
    listed = yaml.safe_load((BUNDLE / "large_files.yml").read_text())["large_files"]
    weights = ["models/pretrained_global.pt", "models/pretrained_local.pt", "models/model.pt"]
    assert [e["path"] for e in listed] == weights
    for entry in listed:
        assert entry["hash_type"] == "sha256" and file_hash(str(BUNDLE / entry["path"])) == entry["hash_val"]
        version = json.loads((BUNDLE / "configs" / "metadata.json").read_text())["version"]
        assert entry["url"].endswith(f"/raw/v{version}/bundle/{entry['path']}")   # this version's tag
    licence = (MODELS / "LICENCE.md").read_text()
    assert "CC BY-NC-SA 4.0" in licence and "Bernard" in licence
    record = json.loads((MODELS / "release.json").read_text())
    assert "ACDC" in record["dataset"] and "CC BY-NC-SA 4.0" in record["data_licence"]


@pytest.mark.realdata
def test_inference_with_the_committed_model_on_an_acdc_volume(tmp_path):
    if not SHARED_ACDC.is_dir():
        pytest.skip(f"the shared ACDC data is not at {SHARED_ACDC}")
    image = SHARED_ACDC / "patient002" / "patient002_frame01.nii.gz"
    run(tmp_path, "run", "--config_file", config("inference.yaml"), "--input_glob", image, "--output_dir",
        tmp_path / "seg")
    predicted = np.asarray(nib.load(tmp_path / "seg" / "patient002_frame01_seg.nii.gz").dataobj)
    truth = np.asarray(nib.load(str(image).replace(".nii.gz", "_gt.nii.gz")).dataobj)
    assert predicted.shape == truth.shape and set(np.unique(predicted).tolist()) <= {0, 1, 2, 3}
    dice = [2 * np.sum((predicted == c) & (truth == c)) / (np.sum(predicted == c) + np.sum(truth == c))
            for c in (1, 2, 3)]
    assert np.mean(dice) > 0.7, dice   # trained weights, not a stand-in


def test_pretraining_continues_from_the_committed_pretrained_local(tmp_path, prepared_data):
    run(tmp_path, "run", "pretrain", "--config_file", config("train.yaml", "pretrain.yaml"), *prepared_data,
        "--model_dir", tmp_path / "models", "--output_dir", tmp_path / "eval", "--num_workers", "0",
        "--init_checkpoint", MODELS / "pretrained_local.pt", *PRETRAIN, timeout=600)
    stop = json.loads((tmp_path / "eval" / "pretrain_global_stop.json").read_text())
    assert stop["iteration"] == 6 and (tmp_path / "models" / "pretrained_local.pt").is_file()


def test_make_bundle_packs_the_committed_release(tmp_path):
    """``make bundle`` (``study.release pack`` with its defaults): the committed release's weights, data and licence,
    its model-card section and test Dice, not demo weights."""
    import zipfile

    from study import release

    written = release.pack(dist_dir=str(tmp_path))
    archive = zipfile.ZipFile(written["archive"])
    card = archive.read(f"{release.NAME}/docs/README.md").decode()
    metadata = json.loads(archive.read(f"{release.NAME}/configs/metadata.json"))
    record = json.loads((MODELS / "release.json").read_text())
    assert "ACDC" in card.split("**Data**")[1].split("\n")[0] and "How each check decided" in card
    assert metadata["eval_metrics"] == record["metadata"]["eval_metrics"] and "intended_use" not in record["metadata"]
    for path in written["weights"]:
        assert file_hash(path) == file_hash(str(MODELS / path.rsplit("/", 1)[-1]))


def test_metadata_describes_the_committed_weights():
    """metadata.json, what MONAI tooling and MONAI Label read beside models/model.pt: the release's test Dice and
    data source, and the data contract the weights carry."""
    from scripts.contract import differences, read_contract

    metadata = json.loads((BUNDLE / "configs" / "metadata.json").read_text())
    record = json.loads((MODELS / "release.json").read_text())
    assert metadata["eval_metrics"] == record["metadata"]["eval_metrics"]
    assert metadata["data_source"].startswith(record["metadata"]["data_source"])
    assert not differences(metadata["data_contract"], read_contract(str(MODELS / "model.pt"), "checkpoint"))
