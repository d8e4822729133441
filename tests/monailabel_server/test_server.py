"""The bundle served and trained by a real MONAI Label server (`make test-monailabel`, its own venv).

Runs docs/monailabel.md's "Three commands" as written: step 2 (the `monaibundle` sample app that ships inside the
monailabel package, with the bundle's code, configs, docs and weights as app/model/<name>) in a scratch folder laid
out as the repository (bundle/ with weights, .venv-monailabel), then step 3's `monailabel start_server` (offline:
local zoo source, no SAM2) with its --studies and --port replaced by a folder of synthetic NIfTI volumes and a free
port, and talks to the server only through its REST API:
  GET /info/ -> our model and label names; POST /infer -> a label volume on the input's grid that agrees with our own
  inference.yaml; POST /train -> our train.yaml runs and writes a new models/model.pt that the next /infer uses;
  bad requests -> HTTP errors while the server keeps serving.

Not collected by `make test` (setup.cfg: norecursedirs); run with `make test-monailabel` (pytest -s: the server's
log and every REST call are printed).

The bundle: MONAILABEL_BUNDLE_ZIP, else the newest dist/*.zip (`make bundle`), else the bundle/ folder with weights
from a short run on the embedded synthetic data (cached in $MONAILABEL_TEST_CACHE, default .venv-monailabel/test-cache,
keyed by the bundle's configs and scripts, so a second run skips it).
"""

import glob
import hashlib
import io
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import zipfile

import monailabel  # noqa: F401  (only in .venv-monailabel: `make test-monailabel`; missing there is a failure)
import nibabel as nib
import numpy as np
import pytest
import requests
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUNDLE = os.path.join(ROOT, "bundle")
MODEL_NAME = "cardiac_mri_contrastive_segmentation"  # the bundle's folder name = the model name the server reports
CACHE = os.environ.get("MONAILABEL_TEST_CACHE", os.path.join(ROOT, ".venv-monailabel", "test-cache"))
START_TIMEOUT = 600  # seconds for the server to answer GET /info/ (imports torch, MONAI, builds the app)
TRAIN_TIMEOUT = 900  # seconds for the training task started through /train
# Parity with our own inference.yaml. Both run the same pre-processing, network, SliceInferer and Invertd in
# float32 on the CPU; the server wraps our LoadImaged in its own loader and adds its own Restored (a nearest resize,
# a no-op when the prediction is already on the input's grid) and writer. Measured with monailabel 0.8.5: every voxel
# equal. The tolerance leaves room for another release's loader or resampler: a voxel may then flip only where two
# classes' probabilities tie within float rounding after the trilinear resampling back to the native grid, so we ask
# for >= 99.5% equal voxels and Dice >= 0.98 for every class present.
MIN_EQUAL_FRACTION = 0.995
MIN_CLASS_DICE = 0.98


def log(msg):
    print(f"[test-monailabel {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------- the bundle and its weights
def bundle_key() -> str:
    """Hash of the bundle's configs and scripts: cached short-run weights are reused only for the same code."""
    h = hashlib.sha256()
    code_files = glob.glob(os.path.join(BUNDLE, "configs", "*")) + glob.glob(os.path.join(BUNDLE, "scripts", "*.py"))
    for path in sorted(code_files):
        h.update(os.path.relpath(path, BUNDLE).encode())
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


def monai_bundle(*args, cwd, pythonpath=None, timeout=1800):
    """`python -m monai.bundle <args>`; fails the test with the output's tail if it fails."""
    env = {**os.environ}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    log("python -m monai.bundle " + " ".join(args))
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "monai.bundle", *args], cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, f"monai.bundle {' '.join(args)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    log(f"  done in {time.time() - t0:.0f} s")
    return r.stdout + r.stderr


def short_run(work: str):
    """Synthetic data (6 patients), pre-training (global then local, 4 steps each) and fine-tuning (2 x 20 steps)
    with the default network at the default image_size 64: weights that give a non-trivial label map, in minutes."""
    cfg = os.path.join(BUNDLE, "configs")
    both = lambda *names: str([os.path.join(cfg, n) for n in names])  # noqa: E731
    paths = ["--dataset_dir", f"{work}/data", "--model_dir", f"{work}/models", "--output_dir", f"{work}/eval",
             "--num_workers", "0", "--cache_workers", "0"]
    monai_bundle("run", "prepare_synthetic", "--config_file", both("train.yaml", "prepare.yaml"), *paths,
                 "--synthetic#num_patients", "6", "--synthetic#split",
                 "{num_validation: 1, num_test: 1, subset_sizes: [1,2], num_subsets: [1,1]}", cwd=work)
    monai_bundle("run", "pretrain", "--config_file", both("train.yaml", "pretrain.yaml"), *paths,
                 "--global#max_iterations", "4", "--local#max_iterations", "4", "--pretrain_epoch_length", "2",
                 "--global#volumes_per_batch", "2", "--local#volumes_per_batch", "2", cwd=work)
    monai_bundle("run", "--config_file", both("train.yaml"), *paths, "--max_epochs", "2",
                 "--iterations_per_epoch", "20", "--batch_size", "10", cwd=work)


@pytest.fixture(scope="module")
def synthetic():
    """(folder, datalist): synthetic volumes and short-run weights (models/), cached by bundle_key()."""
    work = os.path.join(CACHE, bundle_key())
    done = os.path.join(work, "DONE")
    if os.path.exists(done):
        log(f"short-run weights and synthetic data from the cache: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
        os.makedirs(work)
        log(f"short run on the synthetic data (cached in {work})")
        short_run(work)
        open(done, "w").close()
    with open(os.path.join(work, "data", "datalist.json")) as f:
        datalist = json.load(f)
    return work, datalist


def bundle_archive():
    zips = [os.environ["MONAILABEL_BUNDLE_ZIP"]] if os.environ.get("MONAILABEL_BUNDLE_ZIP") else sorted(
        glob.glob(os.path.join(ROOT, "dist", "*.zip")), key=os.path.getmtime)
    return zips[-1] if zips else None


def lay_out_bundle(target: str, synthetic_work: str):
    """The bundle with its weights at ``target`` (the scratch repository's bundle/, which docs/monailabel.md's step 2
    copies from): from `make bundle`'s archive if there is one, else bundle/ (code, configs, docs) + the short run's
    models/ (model.pt, and pretrained_local.pt, which train.yaml initialises from)."""
    archive = bundle_archive()
    if archive:
        log(f"bundle from the archive {archive}")
        unpacked = target + ".unzip"
        with zipfile.ZipFile(archive) as z:
            z.extractall(unpacked)
        tops = [d for d in glob.glob(os.path.join(unpacked, "*", "configs", "metadata.json"))]
        src = os.path.dirname(os.path.dirname(tops[0])) if tops else unpacked
        shutil.move(src, target)
        shutil.rmtree(unpacked, ignore_errors=True)
        fetch_weights_beside(archive, target)
        assert os.path.isfile(os.path.join(target, "models", "model.pt")), f"{archive} lists no models/model.pt"
        if not os.path.isfile(os.path.join(target, "models", "pretrained_local.pt")):
            log(f"  WARNING: {archive} holds no models/pretrained_local.pt: train.yaml (use_pretrained: true) "
                "initialises from it, so /train will fail")
    else:
        log(f"bundle from {BUNDLE} with the short run's weights")
        shutil.copytree(BUNDLE, target, ignore=shutil.ignore_patterns("data", "eval", "runs", "models", "__pycache__"))
        shutil.copytree(os.path.join(synthetic_work, "models"), os.path.join(target, "models"))
    log(f"  {target}: " + ", ".join(sorted(os.listdir(target))) + "; models: "
        + ", ".join(sorted(os.listdir(os.path.join(target, "models")))))


def fetch_weights_beside(archive: str, bundle: str) -> None:
    """The weights of a `make bundle` release lie beside its archive (dist/), listed with their sha256 in the bundle's
    large_files.yml: copy each into <bundle>/<path> and check its hash, as `download_large_files` does after a
    download (offline here: the URLs of a local pack are a placeholder)."""
    with open(os.path.join(bundle, "large_files.yml")) as f:
        entries = yaml.safe_load(f)["large_files"]
    for entry in entries:
        source = os.path.join(os.path.dirname(archive), os.path.basename(entry["path"]))
        target = os.path.join(bundle, entry["path"])
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copyfile(source, target)
        with open(target, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        assert digest == entry["hash_val"], f"{source}: sha256 {digest} is not large_files.yml's {entry['hash_val']}"
        log(f"  {entry['path']} from {source}: sha256 checked")


def documented_steps() -> tuple[list[str], list[str]]:
    """docs/monailabel.md's "Three commands": the shell lines of step 2 (lay out, run from the repository root) and
    the tokens of step 3 (start the server), continuation lines joined, comments dropped."""
    with open(os.path.join(ROOT, "docs", "monailabel.md")) as f:
        block = f.read().split("## Three commands", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    steps, current = {}, None
    for line in block.replace("\\\n", " ").splitlines():
        number = re.match(r"#\s*(\d)\.", line.strip())
        if number:
            current = steps.setdefault(int(number.group(1)), [])
        elif line.strip() and not line.strip().startswith("#") and current is not None:
            current.append(line.strip())
    assert steps.get(2) and len(steps.get(3, [])) == 1, f"docs/monailabel.md: steps 2 and 3 not found in {block!r}"
    return steps[2], shlex.split(steps[3][0])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- the server
class Server:
    def __init__(self, root: str, synthetic_work: str, datalist: dict):
        self.root = root
        self.data_dir = os.path.join(synthetic_work, "data")  # relative paths in the datalist are relative to it
        self.app = os.path.join(root, "app")
        self.bundle = os.path.join(self.app, "model", MODEL_NAME)
        # the repository as the docs see it: bundle/ with its weights, and MONAI Label's venv
        lay_out_bundle(os.path.join(root, "bundle"), synthetic_work)
        os.symlink(sys.prefix, os.path.join(root, ".venv-monailabel"))
        layout, self.command = documented_steps()
        for line in layout:
            log(f"docs/monailabel.md step 2: {line}")
            done = subprocess.run(["bash", "-c", line], cwd=root, capture_output=True, text=True)
            assert done.returncode == 0, f"docs/monailabel.md step 2 failed: {line}\n{done.stderr[-2000:]}"
        assert os.path.isfile(os.path.join(self.bundle, "models", "model.pt")), "step 2 laid out no model.pt"
        log(f"  {self.bundle}: " + ", ".join(sorted(os.listdir(self.bundle))) + "; models: "
            + ", ".join(sorted(os.listdir(os.path.join(self.bundle, "models")))))
        self.studies = os.path.join(root, "studies")
        self.labelled, self.unlabelled = self._studies(datalist)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_file = os.path.join(root, "server.log")
        self.proc = None

    def _studies(self, datalist):
        """3 labelled studies (the 2-volume training subset + the validation volume: labels in labels/final/, what
        /train trains on) and 1 unlabelled one (the test volume: what /infer segments)."""
        os.makedirs(os.path.join(self.studies, "labels", "final"))
        labelled = datalist["labelled_2_0"] + datalist["validation"]
        unlabelled = datalist["test"][:1]
        ids = []
        for item in labelled + unlabelled:
            image = os.path.join(self.data_dir, item["image"])  # an absolute path stays as it is
            image_id = os.path.basename(image).replace(".nii.gz", "")
            shutil.copy(image, os.path.join(self.studies, image_id + ".nii.gz"))
            if item in labelled:
                final_label = os.path.join(self.studies, "labels", "final", image_id + ".nii.gz")
                shutil.copy(os.path.join(self.data_dir, item["label"]), final_label)
            ids.append(image_id)
        log(f"studies folder {self.studies}: labelled {ids[:len(labelled)]}, unlabelled {ids[len(labelled):]}")
        return ids[:len(labelled)], ids[len(labelled):]

    def start(self):
        # step 3 of docs/monailabel.md as written, but for the studies folder and the port
        cmd = list(self.command)
        assert cmd[:2] == ["monailabel", "start_server"] and MODEL_NAME in cmd, cmd
        for option, value in (("--studies", self.studies), ("--port", str(self.port))):
            cmd[cmd.index(option) + 1] = value
        cmd[0] = os.path.join(os.path.dirname(sys.executable), "monailabel")
        # bin/monailabel is a shell script that runs `python -m monailabel.main` with the first python on PATH
        bindir = os.path.dirname(sys.executable)
        env = {**os.environ, "MONAILABEL_PYEXE": sys.executable, "PATH": bindir + os.pathsep + os.environ["PATH"],
               "MONAI_LABEL_TRACKING_ENABLED": "false", "HF_HUB_OFFLINE": "1"}
        log("starting: " + " ".join(cmd))
        self.t0 = time.time()
        self._out = open(self.log_file, "w")
        # its own process group (session): the server, its training subprocess and their data loader workers are all
        # killed together in stop()
        self.proc = subprocess.Popen(cmd, cwd=self.root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True)
        threading.Thread(target=self._pump, daemon=True).start()
        deadline = time.time() + START_TIMEOUT
        while time.time() < deadline:
            assert self.proc.poll() is None, f"the server exited with {self.proc.returncode}; see {self.log_file}"
            try:
                if requests.get(self.url + "/info/", timeout=5).status_code == 200:
                    log(f"server up at {self.url} after {time.time() - self.t0:.0f} s")
                    return
            except requests.ConnectionError:
                pass
            time.sleep(2)
        raise TimeoutError(f"no answer from {self.url}/info/ within {START_TIMEOUT} s")

    def _pump(self):
        for line in self.proc.stdout:
            self._out.write(line)
            self._out.flush()
            print("[server] " + line.rstrip(), flush=True)

    def log_text(self) -> str:
        with open(self.log_file) as f:
            return f.read()

    def group_left(self) -> list[int]:
        """Processes still in the server's process group."""
        left = []
        for stat in glob.glob("/proc/[0-9]*/stat"):
            try:
                with open(stat) as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == self.proc.pid and fields[0] != "Z":
                left.append(int(stat.split("/")[2]))
        return left

    def stop(self):
        if self.proc is None:
            return
        if self.proc.poll() is None:
            log(f"stopping the server (process group {self.proc.pid})")
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        try:  # anything left in the group (a training subprocess, loader workers) goes too
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        time.sleep(1)
        left = self.group_left()
        log(f"server stopped (exit code {self.proc.returncode}); processes left in its group: {left or 'none'}")
        assert not left, f"processes outlived the server: {left}"

    # ---------------------------------------------------------------- REST
    def call(self, method, path, **kwargs):
        kwargs.setdefault("timeout", 600)
        t0 = time.time()
        r = requests.request(method, self.url + path, **kwargs)
        body = r.text[:300] if "json" in r.headers.get("content-type", "") or r.status_code >= 400 else \
            f"<{r.headers.get('content-type')} {len(r.content)} bytes>"
        log(f"{method} {path} -> HTTP {r.status_code} in {time.time() - t0:.1f} s: {body}")
        return r

    def infer(self, image_id, dest):
        r = self.call("POST", f"/infer/{MODEL_NAME}?image={image_id}&output=image")
        assert r.status_code == 200, r.text
        with open(dest, "wb") as f:
            f.write(r.content)
        return dest


@pytest.fixture(scope="module")
def server(tmp_path_factory, synthetic):
    work, datalist = synthetic
    root = str(tmp_path_factory.mktemp("monailabel"))
    srv = Server(root, work, datalist)
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()


# ---------------------------------------------------------------- our own inference.yaml, and the comparison
def our_inference(srv, image_id, out_dir):
    """Our inference.yaml on the study volume, with the weights the server has now (the laid-out bundle's)."""
    cfg = os.path.join(srv.bundle, "configs", "inference.yaml")
    monai_bundle("run", "--config_file", cfg, "--input_glob", os.path.join(srv.studies, image_id + ".nii.gz"),
                 "--checkpoint", os.path.join(srv.bundle, "models", "model.pt"), "--output_dir", out_dir,
                 cwd=srv.root, pythonpath=srv.bundle)
    return os.path.join(out_dir, image_id + "_seg.nii.gz")


def label_names():
    with open(os.path.join(BUNDLE, "configs", "metadata.json")) as f:
        channels = json.load(f)["network_data_format"]["outputs"]["pred"]["channel_def"]
    return {int(k): v for k, v in channels.items()}


def agreement(a, b, classes):
    a, b = np.asarray(a).astype(int), np.asarray(b).astype(int)
    equal = float((a == b).mean())
    dice = {}
    for c in classes:
        sa, sb = a == c, b == c
        if sa.sum() + sb.sum():
            dice[c] = float(2 * (sa & sb).sum() / (sa.sum() + sb.sum()))
    return equal, dice


def check_label_volume(path, image_path):
    """The server's label map: the input's shape and affine, values only in our label set."""
    seg, img = nib.load(path), nib.load(image_path)
    data = np.asarray(seg.dataobj)
    log(f"  label volume {os.path.basename(path)}: shape {data.shape} dtype {data.dtype}, values "
        f"{dict(zip(*[v.tolist() for v in np.unique(data, return_counts=True)]))}; input shape {img.shape}")
    assert data.shape == img.shape
    np.testing.assert_allclose(seg.affine, img.affine, atol=1e-4)
    assert set(np.unique(data).astype(int).tolist()) <= set(label_names())
    return data


def compare_with_ours(srv, server_seg, tag, tmp):
    ours_path = our_inference(srv, srv.unlabelled[0], os.path.join(tmp, f"ours_{tag}"))
    ours = np.asarray(nib.load(ours_path).dataobj)
    equal, dice = agreement(server_seg, ours, sorted(label_names()))
    names = label_names()
    log(f"PARITY ({tag}) server /infer vs our inference.yaml on {srv.unlabelled[0]}: {equal:.6f} of "
        f"{ours.size} voxels equal; Dice per class: " + ", ".join(f"{names[c]} {d:.4f}" for c, d in dice.items()))
    assert equal >= MIN_EQUAL_FRACTION
    assert all(d >= MIN_CLASS_DICE for d in dice.values()), dice
    return ours


# ---------------------------------------------------------------- the checks, in order on one server
def test_info_lists_our_model(server):
    r = server.call("GET", "/info/")
    assert r.status_code == 200
    info = r.json()
    model = info["models"][MODEL_NAME]
    log(f"  /info/ models: {list(info['models'])}; ours: type {model.get('type')}, labels {model.get('labels')}, "
        f"dimension {model.get('dimension')}; trainers: {list(info.get('trainers', {}))}")
    assert model["type"] == "segmentation"
    expected = {v.lower(): k for k, v in label_names().items() if v.lower() != "background"}
    assert model["labels"] == expected
    assert MODEL_NAME in info.get("trainers", {}), "the server found no train.yaml for our bundle"


def test_infer_matches_our_inference(server, tmp_path):
    image_id = server.unlabelled[0]
    seg_path = server.infer(image_id, str(tmp_path / f"{image_id}_server.nii.gz"))
    seg = check_label_volume(seg_path, os.path.join(server.studies, image_id + ".nii.gz"))
    assert len(np.unique(seg)) > 1, "the short-run model labels nothing: parity would be trivial"
    compare_with_ours(server, seg, "before /train", str(tmp_path))
    server.before_train = seg


def test_bad_requests_get_errors_and_the_server_keeps_serving(server, tmp_path):
    r = server.call("POST", f"/infer/{MODEL_NAME}?image=no_such_image&output=image")
    assert r.status_code >= 400
    r = server.call("POST", f"/infer/{MODEL_NAME}?output=image",
                    files={"file": ("notes.txt", io.BytesIO(b"this is not a NIfTI volume\n" * 20), "text/plain")})
    assert r.status_code >= 400
    r = server.call("POST", f"/infer/no_such_model?image={server.unlabelled[0]}&output=image")
    assert r.status_code >= 400
    assert server.proc.poll() is None
    assert server.call("GET", "/info/").status_code == 200
    seg = server.infer(server.unlabelled[0], str(tmp_path / "again.nii.gz"))
    np.testing.assert_array_equal(np.asarray(nib.load(seg).dataobj), server.before_train)


def test_train_through_the_server_writes_the_model_the_next_infer_uses(server, tmp_path):
    model_pt = os.path.join(server.bundle, "models", "model.pt")
    before = os.stat(model_pt).st_mtime_ns
    params = {"device": "cpu", "max_epochs": 1, "val_split": 0.34, "multi_gpu": False, "pretrained": True,
              "tracking": "None", "model_filename": "model.pt"}
    r = server.call("POST", f"/train/{MODEL_NAME}", json=params)
    assert r.status_code == 200, r.text
    deadline, status = time.time() + TRAIN_TIMEOUT, None
    while time.time() < deadline:
        time.sleep(5)
        status = requests.get(server.url + "/train/", timeout=30).json()
        if status.get("status") in ("DONE", "ERROR"):
            break
    log(f"GET /train/ -> status {status.get('status')}, started {status.get('start_ts')}, ended {status.get('end_ts')}")
    assert status.get("status") == "DONE", json.dumps(status, indent=1)[-3000:]
    # the training subprocess ran our train.yaml: pre-trained initialisation, MONAI Label's loader of the served
    # model.pt, our progress bar and our validation metric
    text = server.log_text()
    for evidence in ("Initialised", "pretrained_local.pt", "Restored all variables from " + model_pt, "fine-tune:",
                     "val_mean_dice", "Total Records for Training: 2", "Total Records for Validation: 1"):
        assert evidence in text, f"not in the server's log: {evidence!r}"
    best = [line for line in text.splitlines() if "Key metric: val_mean_dice best value" in line]
    log("  training log: " + (best[-1].split("INFO - ")[-1] if best else "no best metric line"))
    after = os.stat(model_pt).st_mtime_ns
    log(f"  models/model.pt rewritten: {after != before} (mtime {before} -> {after})")
    assert after != before
    seg_path = server.infer(server.unlabelled[0], str(tmp_path / "after_train.nii.gz"))
    seg = check_label_volume(seg_path, os.path.join(server.studies, server.unlabelled[0] + ".nii.gz"))
    changed = float((seg != server.before_train).mean())
    log(f"  /infer after /train: {changed:.4f} of the voxels changed label")
    assert changed > 0, "the /infer after training gives the old prediction: the new model.pt was not used"
    compare_with_ours(server, seg, "after /train", str(tmp_path))


# ---------------------------------------------------------------- the cold-start strategy (its own server)
# The lines docs/monailabel.md tells a user to add to the sample app's main.py (init_strategies), before its log line:
# read from the doc, so the test runs what the doc says.
def documented_coverage_lines() -> str:
    with open(os.path.join(ROOT, "docs", "monailabel.md")) as f:
        blocks = re.findall(r"```text\n(.*?)```", f.read(), flags=re.S)
    found = [b for b in blocks if "CoverageStrategy(bundle)" in b]
    assert len(found) == 1, "docs/monailabel.md: the block of lines that declare the coverage strategy not found"
    return found[0]


STRATEGIES_LOG_LINE = '        logger.info(f"Active Learning Strategies:: {list(strategies.keys())}")'


def add_coverage_strategy(main_py: str) -> None:
    with open(main_py) as f:
        text = f.read()
    assert STRATEGIES_LOG_LINE in text, f"{main_py}: init_strategies has changed; docs/monailabel.md needs updating"
    with open(main_py, "w") as f:
        f.write(text.replace(STRATEGIES_LOG_LINE, documented_coverage_lines() + STRATEGIES_LOG_LINE))


def test_activelearning_coverage_answers_unlabelled_images_around_the_labelled_ones(synthetic, tmp_path_factory):
    """A server of its own (its own studies folder, so the checks above see theirs unchanged), its app's main.py with
    the documented lines: 2 more pool volumes are uploaded unlabelled (PUT /datastore/image), then
    /activelearning/coverage answers an unlabelled image; once that image has a final label (PUT /datastore/label),
    another unlabelled one."""
    work, datalist = synthetic
    srv = Server(str(tmp_path_factory.mktemp("monailabel_coverage")), work, datalist)
    add_coverage_strategy(os.path.join(srv.app, "main.py"))
    labels = {}
    for item in datalist["labelled_all"] + datalist["test"]:
        image_id = os.path.basename(item["image"]).replace(".nii.gz", "")
        labels[image_id] = (os.path.join(srv.data_dir, item["image"]), os.path.join(srv.data_dir, item["label"]))
    try:
        srv.start()
        info = srv.call("GET", "/info/").json()
        assert "coverage" in info["strategies"], info["strategies"]
        extra = [i for i in labels if i not in srv.labelled + srv.unlabelled]
        assert len(extra) >= 1
        for image_id in extra:
            with open(labels[image_id][0], "rb") as f:
                r = srv.call("PUT", f"/datastore/image?image={image_id}", files={"file": (image_id + ".nii.gz", f)})
            assert r.status_code == 200, r.text
        unlabelled = set(srv.unlabelled) | set(extra)
        r = srv.call("POST", "/activelearning/coverage", json={})
        assert r.status_code == 200, r.text
        first = r.json()["id"]
        log(f"  /activelearning/coverage: {first} (unlabelled: {sorted(unlabelled)}; labelled: {srv.labelled})")
        assert first in unlabelled
        with open(labels[first][1], "rb") as f:
            r = srv.call("PUT", f"/datastore/label?image={first}&tag=final",
                         files={"label": (first + ".nii.gz", f)})
        assert r.status_code == 200, r.text
        r = srv.call("POST", "/activelearning/coverage", json={})
        assert r.status_code == 200, r.text
        second = r.json()["id"]
        log(f"  /activelearning/coverage after labelling {first}: {second}")
        assert second in unlabelled - {first}
    finally:
        srv.stop()


# ---------------------------------------------------------------- bad inputs through the server (issue 25)
def _wait_for_training(server) -> dict:
    deadline, status = time.time() + TRAIN_TIMEOUT, {}
    while time.time() < deadline:
        time.sleep(5)
        status = requests.get(server.url + "/train/", timeout=30).json()
        if status.get("status") in ("DONE", "ERROR"):
            break
    return status


def _post_volume(server, data, affine, name):
    """POST a volume as an uploaded file to /infer (as a viewer does for a volume not in the datastore)."""
    path = os.path.join(server.root, name)
    nib.save(nib.Nifti1Image(data, affine), path)
    with open(path, "rb") as f:
        return server.call("POST", f"/infer/{MODEL_NAME}?output=image",
                           files={"file": (name, f, "application/octet-stream")})


def _refusal(r) -> str:
    """The message of a refused request: HTTP 422 with the bundle's one-line message as the JSON detail."""
    assert r.status_code == 422, f"HTTP {r.status_code}: {r.text[:500]}"
    assert r.headers.get("content-type", "").startswith("application/json"), r.headers
    return r.json()["detail"]


def test_a_nan_volume_sent_to_infer_is_refused_naming_the_problem(server):
    """One NaN voxel used to give a 200 with an all-background map, then a bare HTTP 500 ("Internal Server Error")
    with the message only in the server's log; now the answer is a 422 whose detail is the check's one line."""
    source = nib.load(os.path.join(server.studies, server.unlabelled[0] + ".nii.gz"))
    data = np.asarray(source.dataobj, dtype=np.float32).copy()
    data[0, 0, 0] = np.nan
    detail = _refusal(_post_volume(server, data, source.affine, "nan_volume.nii.gz"))
    assert "1 NaN/Inf intensities" in detail and ".nii.gz" in detail, detail
    assert server.call("GET", "/info/").status_code == 200


def test_a_4d_volume_sent_to_infer_is_refused_naming_the_problem(server):
    """The bundle's contract has no channel (3D inputs): a 4D upload (two channels) is refused by name, not
    segmented channel by channel or answered with a bare 500."""
    source = nib.load(os.path.join(server.studies, server.unlabelled[0] + ".nii.gz"))
    data = np.asarray(source.dataobj, dtype=np.float32)
    detail = _refusal(_post_volume(server, np.stack([data, data], axis=-1), source.affine, "two_channels.nii.gz"))
    log(f"  4D upload refused: {detail}")
    assert "spatial dimensions" in detail or "channel" in detail, detail
    assert server.call("GET", "/info/").status_code == 200


def test_a_label_beyond_the_classes_stops_train_with_the_file_named(server, tmp_path):
    """A label value >= the class count used to end /train with a raw "index out of bounds"; the pre-processing now
    names the file and the values. The study's own label is put back afterwards."""
    image_id = server.labelled[0]
    original = os.path.join(server.studies, "labels", "final", image_id + ".nii.gz")
    good = str(tmp_path / "good_label.nii.gz")
    shutil.copy(original, good)
    label = nib.load(good)
    data = np.asarray(label.dataobj).copy()
    data[0, 0, 0] = 7
    bad = str(tmp_path / "bad_label.nii.gz")
    nib.save(nib.Nifti1Image(data, label.affine, label.header), bad)

    def put_label(path):
        with open(path, "rb") as f:
            r = server.call("PUT", f"/datastore/label?image={image_id}&tag=final",
                            files={"label": (image_id + ".nii.gz", f, "application/octet-stream")})
        assert r.status_code == 200, r.text

    put_label(bad)
    try:
        params = {"device": "cpu", "max_epochs": 1, "val_split": 0.34, "multi_gpu": False, "pretrained": True,
                  "tracking": "None", "model_filename": "model.pt"}
        assert server.call("POST", f"/train/{MODEL_NAME}", json=params).status_code == 200
        status = _wait_for_training(server)
        log(f"GET /train/ -> status {status.get('status')}")
        assert status.get("status") == "ERROR", json.dumps(status, indent=1)[-3000:]
        # the task's answer (GET /train/: its last output lines) names the file and the values, as the log does
        assert "unexpected label values [7] (expected 0..3)" in json.dumps(status), json.dumps(status)[-3000:]
        assert "unexpected label values [7] (expected 0..3)" in server.log_text()
        assert "index out of bounds" not in server.log_text()
    finally:
        put_label(good)
