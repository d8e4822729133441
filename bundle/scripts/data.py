"""Datalists (which volume plays which role) and the slice view of pre-processed 3D volumes.

A datalist is a MONAI-style JSON file (``monai.data.load_decathlon_datalist`` reads it) whose paths are relative to
the file's folder, with these keys:

- ``pretrain``: images of the training pool, used without labels for pre-training.
- ``labelled_all``: the whole training pool with labels (the fully supervised benchmark).
- ``unlabelled``: the training pool's images without a label (what ``select`` chooses from by default).
- ``labelled_<n>_<i>``: the i-th labelled subset of n volumes (|XL| = n), drawn from the training pool.
- ``validation``: model selection during fine-tuning.
- ``test``: held-out evaluation, never used for selection.

The split is patient-level: every entry carries a ``patient`` id and all entries of one patient share one role.
Paths inside the datalist's folder are stored relative to it, paths elsewhere (a raw dataset left where it is) are
absolute. Top-level entries that are not lists describe the dataset (``datalist_info``): ``contract`` (the data
contract of ``scripts.contract``: pre-processing settings, channel, class names, raw label values) and ``source``.

Pre-processed volumes are cached on disk by ``CachedVolumes`` (a ``PersistentDataset``) under a key made of the
files (path, size, modification time) and the pickled pre-processing transforms, so changed files or settings miss.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
from collections.abc import Mapping, Sequence
from copy import deepcopy

import numpy as np
import torch
from monai.data import PersistentDataset, load_decathlon_datalist
from monai.data.image_reader import ImageReader
from monai.utils import convert_to_tensor
from torch.utils.data import Dataset

from scripts.errors import BundleError, MissingFileError
from scripts.files import atomic_save, atomic_write_json
from scripts.sampler import partition_of

logger = logging.getLogger(__name__)

ROLES = ("pretrain", "validation", "test")
ALL_LABELLED, UNLABELLED = "labelled_all", "unlabelled"   # the training pool's labelled and unlabelled volumes


def split_patients(
    cases: Sequence[dict],
    num_validation: int,
    num_test: int,
    subset_sizes: Sequence[int] = (1, 2, 8),
    num_subsets: Sequence[int] = (5, 5, 3),
    seed: int = 0,
    keep: Mapping[str, str] | None = None,
) -> dict[str, list[dict]]:
    """Seeded patient-level split of ``cases`` (dicts with "image", "patient" and, when labelled, "label").

    Validation and test patients are drawn first, among the patients with labels; the rest form the training pool,
    whose images (labelled or not) all serve pre-training (``pretrain``); its labelled volumes are ``labelled_all``,
    its unlabelled ones ``unlabelled`` (what ``select`` chooses from by default). ``num_test`` may be 0 (no test
    split). Labelled subsets (``labelled_<n>_<i>``) are drawn from the labelled pool patients, for a study; subsets
    of the same size differ from each other whenever the pool allows it. Unlabelled cases of validation or test
    patients are left out (they would leak those patients).

    Args:
        keep: patient id -> "validation" or "test", from an earlier datalist of the same folder: those patients
            keep their role while they still have a label, and the rest of each role is drawn as above (so
            labelling more volumes and preparing again moves no patient between validation, test and training).

    Raises:
        BundleError: too few labelled patients for the split, or a subset larger than the labelled pool.
    """
    if len(subset_sizes) != len(num_subsets):
        raise BundleError(f"split: subset_sizes {list(subset_sizes)} and num_subsets {list(num_subsets)} must have "
                          "the same length.")
    labelled = [c for c in cases if c.get("label") is not None]
    patients = sorted({c["patient"] for c in labelled})
    if num_validation < 1 or num_test < 0 or len(patients) <= num_validation + num_test:
        raise BundleError(
            f"cannot split {len(patients)} labelled patients into {num_validation} validation, {num_test} test "
            "and a non-empty labelled training pool: label more volumes, or lower the split's num_validation "
            "(at least 1) or num_test (0: no test split) in prepare.yaml."
        )
    order = [patients[i] for i in np.random.default_rng(seed).permutation(len(patients))]
    kept = {role: [p for p in order if (keep or {}).get(p) == role] for role in ("test", "validation")}
    free = [p for p in order if p not in kept["test"] + kept["validation"]]
    test = set(kept["test"][:num_test] + free[: max(0, num_test - len(kept["test"]))])
    free = [p for p in free if p not in test]
    validation = set(kept["validation"][:num_validation] + free[: max(0, num_validation - len(kept["validation"]))])
    pool = [c for c in cases if c["patient"] not in test | validation]
    labelled_pool = [c for c in pool if c.get("label") is not None]
    pool_patients = sorted({c["patient"] for c in labelled_pool})
    datalist = {
        "pretrain": [{k: v for k, v in c.items() if k != "label"} for c in pool],
        ALL_LABELLED: list(labelled_pool),
        UNLABELLED: [c for c in pool if c.get("label") is None],
        "validation": [c for c in labelled if c["patient"] in validation],
        "test": [c for c in labelled if c["patient"] in test],
    }
    rng = np.random.default_rng(seed + 1)
    for size, count in zip(subset_sizes, num_subsets):
        if size > len(pool_patients):
            raise BundleError(
                f"a labelled subset of {size} patients needs a labelled pool of at least {size}, the pool has "
                f"{len(pool_patients)}: lower the split's subset_sizes (or [] for no subsets) in prepare.yaml."
            )
        for index in range(count):
            chosen = set(rng.choice(pool_patients, size=size, replace=False).tolist())
            datalist[f"labelled_{size}_{index}"] = [c for c in labelled_pool if c["patient"] in chosen]
    check_datalist(datalist)
    return datalist


def check_datalist(datalist: dict) -> None:
    """Raise ValueError if a patient or image plays two roles (pre-train/labelled pool, validation, test), or if a
    labelled list holds a volume outside the training pool or without a label."""
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
        if key.startswith("labelled_") or key in ("validation", "test"):
            for case in cases:
                if case.get("label") is None:
                    raise ValueError(f"{case['image']} in '{key}' has no label.")


def write_datalist(path: str, datalist: dict, base_dir: str | None = None) -> str:
    """Write ``datalist`` as JSON at ``path`` atomically; returns ``path``.

    Lists of cases have their "image"/"label" paths made relative to ``base_dir`` (default: the file's folder) when
    they lie inside it, absolute otherwise (so a raw dataset elsewhere stays found wherever the datalist is read
    from). Other top-level values (label names, dataset description) are written as they are.
    """
    folder = os.path.dirname(os.path.abspath(path))
    base_dir = os.path.abspath(folder if base_dir is None else base_dir)

    def rel(value: str) -> str:
        value = os.path.abspath(value)
        inside = os.path.commonpath([value, base_dir]) == base_dir
        return os.path.relpath(value, base_dir) if inside else value

    def entry(case: dict) -> dict:
        return {k: rel(v) if k in ("image", "label") and isinstance(v, str) else v for k, v in case.items()}

    content = {key: [entry(c) for c in value] if _is_case_list(value) else value for key, value in datalist.items()}
    atomic_write_json(content, path)
    return path


def _is_case_list(value) -> bool:
    return isinstance(value, list) and all(isinstance(c, dict) and "image" in c for c in value)


def load_datalist(path: str, key: str, require_label: bool = False) -> list[dict]:
    """Entries of ``key`` in the datalist JSON at ``path``, with absolute paths; a one-line error for a missing key,
    an entry that is not ``{"image": path, ...}`` or, with ``require_label`` (fine-tuning, validation, evaluation),
    an entry without a "label" or an empty list (e.g. evaluation on a split without test volumes)."""
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise MissingFileError(f"datalist {path} not found: prepare the data first (prepare.yaml) or point "
                               "--dataset_dir at a prepared dataset.")
    try:
        with open(path) as f:
            content = json.load(f)
    except ValueError as error:
        raise BundleError(f"datalist {path} is not valid JSON ({error}): prepare the data again.") from error
    keys = [k for k, v in content.items() if isinstance(v, list)]
    if key not in keys:
        raise BundleError(f"datalist {path} has no list '{key}'; it has: {', '.join(keys)}.")
    if require_label and not content[key]:   # nothing to fine-tune on, validate or evaluate
        raise BundleError(f"datalist {path}: '{key}' holds no volume: prepare the data with volumes in it (a test "
                          "split: --folder#split#num_test N or --split#num_test N).")
    needed = ("image", "label") if require_label else ("image",)
    for index, entry in enumerate(content[key]):
        missing = [k for k in needed if not isinstance(entry, dict) or not isinstance(entry.get(k), str)]
        if missing:
            raise BundleError(f"datalist {path}: entry {index} of '{key}' ({json.dumps(entry)[:200]}) has no "
                              f"{' and no '.join(repr(k) for k in missing)} path; every entry of '{key}' needs "
                              f"{' and '.join(repr(k) for k in needed)}.")
    return load_decathlon_datalist(path, is_segmentation=True, data_list_key=key)


def datalist_info(path: str) -> dict:
    """The top-level entries of the datalist at ``path`` that are not lists of volumes: ``contract`` (the data
    contract, ``scripts.contract``), ``source``... ``{}`` when the file does not exist (e.g. under MONAI Label,
    which hands over its own data lists)."""
    if not path or not os.path.isfile(path):
        return {}
    with open(path) as f:
        content = json.load(f)
    return {k: v for k, v in content.items() if not isinstance(v, list)}


def label_names(path: str, foreground_only: bool = True) -> list[str] | None:
    """Class names in class order from the datalist's data contract (without the background by default);
    None when the datalist has none (e.g. for ``scripts.report.dice_table(..., class_names=...)``)."""
    names = (datalist_info(path).get("contract") or {}).get("class_names")
    if not names:
        return None
    return names[1:] if foreground_only else list(names)


# ---------------------------------------------------------------- disk cache of pre-processed volumes
def file_hashing(item: dict) -> bytes:
    """Cache key of a data item: its "image" and "label" files, each as absolute path, size and modification time
    (a replaced file misses the cache). Other keys (patient ids...) do not matter."""
    parts = []
    for key in ("image", "label"):
        value = item.get(key)
        if isinstance(value, str):
            path = os.path.abspath(value)
            try:
                stat = os.stat(path)
                parts.append([key, path, stat.st_size, stat.st_mtime_ns])
            except OSError:
                parts.append([key, path, None, None])
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest().encode()


class _TransformPickler(pickle.Pickler):
    """Pickles transforms deterministically, leaving out what image readers remember of the last file read."""

    def reducer_override(self, obj):
        if isinstance(obj, ImageReader):
            return type(obj), (), {k: v for k, v in vars(obj).items() if k != "filenames"}
        return NotImplemented


def transform_hashing(transforms) -> bytes:
    """Hash of the (deterministic) pre-processing transforms and all their settings: equal settings give equal
    hashes in any process, before or after the transforms ran; any changed setting changes it."""
    buffer = io.BytesIO()
    _TransformPickler(buffer, protocol=4).dump(transforms)
    return hashlib.sha256(buffer.getvalue()).hexdigest().encode()


class CachedVolumes(PersistentDataset):
    """``PersistentDataset`` of pre-processed volumes, keyed by ``file_hashing`` and ``transform_hashing``.

    Args:
        data: dicts with "image" (and "label") paths, e.g. ``load_datalist(...)``.
        transform: the deterministic pre-processing (``scripts.transforms.preprocessing``).
        cache_dir: folder of the cache files (``<key>.pt``, written atomically in that folder); None: no disk cache
            (every access recomputes). Changed files or settings give new keys; stale files stay until the folder is
            deleted. A damaged file (truncated, corrupt) is recomputed and replaced, with a warning naming it.

    Items come back with plain tensors (no metadata), the same on a cache hit and a miss.
    """

    def __init__(self, data: Sequence[dict], transform, cache_dir: str | None = None, **kwargs):
        kwargs.setdefault("hash_func", file_hashing)
        kwargs.setdefault("hash_transform", transform_hashing)
        super().__init__(data=data, transform=transform, cache_dir=cache_dir, **kwargs)

    def cache_file(self, index: int) -> str | None:
        """The cache file of item ``index`` (it may not exist yet); None without a cache folder."""
        if self.cache_dir is None:
            return None
        return str(self.cache_dir / f"{self.hash_func(self.data[index]).decode()}{self.transform_hash}.pt")

    def _cachecheck(self, item_transformed):
        """MONAI's cache lookup, made safe: a cache file that cannot be read back (truncated, corrupt) is recomputed
        with a warning naming it, and new entries are written atomically inside the cache folder (``atomic_save``;
        MONAI writes them in a temporary folder elsewhere and moves them, a copy across file systems)."""
        if self.cache_dir is None:
            return self._pre_transform(deepcopy(item_transformed))
        hashfile = self.cache_dir / f"{self.hash_func(item_transformed).decode()}{self.transform_hash}.pt"
        if hashfile.is_file():
            try:
                return torch.load(hashfile, weights_only=self.weights_only)
            except Exception as error:  # any failure to read back: the entry is damaged, compute it again
                reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
                logger.warning(f"cache entry {hashfile} is damaged ({type(error).__name__}: {reason}): recomputed.")
        item = self._pre_transform(deepcopy(item_transformed))
        atomic_save(convert_to_tensor(item, convert_numeric=False, track_meta=self.track_meta), hashfile)
        return item

    def _pre_transform(self, item_transformed):
        item = super()._pre_transform(item_transformed)
        # compact copies: a cropped array is a view of the larger resampled one, whose whole storage torch.save writes
        return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in item.items()}

    def _transform(self, index: int):
        item = super()._transform(index)
        return {k: v.as_tensor() if hasattr(v, "as_tensor") else v for k, v in item.items()}


class VolumeSlices(Dataset):
    """2D slices of pre-processed volumes, with the metadata the contrastive losses need.

    Args:
        volumes: a dataset of dicts whose arrays (e.g. "image", "label") are (C, H, W, Z), slice axis last —
            typically ``CachedVolumes`` with ``preprocessing``. Each volume is read once, at construction, and its
            ``keys`` arrays are kept in memory as plain tensors.
        num_partitions: S, the number of partitions each volume is cut into along z.
        transform: optional transform applied to each slice dict (e.g. fine-tuning augmentation).

    An item is addressed by a flat index (all slices of all volumes, volume-major) or by a
    ``(volume_index, slice_index)`` tuple (what ``PartitionBatchSampler`` yields). It is a dict with the slice
    arrays (C, H, W) and "volume", "slice", "partition" (ints) and "position" = slice / Z (float in [0, 1)).
    """

    def __init__(
        self, volumes: Dataset, num_partitions: int = 4, transform=None, keys: Sequence[str] = ("image", "label")
    ):
        if num_partitions < 1:
            raise ValueError(f"num_partitions must be >= 1, got {num_partitions}.")
        self.volumes, self.num_partitions, self.transform = volumes, num_partitions, transform
        self.keys = tuple(keys)
        self.arrays = []
        for i in range(len(volumes)):
            volume = volumes[i]
            self.arrays.append({key: _plain(volume[key]) for key in self.keys if key in volume})
        self.slice_counts = [int(a["image"].shape[-1]) for a in self.arrays]
        self._offsets = np.cumsum([0] + self.slice_counts)

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def __getitem__(self, index: int | tuple[int, int]) -> dict:
        if isinstance(index, (tuple, list)):
            v, k = int(index[0]), int(index[1])
        else:
            v = int(np.searchsorted(self._offsets, index, side="right") - 1)
            k = int(index - self._offsets[v])
        q = self.slice_counts[v]
        item = {key: array[..., k].clone() for key, array in self.arrays[v].items()}  # a copy: transforms may write
        item.update(volume=v, slice=k, partition=int(partition_of(k, q, self.num_partitions)), position=k / q)
        return self.transform(item) if self.transform is not None else item


def _plain(array) -> torch.Tensor:
    """A plain tensor (MetaTensor metadata dropped) sharing the data where possible."""
    array = torch.as_tensor(array)
    return array.as_tensor() if hasattr(array, "as_tensor") else array


def find_images(pattern: str) -> list[dict]:
    """``[{"image": path}, ...]`` for the files matching the glob ``pattern`` (sorted); FileNotFoundError if none."""
    import glob

    paths = sorted(glob.glob(pattern))
    if not paths:
        raise MissingFileError(f"no input image matches '{pattern}': check --input_glob.")
    return [{"image": p} for p in paths]
