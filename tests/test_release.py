"""The release path, end to end, as a user of the published bundle meets it.

Fast checks of the packer (``study.release``): what the archive holds, ``large_files.yml``, the refusal to pack
without the pre-trained checkpoints, the version command, and configs that name only files that exist.

One end-to-end pass (the module fixture ``released``, 1.5-3 min on 2 shared cores): pack the bundle with stand-in
weights of the reference U-Net into ``dist/``, serve ``dist/`` from a local HTTP server on 127.0.0.1, then, in fresh
folders with nothing of the repository on ``PYTHONPATH``: ``monai.bundle download`` + ``download_large_files``
(hash-checked; a weight file whose bytes changed is refused, on the server and on disk), ``monai.bundle.load`` of the
pre-trained U-Net, inference from the downloaded bundle's own folder, and a short transfer fine-tuning to a 3-class
dataset prepared with ``prepare_folder`` (encoder + decoder blocks 1..3 loaded, a new output layer, the loss falls).
The exports (TorchScript ``ckpt_export``, ONNX ``onnx_export``) of the transferred network must give the same label
maps as the PyTorch checkpoint through ``inference.yaml``'s pre- and post-processing.
"""

import functools
import http.server
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import zipfile

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from monai.apps.utils import HashCheckError
from monai.bundle import download_large_files

from conftest import ROOT, run, write_nifti
from scripts.errors import BundleError, MissingFileError
from scripts.exported import load_exported
from scripts.networks import UNet2D, pretrained_prefixes
from scripts.report import read_scalars
from scripts.synthetic import make_volume
from study import release

NAME = release.NAME
VERSION = release.read_metadata()["version"]
HAVE_ONNX = all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime", "onnxscript"))


def fake_weights(folder, names=("pretrained_global.pt", "pretrained_local.pt"), contract=None):
    """Small stand-in checkpoints as the workflows write them: {"model": weights, "contract": data contract}."""
    folder.mkdir(parents=True, exist_ok=True)
    contract = contract or release.read_metadata()["data_contract"]
    for i, name in enumerate(names):
        torch.save({"model": {"w": torch.full((2,), float(i))}, "contract": contract}, folder / name)
    return folder


# ---------------------------------------------------------------- the packer, in-process
def test_archive_holds_the_bundle_and_only_the_bundle(tmp_path):
    models = fake_weights(tmp_path / "models", ("pretrained_global.pt", "pretrained_local.pt", "model.pt"))
    written = release.pack(url="https://example.org/v{version}", models_dir=str(models), dist_dir=str(tmp_path / "d"),
                           dataset="test bytes", data_licence="none")
    assert written["archive"] == str(tmp_path / "d" / f"{NAME}_v{VERSION}.zip")
    names = zipfile.ZipFile(written["archive"]).namelist()
    assert all(n.startswith(NAME + "/") for n in names)
    inside = {n[len(NAME) + 1:] for n in names}
    on_disk = set(release.bundle_files())
    for folder in ("configs", "scripts"):   # every file of the bundle's configs and code ships (new ones too)
        for base, dirs, files in os.walk(os.path.join(release.BUNDLE_DIR, folder)):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            for f in files:
                if not f.endswith(".pyc"):
                    assert os.path.relpath(os.path.join(base, f), release.BUNDLE_DIR) in inside
    assert inside == on_disk | {"large_files.yml"}
    assert {"LICENSE", "configs/metadata.json", "configs/inference.yaml", "docs/README.md",
            "docs/data_license.txt"} <= inside
    for bad in ("__pycache__", ".pyc", "experiments", "benchmark", "study", "data/", "eval/", "models/"):
        assert not any(bad in n for n in inside), bad

    listing = yaml.safe_load(open(written["large_files"]))
    assert listing == yaml.safe_load(zipfile.ZipFile(written["archive"]).read(f"{NAME}/large_files.yml"))
    entries = {e["path"]: e for e in listing["large_files"]}
    assert set(entries) == {"models/pretrained_global.pt", "models/pretrained_local.pt", "models/model.pt"}
    for path, entry in entries.items():
        beside = tmp_path / "d" / os.path.basename(path)
        assert entry["hash_type"] == "sha256" and entry["hash_val"] == release.sha256(str(beside))
        assert entry["url"] == f"https://example.org/v{VERSION}/{os.path.basename(path)}"
    card = zipfile.ZipFile(written["archive"]).read(f"{NAME}/docs/README.md").decode()
    assert "## Weights of this release" in card and entries["models/model.pt"]["hash_val"] in card
    assert "test bytes" in card and "git commit" in card and "**Data contract**" in card


def test_archive_metadata_carries_the_weights_contract(tmp_path):
    from scripts.contract import make_contract

    contract = make_contract(96, 1.5, ["background", "liver"], placeholder_spacing=None)
    models = fake_weights(tmp_path / "models", contract=contract)
    written = release.pack(models_dir=str(models), dist_dir=str(tmp_path / "d"), dataset="x", data_licence="y")
    meta = json.loads(zipfile.ZipFile(written["archive"]).read(f"{NAME}/configs/metadata.json"))
    assert meta["data_contract"] == contract and meta["version"] == VERSION
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"] == {"0": "background", "1": "liver"}
    torch.save({"model": {}, "contract": release.read_metadata()["data_contract"]}, models / "pretrained_local.pt")
    with pytest.raises(release.ReleaseError, match="different data contracts"):
        release.pack(models_dir=str(models), dist_dir=str(tmp_path / "e"), dataset="x", data_licence="y")
    torch.save({"encoder.w": torch.zeros(1)}, models / "pretrained_local.pt")   # written before contracts existed
    with pytest.raises(release.ReleaseError, match="carries no data contract"):
        release.pack(models_dir=str(models), dist_dir=str(tmp_path / "e"), dataset="x", data_licence="y")


def test_pack_refuses_a_missing_weight_file_and_names_the_run(tmp_path):
    models = fake_weights(tmp_path / "models", ("pretrained_global.pt",))
    with pytest.raises(release.ReleaseError, match=r"pretrained_local\.pt \(written by .*pretrain_local"):
        release.pack(models_dir=str(models), dist_dir=str(tmp_path / "d"), dataset="x", data_licence="y")
    assert not (tmp_path / "d").exists()
    fake_weights(models)
    with pytest.raises(release.ReleaseError, match="--dataset"):   # no record of what the weights were trained on
        release.pack(models_dir=str(models), dist_dir=str(tmp_path / "d"))
    (models / "commands.log").write_text("python -m monai.bundle run prepare_synthetic ...\n")
    card = zipfile.ZipFile(release.pack(models_dir=str(models), dist_dir=str(tmp_path / "d"))["archive"])
    text = card.read(f"{NAME}/docs/README.md").decode()
    assert "run prepare_synthetic" in text and "synthetic" in text.split("**Data**")[1]
    # the demo's weights say what they are, in the card and in the metadata
    assert "Demo weights (synthetic), not for transfer" in text
    meta = json.loads(card.read(f"{NAME}/configs/metadata.json"))
    assert meta["intended_use"].startswith("demo weights (synthetic), not for transfer")


def test_version_command_sets_version_and_changelog(tmp_path):
    (tmp_path / "configs").mkdir()
    original = os.path.join(release.BUNDLE_DIR, "configs", "metadata.json")
    (tmp_path / "configs" / "metadata.json").write_text(open(original).read())
    major, minor, patch = map(int, VERSION.split("."))
    new = f"{major}.{minor + 1}.0"
    subprocess.run([sys.executable, "-m", "study.release", "version", new, "transfer docs", "--bundle_dir",
                    str(tmp_path)], cwd=ROOT, check=True, capture_output=True)
    metadata = json.loads((tmp_path / "configs" / "metadata.json").read_text())
    assert metadata["version"] == new and list(metadata["changelog"].items())[0] == (new, "transfer docs")
    for bad in (VERSION, "1.0", new):
        with pytest.raises(release.ReleaseError):
            release.set_version(bad, "again", str(tmp_path))


def test_configs_name_only_files_that_exist():
    configs = os.path.join(release.BUNDLE_DIR, "configs")
    for name in os.listdir(configs):
        if name.endswith(".yaml"):
            text = open(os.path.join(configs, name)).read()
            for mentioned in set(re.findall(r"[\w.-]+\.(?:yaml|json|conf)\b", text)):
                # data files the workflows read or write, and the stopping rule's reports (pretrain_<stage>_stop.json)
                if mentioned not in ("datalist.json", "dataset.json") and not mentioned.endswith("_stop.json"):
                    assert os.path.isfile(os.path.join(configs, mentioned)), f"{name} names {mentioned}"


def test_exported_model_loader_names_what_is_wrong(tmp_path):
    with pytest.raises(MissingFileError, match="model.onnx not found: export it first"):
        load_exported(str(tmp_path / "model.onnx"))
    (tmp_path / "model.bin").write_bytes(b"x")
    with pytest.raises(BundleError, match="unknown format"):
        load_exported(str(tmp_path / "model.bin"))


# ---------------------------------------------------------------- the release path, end to end
class QuietHandler(http.server.SimpleHTTPRequestHandler):
    timeout = 30   # seconds a connection may stay idle

    def log_message(self, *args):
        pass


# the environment of someone who has only downloaded the bundle: no PYTHONPATH, no proxy for 127.0.0.1
USER_ENV = {"PYTHONPATH": None, "no_proxy": "127.0.0.1,localhost", "NO_PROXY": "127.0.0.1,localhost"}


def user_env():
    """This process's environment changed as ``USER_ENV`` says (None: removed)."""
    return {k: v for k, v in dict(os.environ, **USER_ENV).items() if v is not None}


def user(cwd, *args, ok=True):
    """``python <args>`` in ``cwd`` as a user runs it; the test fails with the output unless it exits as ``ok``."""
    result = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, env=user_env(),
                            timeout=300)
    output = result.stdout + result.stderr
    assert (result.returncode == 0) == ok, f"python {' '.join(args)} -> {result.returncode}:\n{output[-6000:]}"
    return output


def monai_bundle(cwd, *args, ok=True):
    """``python -m monai.bundle <args>`` in ``cwd`` as a user runs it; the test fails with the output unless it exits
    as ``ok``."""
    result = run(cwd, *args, expect=None, env=USER_ENV)
    output = result.stdout + result.stderr
    assert (result.returncode == 0) == ok, f"monai.bundle {' '.join(args)} -> {result.returncode}:\n{output[-6000:]}"
    return output


def flip_byte(path, offset=-100):
    data = bytearray(open(path, "rb").read())
    data[offset] ^= 0xFF
    open(path, "wb").write(bytes(data))


def write_volume(path, seed, merge_blood_pools=False, label_path=None):
    image, label, spacing = make_volume(seed)
    affine = np.diag([*map(float, spacing), 1.0])
    write_nifti(path, image, affine)
    if label_path is not None:
        if merge_blood_pools:   # a different label set: 0 background, 1 blood pool (RV + LV), 2 myocardium
            label = np.select([label == 2, (label == 1) | (label == 3)], [2, 1], 0).astype(np.uint8)
        write_nifti(label_path, label, affine)


USER_SCRIPT = '''"""A user's Python session with the downloaded bundle (one process: each MONAI import costs seconds):
monai.bundle.load of the pre-trained U-Net, then ckpt_export / onnx_export of the transferred 3-class network and
inference.yaml with the checkpoint and with each export (the functions behind python -m monai.bundle <command>)."""
import os
import sys

import torch

bundle, mine, volume, work, have_onnx = sys.argv[1:6]
sys.path.insert(0, bundle)   # the bundle's own code (scripts/), as docs/use_pretrained.md says
import scripts  # noqa: E402
from monai.bundle import ckpt_export, load, onnx_export, run  # noqa: E402
from scripts.networks import UNet2D  # noqa: E402

print("scripts from", scripts.__file__)
name = os.path.basename(bundle)
net = load(name, bundle_dir=os.path.dirname(bundle), model_file="models/pretrained_local.pt", model=UNet2D(1, 4),
           key_in_ckpt="model")
state = torch.load(os.path.join(bundle, "models", "pretrained_local.pt"), weights_only=True)["model"]
same = all(torch.equal(net.state_dict()[k], v) for k, v in state.items())
print("loaded", type(net).__name__, len(state), "tensors, identical:", same)

C = os.path.join(bundle, "configs")
model = os.path.join(mine, "models", "model.pt")
# the transferred model's own contract (3 classes) sets the network and the pre-processing: checkpoint=model
common = dict(meta_file=f"{C}/metadata.json", config_file=f"{C}/inference.yaml", ckpt_file=model, key_in_ckpt="model",
              checkpoint=model)
exports = {"torchscript": os.path.join(mine, "models", "model.ts")}
ckpt_export("network_def", filepath=exports["torchscript"], **common)
if have_onnx == "True":
    exports["onnx"] = os.path.join(mine, "models", "model.onnx")
    onnx_export("network_def", filepath=exports["onnx"], input_shape=[1, 1, 64, 64], converter_kwargs={
        "input_names": ["image"], "output_names": ["pred"],
        "dynamic_axes": {"image": {0: "batch"}, "pred": {0: "batch"}}}, **common)
run(config_file=f"{C}/inference.yaml", input_glob=volume, checkpoint=model,
    output_dir=os.path.join(work, "pred_pytorch"))
for kind, path in exports.items():
    run(config_file=[f"{C}/inference.yaml", f"{C}/inference_exported.yaml"], input_glob=volume, checkpoint=model,
        exported_model=path, output_dir=os.path.join(work, f"pred_{kind}"))
print("exported and segmented:", ", ".join(["pytorch", *exports]))
'''


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """pack -> serve on 127.0.0.1 -> download -> hash checks -> load -> inference -> transfer to 3 classes."""
    work = tmp_path_factory.mktemp("release")
    dist = work / "dist"
    dist.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(dist)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
    thread.start()
    try:
        yield run_release_path(work, dist, f"http://127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def run_release_path(work, dist, url):
    out = {"work": work}
    # stand-in weights of the reference U-Net (the mechanics do not need a real pre-training)
    torch.manual_seed(0)
    models = work / "models"
    models.mkdir()
    contract = release.read_metadata()["data_contract"]   # the shipped model's data contract, as training writes it
    pretrained = {"model": UNet2D(1, 4).state_dict(), "contract": contract}
    torch.save(pretrained, models / "pretrained_global.pt")
    torch.save(pretrained, models / "pretrained_local.pt")
    torch.save({"model": UNet2D(1, 4).state_dict(), "contract": contract}, models / "model.pt")
    (models / "commands.log").write_text("# tests/test_release.py: randomly initialised UNet2D(1, 4), seed 0\n")
    release.pack(url=url, models_dir=str(models), dist_dir=str(dist), dataset="none (random stand-in weights)",
                 data_licence="none")
    out["zip"] = f"{NAME}_v{VERSION}.zip"

    # download the archive, then the weights, in a fresh folder
    user_dir = work / "user"
    user_dir.mkdir()
    monai_bundle(user_dir, "download", "--name", NAME, "--url", f"{url}/{out['zip']}", "--bundle_dir", "zoo")
    bundle = user_dir / "zoo" / NAME
    out["bundle"] = bundle
    out["before_weights"] = sorted(os.listdir(bundle))
    out["large_files"] = monai_bundle(user_dir, "download_large_files", "--bundle_path", f"zoo/{NAME}")

    # a weight file changed on the server is refused (in a second copy of the unpacked archive, without weights)
    other = work / "other" / NAME
    shutil.copytree(bundle, other, ignore=shutil.ignore_patterns("models"))
    served = dist / "pretrained_local.pt"
    flip_byte(served)
    out["refused_served"] = monai_bundle(work / "other", "download_large_files", "--bundle_path", NAME, ok=False)
    out["refused_served_left"] = os.path.exists(other / "models" / "pretrained_local.pt")
    flip_byte(served)   # restored
    # ... and so is one changed on disk after the download (same MONAI function, called in-process)
    flip_byte(other / "models" / "pretrained_global.pt")   # downloaded intact above, now changed
    with pytest.raises(HashCheckError) as refused:
        download_large_files(bundle_path=str(other))
    out["refused_on_disk"] = str(refused.value)

    # (a) inference from the downloaded bundle's own folder
    volumes = work / "volumes"
    volumes.mkdir()
    write_volume(volumes / "case_a.nii.gz", seed=101)
    out["volume"] = volumes / "case_a.nii.gz"
    monai_bundle(bundle, "run", "--config_file", "configs/inference.yaml", "--input_glob", str(out["volume"]),
                 "--output_dir", str(work / "pred4"))
    out["pred4"] = work / "pred4" / "case_a_seg.nii.gz"

    # (b) transfer: prepare a 3-class folder dataset, fine-tune from the pre-trained encoder + decoder blocks 1..3
    raw = work / "raw3"
    (raw / "images").mkdir(parents=True)
    (raw / "labels").mkdir()
    for i in range(4):
        write_volume(raw / "images" / f"case{i}.nii.gz", seed=200 + i, merge_blood_pools=True,
                     label_path=raw / "labels" / f"case{i}.nii.gz")
    mine = work / "mine"
    out["prepare"] = monai_bundle(
        bundle, "run", "prepare_folder", "--config_file", "['configs/train.yaml','configs/prepare.yaml']",
        "--raw_dir", str(raw), "--dataset_dir", str(mine),
        "--folder#labels", "['background','blood pool','myocardium']",
        "--folder#split", "{num_validation: 1, num_test: 1, subset_sizes: [1], num_subsets: [1]}",
        "--cache_workers", "0")
    out["train"] = monai_bundle(
        bundle, "run", "--config_file", "configs/train.yaml", "--dataset_dir", str(mine), "--transfer", "True",
        "--num_labelled", "1", "--model_dir", str(mine / "models"), "--output_dir", str(mine / "eval"),
        "--pretrained_checkpoint", "models/pretrained_local.pt", "--max_epochs", "3", "--iterations_per_epoch", "8",
        "--batch_size", "6", "--num_workers", "0")
    out["mine"] = mine

    # in Python, as a user: load the pre-trained U-Net; export the transferred network; segment with each
    script = work / "user_script.py"
    script.write_text(USER_SCRIPT)
    out["python"] = user(user_dir, str(script), str(bundle), str(mine), str(out["volume"]), str(work), str(HAVE_ONNX))
    return out


def test_download_fetches_and_hash_checks_every_weight_file(released):
    bundle = released["bundle"]
    assert "models" not in released["before_weights"] and "large_files.yml" in released["before_weights"]
    assert (bundle / "configs" / "inference.yaml").is_file() and (bundle / "scripts" / "networks.py").is_file()
    for entry in yaml.safe_load(open(bundle / "large_files.yml"))["large_files"]:
        assert release.sha256(str(bundle / entry["path"])) == entry["hash_val"]
    assert not (bundle / "scripts" / "experiments.py").exists() and not (bundle / "data").exists()


def test_changed_weight_file_is_refused_with_its_name(released):
    served, on_disk = released["refused_served"], released["refused_on_disk"]
    assert "hash check of downloaded file failed" in served and "pretrained_local.pt" in served
    assert not released["refused_served_left"]   # the refused bytes are not left in the bundle
    assert "hash check of existing file failed" in on_disk and "pretrained_global.pt" in on_disk


def test_load_returns_the_pretrained_unet(released):
    output = released["python"]
    assert re.search(rf"scripts from \S*zoo/{NAME}/scripts/__init__.py", output)   # the downloaded code, not ours
    assert re.search(r"loaded UNet2D \d+ tensors, identical: True", output)


def test_downloaded_bundle_segments_a_volume(released):
    pred, source = nib.load(released["pred4"]), nib.load(released["volume"])
    assert pred.shape == source.shape and np.allclose(pred.affine, source.affine)
    assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1, 2, 3}


def test_transfer_to_three_classes_loads_pretrained_blocks_and_the_loss_falls(released):
    mine, train = released["mine"], released["train"]
    datalist = json.load(open(mine / "datalist.json"))
    assert datalist["contract"]["class_names"] == ["background", "blood pool", "myocardium"]
    assert "transfer: the fine-tuning data's contract replaces the checkpoint's: num_classes = 3" in train
    pretrained = torch.load(released["bundle"] / "models" / "pretrained_local.pt", weights_only=True)["model"]
    loaded = [k for k in pretrained if k.startswith(pretrained_prefixes(3))]
    found = re.search(r"Initialised (\d+) tensors \((.*?)\) from (\S+)", train)
    assert found, train[-3000:]
    assert int(found.group(1)) == len(loaded) and found.group(2) == "encoder., decoder.0., decoder.1., decoder.2."
    assert found.group(3).rstrip(".").endswith("models/pretrained_local.pt")
    saved = torch.load(mine / "models" / "model.pt", weights_only=True)
    assert saved["model"]["out_conv.weight"].shape[0] == 3 and pretrained["out_conv.weight"].shape[0] == 4
    assert saved["contract"] == datalist["contract"]   # the transferred model carries its new data's contract
    steps, losses = read_scalars(str(mine / "eval"), "train_loss")
    assert len(losses) == 24
    assert losses[-4:].mean() < losses[:4].mean(), losses


def test_exports_give_the_same_label_maps(released):
    work = released["work"]
    kinds = ["torchscript", "onnx"] if HAVE_ONNX else ["torchscript"]
    assert "exported and segmented: " + ", ".join(["pytorch", *kinds]) in released["python"]
    reference = np.asarray(nib.load(work / "pred_pytorch" / "case_a_seg.nii.gz").dataobj)
    assert reference.shape == nib.load(released["volume"]).shape and set(np.unique(reference)) <= {0, 1, 2}
    for kind in kinds:
        labels = np.asarray(nib.load(work / f"pred_{kind}" / "case_a_seg.nii.gz").dataobj)
        assert np.array_equal(labels, reference), f"{kind}: {(labels != reference).sum()} voxels differ"
    if not HAVE_ONNX:
        pytest.skip("onnx / onnxruntime / onnxscript not installed (pip install -e '.[export]'): ONNX parity not run")
