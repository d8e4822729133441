"""Datalists (which volume plays which role) and the slice view of pre-processed 3D volumes.

A datalist is a MONAI-style JSON file (``monai.data.load_decathlon_datalist`` reads it) whose paths are relative to
the file's folder, with these keys:

- ``pretrain``: images of the training pool, used without labels for pre-training.
- ``labelled_all``: the whole training pool with labels (the fully supervised benchmark).
- ``labelled_<n>_<i>``: the i-th labelled subset of n volumes (|XL| = n), drawn from the training pool.
- ``validation``: model selection during fine-tuning.
- ``test``: held-out evaluation, never used for selection.

The split is patient-level: every entry carries a ``patient`` id and all entries of one patient share one role.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Sequence

import numpy as np
import torch
from monai.data import load_decathlon_datalist
from torch.utils.data import Dataset

from scripts.sampler import partition_of

logger = logging.getLogger(__name__)

ROLES = ("pretrain", "validation", "test")


def split_patients(
    cases: Sequence[dict],
    num_validation: int,
    num_test: int,
    subset_sizes: Sequence[int] = (1, 2, 8),
    num_subsets: Sequence[int] = (5, 5, 3),
    seed: int = 0,
) -> dict[str, list[dict]]:
    """Seeded patient-level split of ``cases`` (dicts with "image", "label", "patient") into a datalist dict.

    Validation and test patients are drawn first; the rest form the training pool. Labelled subsets are drawn
    from the pool; subsets of the same size differ from each other whenever the pool allows it.
    """
    if len(subset_sizes) != len(num_subsets):
        raise ValueError(f"subset_sizes {subset_sizes} and num_subsets {num_subsets} must have the same length.")
    patients = sorted({c["patient"] for c in cases})
    if num_validation < 1 or num_test < 1 or len(patients) <= num_validation + num_test:
        raise ValueError(
            f"cannot split {len(patients)} patients into {num_validation} validation, {num_test} test "
            "and a non-empty training pool."
        )
    order = np.random.default_rng(seed).permutation(len(patients))
    test = {patients[i] for i in order[:num_test]}
    validation = {patients[i] for i in order[num_test : num_test + num_validation]}
    pool = [c for c in cases if c["patient"] not in test | validation]
    pool_patients = sorted({c["patient"] for c in pool})
    datalist = {
        "pretrain": [{"image": c["image"], "patient": c["patient"]} for c in pool],
        "labelled_all": list(pool),
        "validation": [c for c in cases if c["patient"] in validation],
        "test": [c for c in cases if c["patient"] in test],
    }
    rng = np.random.default_rng(seed + 1)
    for size, count in zip(subset_sizes, num_subsets):
        if size > len(pool_patients):
            raise ValueError(f"a labelled subset of {size} patients needs a pool of at least {size}.")
        for index in range(count):
            chosen = set(rng.choice(pool_patients, size=size, replace=False).tolist())
            datalist[f"labelled_{size}_{index}"] = [c for c in pool if c["patient"] in chosen]
    check_datalist(datalist)
    return datalist


def check_datalist(datalist: dict[str, list[dict]]) -> None:
    """Raise ValueError if a patient or image plays two roles (pre-train/labelled pool, validation, test)."""
    owner: dict[str, str] = {}
    for role in ROLES:
        for case in datalist.get(role, []):
            for key in (case.get("patient"), case["image"]):
                if key is not None and owner.setdefault(key, role) != role:
                    raise ValueError(f"{key} is in both '{owner[key]}' and '{role}'.")
    for key, cases in datalist.items():
        if key.startswith("labelled_"):
            for case in cases:
                if owner.get(case["image"]) != "pretrain":
                    raise ValueError(f"{case['image']} in '{key}' is not in the training pool.")


def write_datalist(path: str, datalist: dict, base_dir: str | None = None) -> str:
    """Write ``datalist`` as JSON at ``path`` atomically, with paths made relative to ``base_dir`` (the file's folder)."""
    base_dir = os.path.dirname(os.path.abspath(path)) if base_dir is None else base_dir

    def rel(case: dict) -> dict:
        return {k: os.path.relpath(v, base_dir) if k in ("image", "label") else v for k, v in case.items()}

    content = {key: [rel(c) for c in cases] for key, cases in datalist.items()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".json.tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(content, f, indent=2)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def load_datalist(path: str, key: str) -> list[dict]:
    """Entries of ``key`` in the datalist JSON at ``path``, with absolute paths; a clear error for a missing key."""
    with open(path) as f:
        keys = list(json.load(f))
    if key not in keys:
        raise KeyError(f"{path} has no list '{key}'; it has: {', '.join(keys)}.")
    return load_decathlon_datalist(path, is_segmentation=True, data_list_key=key)


def prepare_synthetic(
    dataset_dir: str,
    num_patients: int = 30,
    num_validation: int = 2,
    num_test: int = 8,
    subset_sizes: Sequence[int] = (1, 2, 8),
    num_subsets: Sequence[int] = (3, 3, 1),
    seed: int = 0,
) -> str:
    """Generate the embedded synthetic dataset in ``dataset_dir`` and its datalist; returns the datalist path."""
    from scripts.synthetic import write_dataset

    cases = write_dataset(dataset_dir, num_patients=num_patients, seed=seed)
    datalist = split_patients(cases, num_validation, num_test, subset_sizes, num_subsets, seed=seed)
    path = write_datalist(os.path.join(dataset_dir, "datalist.json"), datalist)
    logger.info(f"Wrote {path}: " + ", ".join(f"{k} {len(v)}" for k, v in datalist.items()))
    return path


class VolumeSlices(Dataset):
    """2D slices of pre-processed volumes, with the metadata the contrastive losses need.

    Args:
        volumes: a dataset of dicts whose arrays (e.g. "image", "label") are (C, H, W, Z), slice axis last —
            typically a ``CacheDataset`` with ``preprocessing``.
        num_partitions: S, the number of partitions each volume is cut into along z.
        transform: optional transform applied to each slice dict (e.g. fine-tuning augmentation).

    An item is addressed by a flat index (all slices of all volumes, volume-major) or by a
    ``(volume_index, slice_index)`` tuple (what ``PartitionBatchSampler`` yields). It is a dict with the slice
    arrays (C, H, W) and "volume", "slice", "partition" (ints) and "position" = slice / Z (float in [0, 1)).
    """

    def __init__(self, volumes: Dataset, num_partitions: int = 4, transform=None, keys: Sequence[str] = ("image", "label")):
        if num_partitions < 1:
            raise ValueError(f"num_partitions must be >= 1, got {num_partitions}.")
        self.volumes, self.num_partitions, self.transform = volumes, num_partitions, transform
        self.keys = tuple(keys)
        self.slice_counts = [int(volumes[i]["image"].shape[-1]) for i in range(len(volumes))]
        self._offsets = np.cumsum([0] + self.slice_counts)

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def __getitem__(self, index: int | tuple[int, int]) -> dict:
        if isinstance(index, (tuple, list)):
            v, k = int(index[0]), int(index[1])
        else:
            v = int(np.searchsorted(self._offsets, index, side="right") - 1)
            k = int(index - self._offsets[v])
        volume = self.volumes[v]
        q = self.slice_counts[v]
        item = {key: torch.as_tensor(volume[key][..., k]) for key in self.keys if key in volume}
        item.update(volume=v, slice=k, partition=int(partition_of(k, q, self.num_partitions)), position=k / q)
        return self.transform(item) if self.transform is not None else item


def find_images(pattern: str) -> list[dict]:
    """``[{"image": path}, ...]`` for the files matching the glob ``pattern`` (sorted); FileNotFoundError if none."""
    import glob

    paths = sorted(glob.glob(pattern))
    if not paths:
        raise FileNotFoundError(f"no input image matches '{pattern}'.")
    return [{"image": p} for p in paths]
