"""`make gpu-check`: the first thing to run on a GPU machine (no GPU has run this bundle yet).

On the embedded synthetic data, at the paper's 192 px by default: pre-train (global, then local) and fine-tune a few
hundred iterations each with AMP, through the bundle's own configs (train.yaml, pretrain.yaml, inference.yaml);
report each stage's images per second (after a warm-up) and peak GPU memory; then segment the test volumes with the
fine-tuned model on the GPU and on the CPU and check that the label maps agree on at least 99.9 % of the voxels.
Exits 0 only if every check passes: each stage ran all its iterations with a finite loss, wrote its checkpoint, and
the two devices agree. ``--device cpu --tiny`` runs the same path in seconds (a tiny network, 32 px): `make test`
runs it, so the check cannot rot; both "devices" are then the CPU, so the agreement check is trivially met.

    PYTHONPATH=bundle python -m study.gpu_check [--device cuda] [--iterations 300] [--image_size 192]
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import shutil
import sys
import tempfile
import time

import nibabel as nib
import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.bundle import run as bundle_run
from monai.utils import set_determinism

from study.configs import config_files, read_configs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIN_AGREEMENT = 0.999   # fraction of voxels whose label the GPU and the CPU must agree on
WARMUP = 0.2            # fraction of each stage's first iterations left out of its images/s (start-up, cuDNN tuning)
PAPER_SPACING = {192: 1.36719}   # in-plane mm for the paper's slice size (192 px x 1.367 mm = 262 mm field of view)
# a tiny network and batch for --tiny (the CPU smoke run of `make test`)
TINY = {"encoder_channels": [4, 8, 8, 8, 8, 8], "decoder_channels": [8, 8, 8, 8, 4], "global#hidden_features": 16,
        "global#embedding_features": 8, "global#volumes_per_batch": 2, "local#volumes_per_batch": 2,
        "batch_size": 4}


class StageTimer:
    """Times a trainer's iterations and checks its loss: attach before ``run``; ``images_per_second`` leaves out the
    first ``WARMUP`` of the iterations. On CUDA it synchronises the device at each iteration's end."""

    def __init__(self, trainer, images_per_iteration: int, device: torch.device):
        from ignite.engine import Events

        self.images, self.device, self.times, self.finite = images_per_iteration, device, [], True
        trainer.add_event_handler(Events.ITERATION_COMPLETED, self._tick)

    def _tick(self, engine) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.times.append(time.perf_counter())
        output = engine.state.output   # a dict, or a list of per-sample dicts when the trainer decollates
        output = output[0] if isinstance(output, (list, tuple)) and output else output
        loss = output.get("loss") if isinstance(output, dict) else output
        self.finite &= bool(loss is not None and math.isfinite(float(loss)))

    def images_per_second(self) -> float:
        if len(self.times) < 2:
            return float("nan")
        first = min(int(len(self.times) * WARMUP), len(self.times) - 2)
        return self.images * (len(self.times) - 1 - first) / (self.times[-1] - self.times[first])


def run_stage(name: str, parser: ConfigParser, trainer_id: str, images: int, iterations: int, checkpoint: str,
              device: torch.device) -> dict:
    """Run the trainer ``trainer_id`` of ``parser``; returns the stage's row of the report, with its checks."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trainer = parser.get_parsed_content(trainer_id)
    timer = StageTimer(trainer, images, device)
    start = time.perf_counter()
    trainer.run()
    row = {"stage": name, "iterations": len(timer.times), "images/iteration": images,
           "images/s": timer.images_per_second(), "seconds": time.perf_counter() - start,
           "peak GPU MiB": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None}
    row["problems"] = [text for failed, text in (
        (len(timer.times) < iterations, f"ran {len(timer.times)} of {iterations} iterations"),
        (not timer.finite, "a non-finite loss"),
        (not os.path.isfile(checkpoint), f"{checkpoint} not written")) if failed]
    return row


def label_maps(folder: str) -> dict[str, np.ndarray]:
    return {os.path.basename(p): np.asarray(nib.load(p).dataobj) for p in sorted(glob.glob(f"{folder}/*_seg.nii.gz"))}


def check(device: torch.device, iterations: int, image_size: int, amp: bool, tiny: bool, work: str) -> list[dict]:
    """Every stage at ``image_size`` for ``iterations`` iterations on ``device``; the report's rows."""
    paths = {"dataset_dir": f"{work}/data", "model_dir": f"{work}/models", "output_dir": f"{work}/eval",
             "num_workers": 0, "cache_workers": 0}
    network = {k: v for k, v in TINY.items() if k.endswith("channels")} if tiny else {}
    spacing = PAPER_SPACING.get(image_size, 192.0 / image_size)   # else the default 192 mm field of view
    bundle_run("prepare_synthetic", config_file=config_files("train.yaml", "prepare.yaml"),
               **paths, image_size=image_size, spacing=spacing, **{
                   "synthetic#num_patients": 8, "synthetic#split#num_validation": 1, "synthetic#split#num_test": 2,
                   "synthetic#split#subset_sizes": [2], "synthetic#split#num_subsets": [1]})
    common = {**paths, **(TINY if tiny else {}), "device": device, "amp": amp}
    epoch = max(1, iterations // 5)
    set_determinism(seed=0)
    pretrain = read_configs(["train.yaml", "pretrain.yaml"], {
        **common, "pretrain_epoch_length": epoch, "global#max_iterations": iterations,
        "local#max_iterations": iterations, "global#stop_on_plateau": False, "local#stop_on_plateau": False,
        "channels_last": device.type == "cuda"})
    views, partitions = pretrain["num_views"], pretrain["num_partitions"]
    rows = [run_stage("pre-train global", pretrain, "global#trainer",
                      pretrain["global"]["volumes_per_batch"] * partitions * views, iterations,
                      f"{work}/models/pretrained_global.pt", device),
            run_stage("pre-train local", pretrain, "local#trainer",
                      pretrain["local"]["volumes_per_batch"] * partitions * views, iterations,
                      f"{work}/models/pretrained_local.pt", device)]
    common = {k: v for k, v in common.items() if not k.startswith(("global#", "local#"))}   # train.yaml has neither
    finetune = read_configs(["train.yaml"], {**common, "max_epochs": 5, "iterations_per_epoch": epoch,
                                             "num_labelled": 2, "subset": 0})
    rows.append(run_stage("fine-tune", finetune, "train#trainer", finetune["batch_size"], 5 * epoch,
                          f"{work}/models/model.pt", device))
    # the fine-tuned model on the test volumes, on the device and on the CPU
    with open(f"{work}/data/datalist.json") as f:
        test_images = [os.path.join(f"{work}/data", case["image"]) for case in json.load(f)["test"]]
    os.makedirs(f"{work}/test_images", exist_ok=True)
    for image in test_images:
        shutil.copy(image, f"{work}/test_images")
    for name, on in (("device", device), ("cpu", torch.device("cpu"))):
        bundle_run("run", config_file=config_files("inference.yaml")[0],
                   input_glob=f"{work}/test_images/*.nii.gz", checkpoint=f"{work}/models/model.pt",
                   output_dir=f"{work}/seg_{name}", device=on, **{f"network_def#{k}": v for k, v in network.items()})
    ours, reference = label_maps(f"{work}/seg_device"), label_maps(f"{work}/seg_cpu")
    equal = sum(int((ours[k] == reference[k]).sum()) for k in reference if k in ours)
    total = sum(v.size for v in reference.values())
    agreement = equal / total if total and ours.keys() == reference.keys() else 0.0
    rows.append({"stage": f"inference {device.type} vs cpu", "iterations": len(reference), "images/iteration": None,
                 "images/s": None, "seconds": None, "peak GPU MiB": None, "agreement": agreement,
                 "problems": [] if agreement >= MIN_AGREEMENT else
                 [f"{agreement:.5f} of {total} voxels agree (< {MIN_AGREEMENT}) on {len(reference)} volumes"]})
    return rows


def report(rows: list[dict]) -> str:
    def cell(value, digits=1):
        return "" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)

    lines = ["| stage | iterations | images/iteration | images/s | seconds | peak GPU MiB | check |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        verdict = "; ".join(r["problems"]) or ("ok" if "agreement" not in r else f"ok: {r['agreement']:.5f} agree")
        lines.append(f"| {r['stage']} | {r['iterations']} | {cell(r['images/iteration'])} | {cell(r['images/s'])} | "
                     f"{cell(r['seconds'])} | {cell(r['peak GPU MiB'], 0)} | {verdict} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (the check) or cpu (the smoke run of make test)")
    parser.add_argument("--iterations", type=int, default=300, help="iterations of each pre-training stage")
    parser.add_argument("--image_size", type=int, default=192, help="slice side in px (the paper's: 192)")
    parser.add_argument("--amp", type=lambda s: s.lower() in ("1", "true", "yes"), default=None,
                        help="mixed precision (default: on for cuda, off for cpu)")
    parser.add_argument("--tiny", action="store_true", help="tiny network and batches (the CPU smoke run)")
    parser.add_argument("--work", default=None, help="scratch folder (default: a temporary one, removed)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"ERROR: --device {args.device} but torch {torch.__version__} sees no CUDA GPU (a CPU build of torch, "
              "or no driver): install a CUDA build (README, Setup: TORCH_INDEX)", file=sys.stderr)
        return 1
    amp = device.type == "cuda" if args.amp is None else args.amp
    print(f"gpu-check: {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), torch "
          f"{torch.__version__}, {args.image_size} px, {args.iterations} iterations per pre-training stage, "
          f"AMP {amp}{', tiny network' if args.tiny else ''}", flush=True)
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as scratch:
        rows = check(device, args.iterations, args.image_size, amp, args.tiny, args.work or scratch)
    print(report(rows))
    failed = [f"{r['stage']}: {p}" for r in rows for p in r["problems"]]
    print("gpu-check: " + ("FAILED: " + "; ".join(failed) if failed else "all checks passed"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
