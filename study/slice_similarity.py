"""How alike are the slices G^D contrasts? Pixel-space cosine similarities between the pre-processed slices of a
prepared dataset's pre-training volumes, by pair kind.

G^D takes slices of the same partition of *other* volumes as positives and every slice of another partition (of the
same volume too) as negatives. If the slices of one volume are near-copies of each other, its negatives look like
the anchor and the loss has nothing to learn from (the demo's synthetic data before the chest drift: 0.74, against
0.28 on ACDC; docs/study/demo_recipe.md). Repository tooling, not shipped in the bundle::

    PYTHONPATH=bundle python -m study.slice_similarity --dataset_dir bundle/data/synthetic
"""

from __future__ import annotations

import os

import numpy as np
import torch

from study.configs import read_configs


def slice_similarity(slices: torch.Tensor, volume: np.ndarray, partition: np.ndarray) -> dict[str, float]:
    """(N, H, W) slices with their volume and partition indices (N,) -> the mean cosine similarity of the
    mean-centred slices over each pair kind, and how often a slice's nearest neighbour among the other volumes'
    slices has its partition ("retrieval"; chance 1 / S)."""
    flat = slices.flatten(1).double()
    flat = flat - flat.mean(1, keepdim=True)
    flat = flat / flat.norm(dim=1, keepdim=True).clamp(min=1e-12)
    sim = (flat @ flat.T).numpy()
    same_volume = volume[:, None] == volume[None]
    same_partition = partition[:, None] == partition[None]
    others = np.where(same_volume, -np.inf, sim)
    return {"same_volume_other_partition": float(sim[same_volume & ~same_partition].mean()),
            "other_volume_same_partition": float(sim[~same_volume & same_partition].mean()),
            "other_volume_other_partition": float(sim[~same_volume & ~same_partition].mean()),
            "retrieval": float((partition[others.argmax(1)] == partition).mean())}


def main(dataset_dir: str) -> dict[str, float]:
    """Every slice of the datalist's ``pretrain`` volumes, pre-processed as pre-training sees them (the disk cache)."""
    parser = read_configs(("train.yaml", "pretrain.yaml"), {"dataset_dir": os.path.abspath(dataset_dir)})
    volumes = parser.get_parsed_content("unlabelled#dataset")
    num_partitions = parser.get_parsed_content("num_partitions")
    slices, volume, partition = [], [], []
    for v in range(len(volumes)):
        image = torch.as_tensor(volumes[v]["image"])[0]  # (H, W, Z)
        depth = image.shape[-1]
        slices += [image[..., k] for k in range(depth)]
        volume += [v] * depth
        partition += [k * num_partitions // depth for k in range(depth)]
    result = slice_similarity(torch.stack(slices), np.array(volume), np.array(partition))
    for name, value in result.items():
        print(f"{name}: {value:.3f}")
    return result


if __name__ == "__main__":
    import fire

    fire.Fire(main, serialize=lambda _: None)
