"""Helpers of the workflow-level tests (checkpoints, resume, multi-process runs, the data contract): a small prepared
dataset, the bundle's commands as subprocesses (also under torchrun), tiny-network arguments."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "bundle" / "configs"
TINY = ["--encoder_channels", "[4,8,8,8,8,8]", "--decoder_channels", "[8,8,8,8,4]", "--num_workers", "0",
        "--cache_workers", "0"]
# pre-training: 3 epochs of 2 iterations per stage
PRETRAIN = ["--global#max_iterations", "6", "--local#max_iterations", "6", "--pretrain_epoch_length", "2",
            "--global#volumes_per_batch", "2", "--local#volumes_per_batch", "2", "--global#hidden_features", "16",
            "--global#embedding_features", "8"]
# fine-tuning: 4 epochs of 2 iterations, validation after each
FINETUNE = ["--max_epochs", "4", "--iterations_per_epoch", "2", "--batch_size", "4"]


def config(*names) -> str:
    return str([str(n) if os.path.isabs(str(n)) else str(CONFIGS / n) for n in names])


def run(cwd, *args, torchrun: int = 0, expect: int | None = 0, timeout: int = 300,
        env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m monai.bundle <args>`` in ``cwd`` (under ``torch.distributed.run`` with ``torchrun`` processes),
    with ``env`` added to the environment; asserts the return code when ``expect`` is not None."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}",
                "-m", "monai.bundle"] if torchrun else [sys.executable, "-m", "monai.bundle"]
    # one thread whatever the caller's environment: the resume tests compare runs bit for bit, and their numbers
    # (e.g. which epoch validates best) must not depend on how many threads the machine's test run was given
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
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
        data, "--synthetic#num_patients", "6", "--synthetic#num_validation", "1", "--synthetic#num_test", "1",
        "--synthetic#subset_sizes", "[1,2]", "--synthetic#num_subsets", "[1,1]", "--cache_workers", "0")
    return ["--dataset_dir", str(data)]


def paths(work: Path, name: str) -> list[str]:
    """``--model_dir`` and ``--output_dir`` of one run, under ``work/name``."""
    return ["--model_dir", str(work / name / "models"), "--output_dir", str(work / name / "eval")]
