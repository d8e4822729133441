"""The data contract: one record of how images become network inputs and what the network's outputs mean.

A contract is a plain dict (it travels inside checkpoints loaded with ``weights_only=True`` and inside JSON files):

- pre-processing: ``image_size`` (slice side), ``spacing`` (in-plane mm), ``slice_axis`` ("auto" or 0/1/2),
  ``placeholder_spacing`` (mm assumed for a placeholder affine; None: fit the longer side to image_size),
  ``channel`` (channel of 4D images; None: 3D images), ``normalisation`` (percentiles mapped to 0 and 1);
- classes: ``class_names`` (background first), ``num_classes``, ``label_values`` (raw value of each class in the
  label files; None: the files hold class indices).

It is written once, when data are prepared (``datalist.json``, key ``contract``), and copied into every checkpoint
the workflows write (``{"model": state_dict, "contract": {...}}``) and into the shipped ``metadata.json`` (key
``data_contract``). Every later stage takes its settings from ``resolve``: the contract of the data it reads and of
the checkpoint it starts from must agree (``transfer: true`` lets fine-tuning adopt new data on purpose, each
difference logged), and a value given in the config or on the command line must agree with the contract.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence

from scripts.errors import BundleError, MissingFileError
from scripts.files import atomic_write_json, safe_load

logger = logging.getLogger(__name__)

PREPROCESSING_KEYS = ("image_size", "spacing", "slice_axis", "placeholder_spacing", "channel", "normalisation")
CLASS_KEYS = ("num_classes", "class_names", "label_values")
KEYS = PREPROCESSING_KEYS + CLASS_KEYS
DEFAULT_NORMALISATION = {"lower_percentile": 1.0, "upper_percentile": 99.0}
CONTRACT_ENTRY = {"datalist": "contract", "metadata": "data_contract", "checkpoint": "contract"}


def make_contract(
    image_size: int,
    spacing: float,
    class_names: Sequence[str] | Mapping[str, str],
    slice_axis: int | str = "auto",
    placeholder_spacing: float | None = None,
    channel: int | None = None,
    label_values: Sequence[int] | None = None,
    normalisation: Mapping | None = None,
) -> dict:
    """A contract dict with normalised values; ``class_names`` is a list (background first) or a {"index": name}
    mapping as datalists store it."""
    if isinstance(class_names, Mapping):
        class_names = [class_names[k] for k in sorted(class_names, key=int)]
    class_names = [str(n) for n in class_names]
    if len(class_names) < 2:
        raise BundleError(f"a data contract needs at least 2 classes (background + one), got {class_names}.")
    if label_values is not None and len(label_values) != len(class_names):
        raise BundleError(f"label_values {list(label_values)} and class names {class_names} differ in length.")
    slice_axis = slice_axis if slice_axis == "auto" else int(slice_axis)
    return {
        "image_size": int(image_size),
        "spacing": float(spacing),
        "slice_axis": slice_axis,
        "placeholder_spacing": None if placeholder_spacing is None else float(placeholder_spacing),
        "channel": None if channel is None else int(channel),
        "normalisation": {k: float(v) for k, v in dict(normalisation or DEFAULT_NORMALISATION).items()},
        "num_classes": len(class_names),
        "class_names": class_names,
        "label_values": None if label_values is None else [int(v) for v in label_values],
    }


def _check(contract, source: str) -> dict:
    if not isinstance(contract, Mapping) or set(contract) != set(KEYS):
        found = sorted(contract) if isinstance(contract, Mapping) else type(contract).__name__
        raise BundleError(f"{source}: the data contract is malformed (keys {found}, expected {sorted(KEYS)}).")
    return dict(contract)


def read_contract(path: str, kind: str) -> dict | None:
    """The contract stored in a ``kind`` file ("datalist", "metadata" or "checkpoint") at ``path``; None when the file
    carries none (a datalist or checkpoint written before contracts existed)."""
    if kind == "checkpoint":
        content = safe_load(path)
        if not isinstance(content, Mapping):
            raise BundleError(f"checkpoint {path} holds a {type(content).__name__}, not a state_dict.")
    else:
        if not os.path.isfile(path):
            raise MissingFileError(f"{kind} file {path} not found.")
        try:
            with open(path) as f:
                content = json.load(f)
        except (OSError, ValueError) as error:
            raise BundleError(f"{kind} file {path} is not readable JSON ({error}).") from error
    contract = content.get(CONTRACT_ENTRY[kind])
    return None if contract is None else _check(contract, path)


def differences(a: Mapping, b: Mapping, keys: Sequence[str] = KEYS) -> list[tuple[str, object, object]]:
    """(key, value in a, value in b) for every key where the two contracts disagree."""
    return [(k, a.get(k), b.get(k)) for k in keys if a.get(k) != b.get(k)]


def _describe(found: list[tuple[str, object, object]], first: str, second: str) -> str:
    return "; ".join(f"{k} = {x!r} in {first} but {y!r} in {second}" for k, x, y in found)


def resolve(
    data: str | None = None,
    model: str | None = None,
    fallback: str | None = None,
    overrides: Mapping | None = None,
    transfer: bool = False,
    model_optional: bool = False,
) -> dict:
    """The contract a workflow runs with.

    Args:
        data: the datalist of the data the workflow reads (ignored when the file does not exist, e.g. under MONAI
            Label, which hands over its own data lists).
        model: the checkpoint the workflow starts from or applies (must exist).
        fallback: a metadata.json whose ``data_contract`` is used when neither ``data`` nor ``model`` carries one.
        overrides: values given in the config / on the command line (None entries: not given); each must agree with
            the contract (``class_names`` may also be a {"index": name} mapping).
        transfer: fine-tuning on purpose on data whose contract differs from ``model``'s (new classes, another
            resolution): the data's contract wins and each difference is logged. Otherwise they must agree.
        model_optional: a ``model`` file that does not exist is passed over with a warning (``fallback`` then gives
            the contract): the network of a bundle without weights can still be built, e.g. by the model zoo's
            ``verify_net_in_out`` or ``ckpt_export`` of another checkpoint. A file that exists still wins.

    Raises ``BundleError`` naming both values and their files on any disagreement.
    """
    d = read_contract(data, "datalist") if data and os.path.isfile(data) else None
    if model and model_optional and not os.path.isfile(model):
        logger.warning(f"{model} not found: the network is built from {fallback or 'the data'}'s data contract; "
                       "running the workflow needs the checkpoint.")
        model = None
    m = read_contract(model, "checkpoint") if model else None
    if model and m is None:
        logger.warning(f"{model} carries no data contract (written by an older version): its pre-processing "
                       "cannot be checked.")
    disagreement = differences(d, m) if d is not None and m is not None else []
    if disagreement:
        text = _describe(disagreement, data, model)
        if not transfer:
            raise BundleError(f"the data and the checkpoint disagree: {text}. Prepare the data with the checkpoint's "
                              "settings, or pass --transfer True to fine-tune on this data on purpose.")
        logger.warning(f"transfer: the fine-tuning data's contract replaces the checkpoint's: {text}.")
    contract, source = (d, data) if d is not None else (m, model)
    if contract is None and fallback:
        contract, source = read_contract(fallback, "metadata"), fallback
    if contract is None:
        raise BundleError("no data contract found: prepare the data (prepare.yaml writes datalist.json) or give a "
                          "checkpoint or metadata.json that carries one.")
    _check_overrides(contract, source, overrides or {})
    logger.info(f"data contract from {source}: image_size {contract['image_size']}, spacing {contract['spacing']} mm, "
                f"classes {contract['class_names']}")
    return contract


def _check_overrides(contract: Mapping, source: str, overrides: Mapping) -> None:
    for key, value in overrides.items():
        if key not in KEYS:
            raise BundleError(f"'{key}' is not a data contract entry (one of {', '.join(KEYS)}).")
        if value is None:
            continue
        if key == "class_names" and isinstance(value, Mapping):
            value = [value[k] for k in sorted(value, key=int)]
        expected = contract[key]
        same = value == expected
        if not same and isinstance(expected, (int, float)) and not isinstance(expected, bool):
            try:
                same = float(value) == float(expected)
            except (TypeError, ValueError):
                same = False
        if not same and key == "slice_axis":
            same = str(value) == str(expected)
        if not same:
            raise BundleError(f"--{key} {value!r} contradicts {key} = {expected!r} in the data contract of {source}; "
                              "drop the override (the contract sets it) or prepare the data / train the model again "
                              "with the value you want.")


def preprocessing_arguments(contract: Mapping, label: bool = False) -> dict:
    """Keyword arguments of ``scripts.transforms.preprocessing`` from a contract (``label``: include the labels'
    raw values and the class count)."""
    arguments = {k: contract[k] for k in ("image_size", "spacing", "slice_axis", "placeholder_spacing", "channel")}
    norm = contract["normalisation"]
    arguments.update(lower_percentile=norm["lower_percentile"], upper_percentile=norm["upper_percentile"])
    if label:
        arguments.update(label_values=contract["label_values"], num_classes=contract["num_classes"])
    return arguments


def check_checkpoint(state: Mapping, path: str, contract: Mapping) -> None:
    """Refuse the checkpoint ``state`` (loaded from ``path``) when its contract's pre-processing differs from
    ``contract`` (e.g. the global stage's output reused by the local stage with other settings)."""
    own = state.get(CONTRACT_ENTRY["checkpoint"])
    found = [] if own is None else differences(_check(own, path), contract, PREPROCESSING_KEYS)
    if found:
        raise BundleError(f"checkpoint {path} was trained with other pre-processing: "
                          f"{_describe(found, path, 'the data contract')}.")


class ContractRecord:
    """The contract as an object that ignite's checkpoint handlers can save (``state_dict``) beside the model:
    ``CheckpointSaver(save_dict={"model": net, "contract": ContractRecord(contract)})``."""

    def __init__(self, contract: Mapping):
        self.contract = _check(contract, "ContractRecord")

    def state_dict(self) -> dict:
        return dict(self.contract)

    def load_state_dict(self, state: Mapping) -> None:
        self.contract = _check(state, "ContractRecord.load_state_dict")


def metadata_entries(contract: Mapping) -> dict:
    """The metadata.json entries that describe a contract: ``data_contract`` and the class names of
    ``network_data_format.outputs.pred.channel_def`` (what MONAI Label lists as labels)."""
    names = {str(i): name for i, name in enumerate(contract["class_names"])}
    listing = ", ".join(f"{i} {name}" for i, name in names.items())
    return {"data_contract": dict(contract), "channel_def": names, "label_classes": listing, "pred_classes": listing}


def update_metadata(meta: dict, contract: Mapping) -> dict:
    """``meta`` (a parsed metadata.json) with ``contract`` recorded: ``data_contract``, the class names of the
    prediction's ``channel_def`` (what MONAI Label lists), the label and prediction class descriptions and the
    input's spatial shape. Returns ``meta``, changed in place."""
    entries = metadata_entries(contract)
    meta["data_contract"] = entries["data_contract"]
    meta["label_classes"], meta["pred_classes"] = entries["label_classes"], entries["pred_classes"]
    fmt = meta["network_data_format"]
    fmt["inputs"]["image"]["spatial_shape"] = [contract["image_size"]] * 2
    fmt["outputs"]["pred"]["num_channels"] = contract["num_classes"]
    fmt["outputs"]["pred"]["spatial_shape"] = [contract["image_size"]] * 2
    fmt["outputs"]["pred"]["channel_def"] = entries["channel_def"]
    return meta


def write_metadata(checkpoint: str, metadata_file: str) -> dict:
    """Copy the contract of ``checkpoint`` into ``metadata_file`` (``update_metadata``), atomically. Returns the
    contract."""
    contract = read_contract(checkpoint, "checkpoint")
    if contract is None:
        raise BundleError(f"checkpoint {checkpoint} carries no data contract: train it again with this version.")
    with open(metadata_file) as f:
        meta = update_metadata(json.load(f), contract)
    atomic_write_json(meta, metadata_file, indent=4)
    return contract


def build_preprocessing(contract: Mapping, keys: Sequence[str] = ("image", "label"), load: bool = True):
    """``scripts.transforms.preprocessing`` with the contract's settings for ``keys`` (the first is the image; label
    keys get the contract's label remapping)."""
    from scripts.transforms import preprocessing

    return preprocessing(keys=keys, load=load, **preprocessing_arguments(contract, label=len(tuple(keys)) > 1))
