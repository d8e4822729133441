"""`make gpu-check DEVICE=cpu`: the GPU check's whole path (pre-training, fine-tuning, inference on two devices,
the report) as a tiny CPU run, so that the check is ready when a GPU machine is (study/gpu_check.py)."""

import os
import shlex
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

ENV = dict(os.environ, PYTHONPATH="bundle", OMP_NUM_THREADS="1")


def makefile_command(*args) -> list[str]:
    """The study.gpu_check command line `make gpu-check <args>` runs (from `make -n`, which runs nothing)."""
    printed = subprocess.run(["make", "-n", "gpu-check", *args], cwd=ROOT, capture_output=True, text=True, check=True)
    line = next(line for line in printed.stdout.splitlines() if "study.gpu_check" in line)
    tokens = shlex.split(line)
    return [sys.executable, *tokens[tokens.index("-m"):]]


def test_gpu_check_on_cpu_passes_and_reports_every_stage():
    result = subprocess.run(makefile_command("DEVICE=cpu"), cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env=ENV)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for row in ("| pre-train global | 5 |", "| pre-train local | 5 |", "| fine-tune | 5 |", "| inference cpu vs cpu |"):
        assert row in result.stdout, result.stdout[-2000:]
    assert "gpu-check: all checks passed" in result.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: `make gpu-check` itself is the check")
def test_gpu_check_refuses_cuda_without_a_gpu():
    result = subprocess.run(makefile_command(), cwd=ROOT, capture_output=True, text=True, timeout=120, env=ENV)
    assert result.returncode == 1 and "sees no CUDA GPU" in result.stderr, result.stderr[-2000:]
