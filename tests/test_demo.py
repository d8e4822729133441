"""The guard of `make demo`'s first promise: with the demo's own data and settings, its global stage leaves the
contrastive loss's chance level (a change that stops the demo's pre-training from learning fails here, in minutes,
instead of in a 15-minute demo whose table then reads "did NOT learn").

The demo's settings are the files `docs/scripts/demo.sh` passes: `demo_pretrain.yaml` over train.yaml and
pretrain.yaml, on the embedded synthetic data prepared with the default seed. Only the budget is cut.
"""

from __future__ import annotations

import json
import math

from monai.bundle import ConfigParser

from conftest import CONFIGS, ROOT, config, run

DEMO_PRETRAIN = ROOT / "docs" / "scripts" / "demo_pretrain.yaml"
BUDGET = 300   # global iterations here (the demo runs demo_pretrain.yaml's global#max_iterations)
EPOCH = 50     # iterations per running loss (pretrain_epoch_length)
MARGIN = 0.1   # the best running loss must end at least this fraction below the chance level


def chance_level(settings: dict) -> float:
    """The G^D loss when every embedding is the same: ln(1 + negatives per anchor), the negatives being the views of
    every slice of the other S - 1 partitions in the batch: (S - 1) x M x V. 3.22 = ln 25 for M = S = 4, V = 2."""
    negatives = (settings["num_partitions"] - 1) * settings["global#volumes_per_batch"] * settings["num_views"]
    return math.log(1 + negatives)


def test_demo_global_stage_leaves_its_chance_level(tmp_path):
    data = tmp_path / "data"
    run(tmp_path, "run", "prepare_synthetic", "--config_file", config("train.yaml", "prepare.yaml"),
        "--dataset_dir", data)
    run(tmp_path, "run", "pretrain_global", "--config_file", config("train.yaml", "pretrain.yaml", DEMO_PRETRAIN),
        "--dataset_dir", data, "--model_dir", tmp_path / "models", "--output_dir", tmp_path / "eval",
        "--global#max_iterations", BUDGET, "--pretrain_epoch_length", EPOCH, timeout=900,
        )
    stop = json.loads((tmp_path / "eval" / "pretrain_global_stop.json").read_text())
    merged = ConfigParser()   # the demo's settings: its overlay over the bundle's configs
    merged.read_config([str(CONFIGS / "train.yaml"), str(CONFIGS / "pretrain.yaml"), str(DEMO_PRETRAIN)])
    settings = {key: merged[key] for key in ("num_partitions", "num_views", "global#volumes_per_batch")}
    chance = chance_level(settings)
    losses = [loss for _, loss in stop["history"]]
    assert len(losses) == BUDGET // EPOCH, stop
    assert min(losses) < (1 - MARGIN) * chance, (
        f"the demo's global stage did not leave its chance level {chance:.3f} in {BUDGET} iterations: running "
        f"losses {[round(x, 3) for x in losses]}")


def test_slice_similarity_by_pair_kind():
    """study.slice_similarity: copies within a volume give 1 for same-volume pairs; an image shared by partition
    across volumes gives 1 for same-partition pairs and a perfect partition retrieval."""
    import numpy as np
    import torch

    from study.slice_similarity import slice_similarity

    torch.manual_seed(0)
    patterns = torch.randn(4, 8, 8)  # one image per partition
    volume = np.repeat(np.arange(3), 4)
    partition = np.tile(np.arange(4), 3)
    by_partition = slice_similarity(patterns[partition] + 0.01 * torch.randn(12, 8, 8), volume, partition)
    assert by_partition["other_volume_same_partition"] > 0.99
    assert by_partition["retrieval"] == 1.0
    assert abs(by_partition["same_volume_other_partition"]) < 0.5
    by_volume = slice_similarity(torch.randn(3, 8, 8)[volume], volume, partition)
    assert by_volume["same_volume_other_partition"] > 0.99
