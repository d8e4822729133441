"""Real datasets: from a raw folder to checked volumes, a written-down split and a disk cache of pre-processed volumes.

An adapter reads one layout and returns a ``RawDataset``: the cases (dicts with "image", "label" and "patient", plus
layout details such as the ACDC "phase" and "frame"), the class names, and, where the layout needs them, the image
channel to use and the raw label value of each class. Adapters only look at file names and the dataset's own
description files; they never read image data.

- ``acdc``: the ACDC release layout ``patientNNN/patientNNN_frameXX.nii.gz`` + ``..._gt.nii.gz``; ED, ES or both.
- ``decathlon``: a Medical Segmentation Decathlon task folder (``dataset.json``, ``imagesTr``, ``labelsTr``), with
  channel selection for multi-channel tasks; downloaded through MONAI when asked (and online).
- ``mmwhs``: MM-WHS ``<modality>_train_NNNN_image.nii.gz`` + ``..._label.nii.gz``, raw label values remapped to 1..7.
- ``folder``: any folder of image/label pairs given by two glob patterns.
- ``synthetic``: the embedded synthetic volumes (``scripts.synthetic``), which it first writes in the ACDC layout;
  from there on they take the same path as every real dataset.

``validate`` then reads every file once and collects every problem (unreadable files, wrong dimensions, image/label
mismatches, unexpected label values, NaN/Inf or constant intensities, too few slices); ``prepare`` validates, splits
patient-level (``scripts.data.split_patients``), fills the disk cache and writes the datalist, last and atomically.
The rules are described in docs/data.md.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from multiprocessing.pool import ThreadPool

import numpy as np

from scripts.contract import build_preprocessing, make_contract
from scripts.data import CachedVolumes, split_patients, write_datalist
from scripts.errors import BundleError
from scripts.transforms import check_size, choose_slice_axis, geometry_problem, intensity_range, label_problem

logger = logging.getLogger(__name__)

__all__ = [
    "RawDataset", "acdc", "decathlon", "mmwhs", "folder", "synthetic", "validate", "check_case", "fill_cache",
    "prepare", "ACDC_LABELS", "MMWHS_LABELS", "MMWHS_LABEL_VALUES",
]

ACDC_LABELS = {"0": "background", "1": "right ventricle", "2": "myocardium", "3": "left ventricle"}
MMWHS_LABEL_VALUES = (205, 420, 500, 550, 600, 820, 850)  # raw values, remapped to classes 1..7 in this order
MMWHS_LABELS = {
    "0": "background",
    "1": "left ventricle myocardium",  # 205
    "2": "left atrium",  # 420
    "3": "left ventricle",  # 500
    "4": "right atrium",  # 550
    "5": "right ventricle",  # 600
    "6": "ascending aorta",  # 820
    "7": "pulmonary artery",  # 850
}
ON_ERROR = ("raise", "skip")
_NIFTI = re.compile(r"\.nii(\.gz)?$")


@dataclass
class RawDataset:
    """What an adapter found in a raw folder.

    Attributes:
        kind: the layout ("acdc", "decathlon", "mmwhs", "folder", "synthetic").
        root: the folder read (absolute).
        cases: one dict per volume: "image" and "label" (absolute paths; no "label" for an unlabelled volume),
            "patient" (all volumes of a patient share one role in the split), and layout details.
        labels: class index (a string, as in JSON) -> name, background included.
        channel: which channel of multi-channel (4D) images to use; None for 3D images.
        label_values: raw label value of each class (``label_values[i]`` -> class i); None: files hold 0..K-1.
        problems: (path, message) found while scanning names (missing files, unmatched pairs).
        details: layout options, written into the datalist's ``source`` entry.
    """

    kind: str
    root: str
    cases: list[dict]
    labels: dict[str, str]
    channel: int | None = None
    label_values: list[int] | None = None
    problems: list[tuple[str, str]] = field(default_factory=list)
    details: dict = field(default_factory=dict)


# ---------------------------------------------------------------- helpers
def _root(raw_dir: str | None, kind: str) -> str:
    if not raw_dir:
        raise ValueError(f"raw_dir is not set: pass the {kind} folder with --raw_dir <folder>.")
    root = os.path.abspath(os.path.expanduser(str(raw_dir)))
    if not os.path.isdir(root):
        raise FileNotFoundError(f"raw_dir {root} ({kind}) does not exist or is not a folder.")
    return root


def _no_cases(root: str, kind: str, expected: str) -> ValueError:
    return ValueError(f"no {kind} volumes found in {root}: expected {expected}.")


def _stem(path: str) -> str:
    return _NIFTI.sub("", os.path.basename(path))


def _label_names(labels, count: int | None = None) -> dict[str, str]:
    """Class names as {"0": name, ...} from a list of names, {index: name} or nnU-Net style {name: index}."""
    if isinstance(labels, Mapping):
        items = list(labels.items())
        if items and all(isinstance(v, (int, np.integer)) or (isinstance(v, str) and v.isdigit()) for _, v in items) \
                and not all(str(k).isdigit() for k, _ in items):
            items = [(v, k) for k, v in items]  # {"background": 0, ...}
        names = {str(int(k)): str(v) for k, v in items}
    elif isinstance(labels, Sequence) and not isinstance(labels, str):
        names = {str(i): str(v) for i, v in enumerate(labels)}
    else:
        raise ValueError(f"labels must be a list of names or a mapping index -> name, got {labels!r}.")
    if sorted(int(k) for k in names) != list(range(len(names))):
        raise ValueError(f"label indices must be 0..K-1, got {sorted(int(k) for k in names)}.")
    if count is not None and len(names) != count:
        raise ValueError(f"{len(names)} label names for {count} classes: {names}.")
    return dict(sorted(names.items(), key=lambda kv: int(kv[0])))


# ---------------------------------------------------------------- ACDC
_ACDC_IMAGE = re.compile(r"^(patient\d+)_frame(\d+)\.nii(\.gz)?$")
_ACDC_PHASES = ("ED", "ES")


def _acdc_info(path: str) -> dict[str, int]:
    """``ED`` / ``ES`` frame numbers from an ACDC ``Info.cfg`` ("ED: 1" lines); {} when absent or unreadable."""
    info = {}
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in _ACDC_PHASES and value.strip().isdigit():
                    info[key.strip()] = int(value.strip())
    except OSError:
        return {}
    return info


def acdc(raw_dir: str, phases: str | Sequence[str] = ("ED",), labels=None) -> RawDataset:
    """Cases of an ACDC release folder: ``patientNNN/patientNNN_frameXX.nii.gz`` images with ``..._gt.nii.gz`` labels,
    patient folders anywhere below ``raw_dir`` (e.g. ``training/``, ``testing/``).

    Args:
        phases: "ED", "ES", or both (["ED", "ES"] or "both"). A patient's ``Info.cfg`` ("ED: 1", "ES: 12") gives the
            frame numbers; without it the lowest frame number found is ED and the next one ES (the shared copy:
            frame01 = ED, frame02 = ES).
        labels: class names (default: background, right ventricle, myocardium, left ventricle).

    Both frames of a patient carry the same "patient" id, so they stay on one side of the split.
    """
    root = _root(raw_dir, "ACDC")
    if isinstance(phases, str):
        phases = _ACDC_PHASES if phases.lower() == "both" else (phases,)
    phases = tuple(str(p).upper() for p in phases)
    if not phases or any(p not in _ACDC_PHASES for p in phases):
        raise ValueError(f"phases must be ED, ES or both, got {phases}.")
    folders = sorted(
        p for p in glob.glob(os.path.join(root, "**", "patient*"), recursive=True)
        if os.path.isdir(p) and re.fullmatch(r"patient\d+", os.path.basename(p))
    )
    cases, problems = [], []
    for folder_path in folders:
        patient = os.path.basename(folder_path)
        frames = {}
        for name in os.listdir(folder_path):
            match = _ACDC_IMAGE.match(name)
            if match and match.group(1) == patient:
                frames[int(match.group(2))] = os.path.join(folder_path, name)
        info = _acdc_info(os.path.join(folder_path, "Info.cfg"))
        ordered = sorted(frames)
        for phase in phases:
            if phase in info:
                number, rule = info[phase], "Info.cfg"
            else:
                index = _ACDC_PHASES.index(phase)
                if index >= len(ordered):
                    problems.append((folder_path, f"no {phase} frame (no Info.cfg, {len(ordered)} frame file(s))"))
                    continue
                number, rule = ordered[index], "frame order"
            image = frames.get(number)
            if image is None:
                missing = f"{patient}_frame{number:02d}.nii.gz"
                problems.append((folder_path, f"{phase} is frame {number} ({rule}) but there is no {missing}"))
                continue
            label = _NIFTI.sub("", image) + "_gt" + _NIFTI.search(image).group(0)
            if not os.path.isfile(label):
                problems.append((image, f"label file {os.path.basename(label)} is missing"))
                continue
            cases.append({"image": image, "label": label, "patient": patient, "phase": phase, "frame": number})
    if not cases and not problems:
        raise _no_cases(root, "ACDC", "patientNNN/patientNNN_frameXX.nii.gz with ..._frameXX_gt.nii.gz labels")
    return RawDataset(
        kind="acdc", root=root, cases=cases, labels=_label_names(labels or ACDC_LABELS), problems=problems,
        details={"phases": list(phases)},
    )


# ---------------------------------------------------------------- Medical Segmentation Decathlon
def download_decathlon(task: str, root_dir: str) -> str:
    """Download and extract Decathlon ``task`` (e.g. "Task05_Prostate") into ``root_dir`` with MONAI's own URL and
    checksum (``monai.apps.DecathlonDataset``); returns the task folder. Needs internet access."""
    from monai.apps import DecathlonDataset, download_and_extract

    if task not in DecathlonDataset.resource:
        raise ValueError(f"unknown Decathlon task {task!r}; MONAI knows {sorted(DecathlonDataset.resource)}.")
    url = DecathlonDataset.resource[task]
    os.makedirs(root_dir, exist_ok=True)
    try:
        download_and_extract(
            url=url, filepath=os.path.join(root_dir, f"{task}.tar"), output_dir=root_dir,
            hash_val=DecathlonDataset.md5[task], hash_type="md5",
        )
    except Exception as error:  # offline, proxy, checksum...: say what to do instead
        raise RuntimeError(
            f"could not download Decathlon {task} from {url} ({type(error).__name__}: {error}). Without internet "
            f"access, fetch and extract it elsewhere and pass the folder holding dataset.json as --raw_dir."
        ) from error
    return os.path.join(root_dir, task)


def decathlon(
    raw_dir: str,
    channel: int | str | None = None,
    task: str | None = None,
    download: bool = False,
    labels=None,
    include_test: bool = False,
) -> RawDataset:
    """Cases of a Medical Segmentation Decathlon task folder: ``dataset.json`` whose "training" list pairs
    ``imagesTr/*.nii.gz`` with ``labelsTr/*.nii.gz``.

    Args:
        raw_dir: the task folder (holding dataset.json), or its parent when ``task`` names the sub-folder.
        channel: the channel of multi-channel (4D) images, as an index or a modality name from dataset.json (the
            paper's prostate: 0 or "T2"). Required when dataset.json lists several modalities.
        task: e.g. "Task05_Prostate": the sub-folder to look for and what ``download`` fetches.
        download: when no dataset.json is found, download ``task`` into ``raw_dir`` (``download_decathlon``).
        labels: class names; default: dataset.json "labels".
        include_test: add the unlabelled "test" images (imagesTs) for pre-training only.

    The "patient" id is the file name without extension (one volume per patient).
    """
    candidates = [raw_dir] + ([os.path.join(raw_dir, task)] if raw_dir and task else [])
    found = [os.path.abspath(c) for c in candidates if c and os.path.isfile(os.path.join(c, "dataset.json"))]
    if found:
        root = found[0]
    elif download:
        if not task:
            raise ValueError("download needs the task name, e.g. --decathlon#task Task05_Prostate.")
        if not raw_dir:
            raise ValueError("raw_dir is not set: pass the folder to download into with --raw_dir <folder>.")
        root = download_decathlon(task, os.path.abspath(raw_dir))
    else:
        _root(raw_dir, "Decathlon")
        where = " or ".join(os.path.join(os.path.abspath(c), "dataset.json") for c in candidates if c)
        raise FileNotFoundError(
            f"no {where}: raw_dir must be a Decathlon task folder; to fetch one (needs internet) set "
            "download to true with the task name (e.g. --decathlon#download true --decathlon#task Task05_Prostate)."
        )
    description = os.path.join(root, "dataset.json")
    try:
        with open(description) as f:
            meta = json.load(f)
        training = meta["training"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{description}: not a Decathlon description ({type(error).__name__}: {error}).") from error
    modalities = meta.get("modality") or meta.get("channel_names") or {}
    modalities = {int(k): str(v) for k, v in modalities.items()} if isinstance(modalities, Mapping) else {}
    if isinstance(channel, str) and not channel.isdigit():
        by_name = {v.lower(): k for k, v in modalities.items()}
        if channel.lower() not in by_name:
            raise ValueError(f"channel {channel!r} is not a modality of {description}: {modalities}.")
        channel = by_name[channel.lower()]
    channel = None if channel is None else int(channel)
    if channel is None and len(modalities) > 1:
        raise ValueError(
            f"{description} lists {len(modalities)} modalities {modalities}: choose one with --decathlon#channel "
            "(index or name; the paper's prostate uses 0 = T2)."
        )
    if channel is not None and modalities and channel not in modalities:
        raise ValueError(f"channel {channel} is not in the modalities of {description}: {modalities}.")
    if labels is None and "labels" not in meta:
        raise ValueError(f"{description} has no 'labels': give the class names with --decathlon#labels.")
    names = _label_names(labels if labels is not None else meta["labels"])

    def path(entry) -> str:
        return os.path.normpath(os.path.join(root, entry))

    cases = []
    for item in training:
        if not isinstance(item, Mapping) or "image" not in item or "label" not in item:
            raise ValueError(f"{description}: a 'training' entry is not an image/label pair: {item!r}.")
        cases.append({"image": path(item["image"]), "label": path(item["label"]), "patient": _stem(item["image"])})
    if include_test:
        for item in meta.get("test", []):
            image = item["image"] if isinstance(item, Mapping) else item
            cases.append({"image": path(image), "patient": _stem(image)})
    if not cases:
        raise _no_cases(root, "Decathlon", f"a non-empty 'training' list in {description}")
    return RawDataset(
        kind="decathlon", root=root, cases=cases, labels=names, channel=channel,
        details={"task": os.path.basename(root), "name": meta.get("name"), "include_test": include_test,
                 "modality": modalities.get(channel) if channel is not None else None},
    )


# ---------------------------------------------------------------- MM-WHS
def mmwhs(
    raw_dir: str,
    modality: str = "mr",
    label_values: Sequence[int] = MMWHS_LABEL_VALUES,
    labels=None,
    include_unlabelled: bool = False,
) -> RawDataset:
    """Cases of an MM-WHS folder: ``<modality>_train_NNNN_image.nii.gz`` with ``..._label.nii.gz`` anywhere below
    ``raw_dir`` (e.g. ``mr_train/``).

    Args:
        modality: "mr" or "ct" (the file-name prefix).
        label_values: raw label values of the foreground classes, in class order (default 205, 420, 500, 550, 600,
            820, 850 -> 1..7); 0 stays background.
        labels: class names, background first (default ``MMWHS_LABELS``).
        include_unlabelled: add images without a label file (e.g. ``<modality>_test_*``) for pre-training only.
    """
    root = _root(raw_dir, "MM-WHS")
    values = [0] + [int(v) for v in label_values]
    names = _label_names(labels if labels is not None else MMWHS_LABELS, count=len(values))
    pattern = re.compile(rf"^({re.escape(modality)}_\w+?)_image\.nii(\.gz)?$")
    cases, problems = [], []
    images = sorted(glob.glob(os.path.join(root, "**", f"{modality}_*_image.nii*"), recursive=True))
    for image in images:
        match = pattern.match(os.path.basename(image))
        if not match:
            continue
        label = image.replace("_image.nii", "_label.nii")
        case = {"image": image, "patient": match.group(1)}
        if os.path.isfile(label):
            cases.append({**case, "label": label})
        elif include_unlabelled:
            cases.append(case)
        elif "_test_" not in os.path.basename(image):
            problems.append((image, f"label file {os.path.basename(label)} is missing"))
    for label in sorted(glob.glob(os.path.join(root, "**", f"{modality}_*_label.nii*"), recursive=True)):
        if not os.path.isfile(label.replace("_label.nii", "_image.nii")):
            problems.append((label, "label without an image file"))
    if not cases and not problems:
        raise _no_cases(root, "MM-WHS", f"{modality}_train_NNNN_image.nii.gz with ..._label.nii.gz")
    return RawDataset(
        kind="mmwhs", root=root, cases=cases, labels=names, label_values=values, problems=problems,
        details={"modality": modality, "include_unlabelled": include_unlabelled},
    )


# ---------------------------------------------------------------- any folder of image/label pairs
def _glob_regex(pattern: str) -> re.Pattern:
    """A regex for a glob pattern (``*``, ``?``, ``[...]``, ``**/``) whose groups capture what the wildcards matched."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(.*/)?", i + 3
        elif pattern[i] == "*":
            out, i = out + "([^/]*)", i + 1
        elif pattern[i] == "?":
            out, i = out + "([^/])", i + 1
        elif pattern[i] == "[" and "]" in pattern[i + 1 :]:
            end = pattern.index("]", i + 1)
            body = pattern[i + 1 : end]
            out, i = out + "([" + ("^" + body[1:] if body.startswith("!") else body) + "])", end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + "$")


def _match_ids(root: str, pattern: str) -> dict[str, list[str]]:
    """case id (the wildcard parts of the path, joined by '/') -> matching files."""
    regex = _glob_regex(pattern)
    ids: dict[str, list[str]] = {}
    for path in sorted(glob.glob(os.path.join(root, pattern), recursive=True)):
        match = regex.match(os.path.relpath(path, root).replace(os.sep, "/"))
        if match and os.path.isfile(path):
            key = "/".join(g.strip("/") for g in match.groups() if g)
            ids.setdefault(key, []).append(path)
    return ids


def folder(
    raw_dir: str,
    image_glob: str = "images/*.nii.gz",
    label_glob: str | None = "labels/*.nii.gz",
    labels=None,
    patient_pattern: str | None = None,
    channel: int | None = None,
    label_values: Sequence[int] | None = None,
    allow_unlabelled: bool = True,
) -> RawDataset:
    """Cases of a folder of image/label pairs given by two glob patterns relative to ``raw_dir``.

    An image and a label pair up when the wildcards of their patterns match the same text (the case id): with
    ``images/*_0000.nii.gz`` and ``labels/*.nii.gz``, ``images/ab_0000.nii.gz`` pairs with ``labels/ab.nii.gz``;
    with ``*/image.nii.gz`` and ``*/label.nii.gz``, the sub-folder names pair them.

    Args:
        labels: class names, background first (a list or {index: name}); default: "background", "class 1"... up to
            the largest label value found when validating.
        patient_pattern: a regex searched in the case id whose first group (or whole match) is the patient id, so
            that several volumes of one patient stay on one side of the split (e.g. ``(patient\\d+)``); default: each
            case is its own patient.
        channel: the channel of multi-channel (4D) images; None: images are 3D.
        label_values: raw label value of each class, background first (``label_values[i]`` -> class i).
        allow_unlabelled: images without a label are used for pre-training (and ``select``) only, each named in
            the log; False: an image without a label is a problem.
    """
    root = _root(raw_dir, "image/label")
    images = _match_ids(root, image_glob)
    label_files = _match_ids(root, label_glob) if label_glob else {}
    cases, problems = [], []
    regex = re.compile(patient_pattern) if patient_pattern else None
    for key, paths in images.items():
        if len(paths) > 1:
            problems.append((paths[0], f"case id {key!r} matches several images: {paths}"))
            continue
        patient = key
        if regex is not None:
            match = regex.search(key)
            if not match:
                problems.append((paths[0], f"case id {key!r} does not match patient_pattern {patient_pattern!r}"))
                continue
            patient = match.group(1) if match.groups() else match.group(0)
        case = {"image": paths[0], "patient": patient}
        if key in label_files:
            if len(label_files[key]) > 1:
                problems.append((paths[0], f"several labels match case id {key!r}: {label_files[key]}"))
                continue
            cases.append({**case, "label": label_files[key][0]})
        elif allow_unlabelled or not label_glob:
            if label_glob:
                logger.info(f"{paths[0]}: no label matching '{label_glob}': used for pre-training (and select) only")
            cases.append(case)
        else:
            problems.append((paths[0], f"no label matching '{label_glob}' for case id {key!r}"))
    for key, paths in label_files.items():
        if key not in images:
            problems.append((paths[0], f"label without an image matching '{image_glob}' (case id {key!r})"))
    if not cases and not problems:
        raise _no_cases(root, "image/label", f"files matching '{image_glob}' (labels: '{label_glob}')")
    names = None if labels is None else _label_names(labels, None if label_values is None else len(label_values))
    return RawDataset(
        kind="folder", root=root, cases=cases, labels=names, channel=channel,
        label_values=None if label_values is None else [int(v) for v in label_values], problems=problems,
        details={"image_glob": image_glob, "label_glob": label_glob, "patient_pattern": patient_pattern},
    )


# ---------------------------------------------------------------- the embedded synthetic data
def synthetic(dataset_dir: str, num_patients: int = 40, seed: int = 0) -> RawDataset:
    """The embedded synthetic volumes: ``scripts.synthetic.write_dataset`` writes ``num_patients`` of them, drawn
    with ``seed``, into ``dataset_dir`` in the ACDC layout (``patientNNN/patientNNN_frame01[_gt].nii.gz``; complete
    pairs already there are kept), and their cases are returned in patient order, one labelled end-diastole volume
    per patient, with the ACDC class names. The only adapter that writes files: the others read a raw folder."""
    from scripts.synthetic import write_dataset

    cases = write_dataset(dataset_dir, num_patients=num_patients, seed=seed)
    return RawDataset(kind="synthetic", root=os.path.abspath(os.fspath(dataset_dir)), cases=cases,
                      labels=dict(ACDC_LABELS), details={"num_patients": num_patients})


# ---------------------------------------------------------------- validation
def _load(path: str):
    from monai.transforms import LoadImage

    return LoadImage(image_only=True, dtype=None)(path)


def _volume(array, channel: int | None, what: str) -> tuple[np.ndarray | None, list[str]]:
    """The 3D array of a loaded file (channel selected), or None and the problems."""
    shape = tuple(array.shape)
    if array.ndim == 4 and shape[-1] == 1:
        return array[..., 0], []
    if array.ndim == 4:
        if channel is None:
            return None, [f"{what} is 4D with {shape[-1]} channels (shape {shape}) where a 3D volume is expected; "
                          "choose a channel"]
        if channel >= shape[-1]:
            return None, [f"{what} has {shape[-1]} channel(s), channel {channel} was asked for"]
        return array[..., channel], []
    if array.ndim != 3:
        return None, [f"{what} is {array.ndim}D (shape {shape}) where a 3D volume is expected"]
    if channel not in (None, 0):
        return None, [f"{what} is 3D (one channel), channel {channel} was asked for"]
    return array, []


def check_case(
    case: dict,
    channel: int | None = None,
    label_values: Sequence[int] | None = None,
    num_partitions: int = 4,
    slice_axis: int | str = "auto",
    percentiles: Sequence[float] = (1.0, 99.0),
) -> list[tuple[str, str]]:
    """Every problem of one case, as (path, message): read each file once and check what training relies on, with
    the pre-processing's own checks (``scripts.transforms``: ``check_size`` before reading, ``intensity_range``,
    ``geometry_problem``, ``label_problem``), so a case accepted here is accepted by the pre-processing.

    ``label_values``: the values a label may hold (None: any non-negative integer). ``percentiles``: the
    normalisation's (lower, upper) percentiles (the data contract's ``normalisation``).
    """
    return _inspect(case, channel, label_values, num_partitions, slice_axis, percentiles)[0]


def _inspect(case, channel, label_values, num_partitions, slice_axis, percentiles=(1.0, 99.0)
             ) -> tuple[list[tuple[str, str]], dict]:
    """(problems, facts): facts are "slices" (along the slice axis) and "max_label" when they could be read."""
    problems, facts = [], {}
    image_path, label_path = case["image"], case.get("label")
    try:
        check_size(image_path)
        loaded = _load(image_path)
    except BundleError as error:
        return [(image_path, str(error).removeprefix(f"{image_path}: "))], facts
    except Exception as error:
        return [(image_path, f"cannot be read ({_first_line(error)})")], facts
    affine = np.asarray(loaded.affine, dtype=np.float64)
    data, found = _volume(np.asarray(loaded), channel, "image")
    problems += [(image_path, p) for p in found]
    if data is not None:
        try:
            intensity_range(data, *percentiles)
        except BundleError as error:
            problems.append((image_path, str(error)))
        axis = choose_slice_axis(affine, slice_axis)
        facts["slices"] = int(data.shape[axis])
        if data.shape[axis] < num_partitions:
            problems.append((image_path, f"{data.shape[axis]} slice(s) along axis {axis}, fewer than "
                                         f"num_partitions = {num_partitions}"))
    if label_path is None:
        return problems, facts
    try:
        check_size(label_path)
        loaded_label = _load(label_path)
    except BundleError as error:
        return problems + [(label_path, str(error).removeprefix(f"{label_path}: "))], facts
    except Exception as error:
        return problems + [(label_path, f"cannot be read ({_first_line(error)})")], facts
    label, found = _volume(np.asarray(loaded_label), None, "label")
    problems += [(label_path, p) for p in found]
    if label is None:
        return problems, facts
    if data is not None:
        mismatch = geometry_problem(data.shape, affine, label.shape, loaded_label.affine)
        if mismatch:
            problems.append((label_path, mismatch))
    found_values = np.unique(label)
    if label_problem(found_values) == "label has non-integer values":
        problems.append((label_path, "label has non-integer values"))
        return problems, facts
    facts["max_label"] = int(found_values.max())
    allowed = None if label_values is None else set(int(v) for v in label_values)
    unexpected = [int(v) for v in found_values if (v < 0 if allowed is None else int(v) not in allowed)]
    if unexpected:
        expected = "non-negative integers" if allowed is None else sorted(allowed)
        problems.append((label_path, f"unexpected label values {unexpected[:10]} (expected {expected})"))
    return problems, facts


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def validate(
    raw: RawDataset,
    num_partitions: int = 4,
    slice_axis: int | str = "auto",
    on_error: str = "raise",
    num_workers: int = 0,
    percentiles: Sequence[float] = (1.0, 99.0),
) -> list[dict]:
    """The cases of ``raw`` that pass ``check_case``, after reporting every problem found.

    ``on_error="raise"``: any problem -> one ValueError listing them all (nothing is written). ``"skip"``: each bad
    volume is left out with a warning; a ValueError only if nothing is left. When ``raw.labels`` is None (a folder
    without class names), the classes become 0..max value found, named "class k".
    """
    if on_error not in ON_ERROR:
        raise BundleError(f"on_error must be one of {ON_ERROR}, got {on_error!r}.")
    allowed = raw.label_values
    if allowed is None and raw.labels is not None:
        allowed = list(range(len(raw.labels)))

    def check(case):
        return _inspect(case, raw.channel, allowed, num_partitions, slice_axis, percentiles)

    if num_workers > 1:
        with ThreadPool(num_workers) as pool:
            found = pool.map(check, raw.cases)
    else:
        found = [check(c) for c in raw.cases]
    problems = list(raw.problems) + [p for case_problems, _ in found for p in case_problems]
    good = [c for c, (case_problems, _) in zip(raw.cases, found) if not case_problems]
    facts = [case_facts for case_problems, case_facts in found if not case_problems]
    if problems:
        for path, message in problems:
            logger.warning(f"{'problem' if on_error == 'raise' else 'skipped'}: {path}: {message}")
        if on_error == "raise":
            first_path, first_message = problems[0]
            raise BundleError(
                f"{len(problems)} problem(s) in the {raw.kind} data at {raw.root} "
                f"({len(raw.cases) - len(good)} of {len(raw.cases)} volumes affected; listed above), the first: "
                f"{first_path}: {first_message}. Nothing was written. Fix or remove these files, or prepare with "
                "--on_error skip to leave them out."
            )
    if not good:
        raise BundleError(f"no usable volume left in {raw.root} ({len(problems)} problem(s)).")
    if raw.labels is None:
        largest = max([f["max_label"] for f in facts if "max_label" in f] + [1])
        raw.labels = {"0": "background", **{str(k): f"class {k}" for k in range(1, largest + 1)}}
    raw.details["slices"] = int(sum(f.get("slices", 0) for f in facts))
    return good


# ---------------------------------------------------------------- cache and datalist
def fill_cache(datalist: dict, cache_dir: str, contract: Mapping, num_workers: int = 0) -> dict[str, int]:
    """Pre-process the volumes of ``datalist`` into the disk cache the workflows read: the "pretrain" images with the
    image-only pre-processing (pretrain.yaml), the "labelled_all" and "validation" pairs with the image + label one
    (train.yaml), both built from the data ``contract`` as the workflows build them (so the cache keys are theirs).
    Returns {"computed": n, "reused": m}."""
    if not cache_dir:
        raise ValueError("fill_cache needs a cache_dir.")
    image_only = build_preprocessing(contract, keys=("image",))
    paired = build_preprocessing(contract, keys=("image", "label"))
    jobs = [CachedVolumes(datalist.get("pretrain", []), image_only, cache_dir)]
    jobs.append(CachedVolumes(datalist.get("labelled_all", []) + datalist.get("validation", []), paired, cache_dir))
    work = [(dataset, i) for dataset in jobs for i in range(len(dataset))]
    reused = sum(os.path.isfile(dataset.cache_file(i)) for dataset, i in work)

    def run(job):
        dataset, i = job
        dataset[i]

    if num_workers > 1:
        with ThreadPool(num_workers) as pool:
            pool.map(run, work)
    else:
        for job in work:
            run(job)
    return {"computed": len(work) - reused, "reused": reused}


def previous_roles(path: str) -> dict[str, str]:
    """Patient id -> "validation" / "test" in the datalist at ``path`` ({} when there is none yet)."""
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            stored = json.load(f)
    except (OSError, ValueError) as error:
        raise BundleError(f"{path}: the earlier datalist cannot be read ({error}): move it away and prepare again.")
    roles = {}
    for role in ("validation", "test"):
        for case in stored.get(role, []) if isinstance(stored, dict) else []:
            roles[case.get("patient")] = role
    if roles:
        logger.info(f"{path}: keeping its {sum(r == 'validation' for r in roles.values())} validation and "
                    f"{sum(r == 'test' for r in roles.values())} test patients")
    return roles


def prepare(
    source: RawDataset,
    dataset_dir: str,
    num_validation: int = 2,
    num_test: int = 20,
    subset_sizes: Sequence[int] = (1, 2, 8),
    num_subsets: Sequence[int] = (5, 5, 3),
    seed: int = 0,
    on_error: str = "raise",
    num_partitions: int = 4,
    preprocessing: Mapping | None = None,
    cache_dir: str | None = None,
    cache_workers: int = 0,
    keep_roles: bool = False,
) -> str:
    """Validate ``source`` (``validate``), split it patient-level (``scripts.data.split_patients``), fill the disk cache
    (``fill_cache``, when ``cache_dir`` is set) and write ``<dataset_dir>/datalist.json`` (last, atomically, so an
    interrupted run leaves the previous datalist or none). Returns the datalist path.

    Besides the lists, the datalist holds the data ``contract`` (``scripts.contract``: the pre-processing settings the
    cache was filled with, channel, class names and raw label values) and ``source`` (layout, raw folder, options,
    skipped files).

    With ``keep_roles``, the validation and test patients of a datalist already in ``dataset_dir`` keep their roles
    (``split_patients``' ``keep``): preparing again after labelling more volumes moves no patient between roles.
    """
    start = time.perf_counter()
    settings = dict(preprocessing or {})
    if not {"image_size", "spacing"} <= set(settings):
        raise BundleError(f"prepare needs the pre-processing settings image_size and spacing, got {settings}.")
    norm = settings.get("normalisation") or {"lower_percentile": 1.0, "upper_percentile": 99.0}
    cases = validate(source, num_partitions, settings.get("slice_axis", "auto"), on_error, cache_workers,
                     (norm["lower_percentile"], norm["upper_percentile"]))
    keep = previous_roles(os.path.join(dataset_dir, "datalist.json")) if keep_roles else None
    datalist = split_patients(cases, num_validation, num_test, subset_sizes, num_subsets, seed=seed, keep=keep)
    kept = {c["image"] for c in cases}
    datalist.update(
        contract=make_contract(class_names=source.labels, channel=source.channel, label_values=source.label_values,
                               **settings),
        source={"kind": source.kind, "raw_dir": source.root, **source.details, "seed": seed,
                "skipped": sorted({c["image"] for c in source.cases} - kept) + [p for p, _ in source.problems]},
    )
    checked = time.perf_counter()
    stats = None
    if cache_dir:
        stats = fill_cache(datalist, cache_dir, datalist["contract"], cache_workers)
    path = write_datalist(os.path.join(dataset_dir, "datalist.json"), datalist)
    lists = {k: len(v) for k, v in datalist.items() if isinstance(v, list)}
    logger.info(
        f"{source.kind}: {len(cases)} volumes of {len({c['patient'] for c in cases})} patients from {source.root} "
        f"({len(source.cases) - len(cases)} skipped); checked in {checked - start:.1f} s"
    )
    if stats is not None:
        logger.info(f"cache {cache_dir}: {stats['computed']} volumes pre-processed, {stats['reused']} reused, "
                    f"in {time.perf_counter() - checked:.1f} s")
    logger.info(f"{source.details.get('slices')} slices in the {len(cases)} volumes; labels: {source.labels}")
    logger.info(f"wrote {path}: " + ", ".join(f"{k} {n}" for k, n in lists.items()))
    return path
