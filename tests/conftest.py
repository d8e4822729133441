"""What the test files share: the repository's paths, tiny networks and budgets, the one way the tests run the bundle's
commands (``python -m monai.bundle`` in a subprocess, also under torchrun), a small prepared dataset (made once per
session for the modules that only read it: the ``prepared_data`` fixture), and the one NIfTI writer of hand-made
volumes.

The test files import these names (``from conftest import ROOT, run, write_nifti``): pytest puts this folder on
``sys.path`` (``tests`` has no ``__init__.py``) and loads this file once as the module ``conftest``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent   # the repository
BUNDLE = ROOT / "bundle"
CONFIGS = BUNDLE / "configs"

# a tiny U-Net (train.yaml / pretrain.yaml arguments), no loader or cache worker processes
TINY = ["--encoder_channels", "[4,8,8,8,8,8]", "--decoder_channels", "[8,8,8,8,4]", "--num_workers", "0",
        "--cache_workers", "0"]
# the same U-Net as keyword arguments (of ``UNet2D``, or overrides of a parsed config)
TINY_NETWORK = {"encoder_channels": [4, 8, 8, 8, 8, 8], "decoder_channels": [8, 8, 8, 8, 4]}
# the same U-Net for inference.yaml (its network is ``network_def``)
TINY_INFERENCE = ["--network_def#encoder_channels", "[4,8,8,8,8,8]", "--network_def#decoder_channels", "[8,8,8,8,4]"]
# pre-training: 3 epochs of 2 iterations per stage
PRETRAIN = ["--global#max_iterations", "6", "--local#max_iterations", "6", "--pretrain_epoch_length", "2",
            "--global#volumes_per_batch", "2", "--local#volumes_per_batch", "2", "--global#hidden_features", "16",
            "--global#embedding_features", "8"]
# fine-tuning: 4 epochs of 2 iterations, validation after each
FINETUNE = ["--max_epochs", "4", "--iterations_per_epoch", "2", "--batch_size", "4"]


def config(*names) -> str:
    """The ``--config_file`` value for the configs ``names``: bundle/configs/<name>, or the name itself when it is
    an absolute path (a test's own YAML)."""
    return str([str(n) if os.path.isabs(str(n)) else str(CONFIGS / n) for n in names])


def run(cwd, *args, torchrun: int = 0, expect: int | None = 0, timeout: int | None = 300,
        env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m monai.bundle <args>`` in ``cwd`` (under ``torch.distributed.run`` with ``torchrun`` processes),
    with ``env`` added to the environment; asserts the return code when ``expect`` is not None.

    Args:
        cwd: the working folder of the command.
        args: the command line after ``monai.bundle`` (any objects; passed as ``str``).
        torchrun: number of processes; 0 runs one plain process.
        expect: the return code to assert, or None to return whatever happened.
        timeout: seconds before ``subprocess.TimeoutExpired``; None waits for ever.
        env: entries set on top of this process's environment (e.g. ``{"PYTHONPATH": ...}`` replaces it); an entry
            of None removes that variable.

    Returns:
        the ``CompletedProcess`` with ``stdout`` and ``stderr`` as text.
    """
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}",
                "-m", "monai.bundle"] if torchrun else [sys.executable, "-m", "monai.bundle"]
    # one thread whatever the caller's environment: the resume tests compare runs bit for bit, and their numbers
    # (e.g. which epoch validates best) must not depend on how many threads the machine's test run was given
    env = {key: value for key, value in dict(os.environ, OMP_NUM_THREADS="1", **(env or {})).items()
           if value is not None}
    result = subprocess.run([*launcher, *map(str, args)], cwd=cwd, capture_output=True, text=True, env=env,
                            timeout=timeout)
    if expect is not None:
        assert result.returncode == expect, (
            f"monai.bundle {' '.join(map(str, args))} returned {result.returncode}:\n"
            f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
        )
    return result


def prepare(work: Path) -> list[str]:
    """The embedded synthetic data (6 patients: 4 unlabelled pre-training volumes, 2 labelled, 1 validation,
    1 test) in ``work/data``; returns the ``--dataset_dir`` arguments."""
    data = work / "data"
    run(work, "run", "prepare_synthetic", "--config_file", config("train.yaml", "prepare.yaml"), "--dataset_dir",
        data, "--synthetic#num_patients", "6", "--synthetic#split",
        "{num_validation: 1, num_test: 1, subset_sizes: [1,2], num_subsets: [1,1]}", "--cache_workers", "0")
    return ["--dataset_dir", str(data)]


@pytest.fixture(scope="session")
def prepared_data(tmp_path_factory) -> list[str]:
    """``prepare``'s dataset, made once per test session; the ``--dataset_dir`` arguments. For modules that only read
    it (their runs write under their own ``paths``); a module that changes the data prepares its own."""
    return prepare(tmp_path_factory.mktemp("prepared"))


def paths(work: Path, name: str) -> list[str]:
    """``--model_dir`` and ``--output_dir`` of one run, under ``work/name``."""
    return ["--model_dir", str(work / name / "models"), "--output_dir", str(work / name / "eval")]


def last_line(text: str) -> str:
    """The last non-blank line of ``text`` (a command's one-line ``ERROR: ...`` report)."""
    return [line for line in text.splitlines() if line.strip()][-1]


def write_nifti(path, array, affine=None, spacing=None) -> str:
    """Save ``array`` as the NIfTI file ``path`` (its folder made if missing) and return ``str(path)``.

    Args:
        path: the file (``.nii`` or ``.nii.gz``).
        array: the voxels (any array-like; kept in its dtype).
        affine: (4, 4) voxel-to-world matrix (converted to float64); wins over ``spacing``.
        spacing: voxel sizes (one per spatial axis): the affine ``diag([*spacing, 1])``. With neither, the identity.
    """
    if affine is None:
        affine = np.diag([*map(float, spacing), 1.0]) if spacing is not None else np.eye(4)
    os.makedirs(os.path.dirname(os.path.abspath(str(path))), exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array), np.asarray(affine, dtype=np.float64)), str(path))
    return str(path)


def pytest_configure(config):
    """Under pytest-xdist (``make test`` runs ``-n auto``), each of N workers gets cores / N torch threads for the
    tests that compute in-process, so that the workers do not oversubscribe the machine (the bundle commands the
    tests start run with one thread: ``run``)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


RELEASE_FILES = ("model.pt", "pretrained_global.pt", "pretrained_local.pt", "commands.log", "release.json")


@pytest.fixture(scope="session", autouse=True)
def release_untouched():
    """The committed release in bundle/models is never written by a test: its files' sha256 after the session equal
    those before (a test that wrote there fails the session at teardown)."""
    from scripts.files import file_hash

    def hashes():
        return {name: file_hash(str(BUNDLE / "models" / name)) if (BUNDLE / "models" / name).is_file() else None
                for name in RELEASE_FILES}

    before = hashes()
    yield
    changed = [name for name, value in hashes().items() if value != before[name]]
    assert not changed, f"a test wrote the committed release files {changed} in {BUNDLE / 'models'}"
