"""Self-training with pseudo-labels (overlay self_training.yaml): a fine-tuned model labels the unlabelled pool,
what it is confident about is kept, and fine-tuning then takes the labelled and the pseudo-labelled volumes.

A pseudo-label set is one file, written atomically (``atomic_save``; loads with ``weights_only=True``)::

    {"format": PSEUDO_FORMAT,
     "provenance": {"model": path, "model_sha256": hex, "threshold": float, "mode": "voxel" | "volume",
                    "contract": the data contract, "datalist": path, "key": datalist key, "round": int,
                    "kept": volumes kept, "dropped": volumes dropped},
     "volumes": [{"image": absolute path, "label": (1, H, W, Z) uint8, "confidence": mean top probability}]}

The labels lie on the pre-processed grid of the contract (the grid the network sees; ``CachedVolumes`` gives the
images on it), so they are never resampled. ``mode`` "voxel": every volume is kept and a voxel whose top softmax
probability is below ``threshold`` gets ``IGNORE`` (no loss there: ``IgnoreMaskedLoss``); "volume": a volume is kept,
whole, when its voxels' mean top probability reaches ``threshold``.

``PseudoLabelled`` reads a set back for fine-tuning and refuses, in one line, a set made by another model (its
``model_sha256`` differs from the checkpoint named as its source) or for another data contract.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence

import torch
from torch.utils.data import Dataset

from scripts.contract import KEYS, differences
from scripts.errors import BundleError
from scripts.files import atomic_save, file_hash, safe_load

__all__ = ["PSEUDO_FORMAT", "IGNORE", "pseudo_label", "PseudoLabelled", "IgnoreMaskedLoss", "exclude_images"]

logger = logging.getLogger(__name__)

PSEUDO_FORMAT = "contrastive-seg-pseudo-labels/1"
IGNORE = 255  # the label value of voxels below the confidence threshold ("voxel" mode)


def exclude_images(volumes: Sequence[Mapping], exclude: Sequence[Mapping]) -> list[dict]:
    """The entries of ``volumes`` whose "image" is not among ``exclude``'s (the labelled training volumes, which
    need no pseudo-label)."""
    skip = {os.path.abspath(e["image"]) for e in exclude}
    return [dict(v) for v in volumes if os.path.abspath(v["image"]) not in skip]


@torch.no_grad()
def pseudo_label(checkpoint: str, network: torch.nn.Module, volumes: Dataset, path: str, threshold: float,
                 mode: str, contract: Mapping, datalist: str, key: str, round: int = 1, batch_size: int = 32,
                 device: torch.device | str = "cpu") -> dict:
    """Predict every volume of ``volumes`` with the model in ``checkpoint`` and write the pseudo-label set ``path``.

    Args:
        checkpoint: the fine-tuned model ({"model", "contract"}, train.yaml's model.pt); its contract must be
            ``contract``'s (pre-processing and classes).
        network: a ``UNet2D`` of the checkpoint's shape (its weights are replaced).
        volumes: pre-processed volumes, items {"image": (1, H, W, Z)} (``CachedVolumes``, image only), whose
            ``data`` lists the entries (their "image" paths go into the set).
        path: the file to write.
        threshold: confidence threshold in (0, 1].
        mode: "voxel" or "volume" (module docstring).
        contract: the data contract in force.
        datalist, key, round: recorded in the provenance.
        batch_size: slices per forward pass.
        device: where the network runs.

    Returns:
        the provenance written.
    """
    if mode not in ("voxel", "volume") or not 0 < threshold <= 1:
        raise BundleError(f"pseudo-labels: mode must be 'voxel' or 'volume' and threshold in (0, 1], got {mode!r} "
                          f"and {threshold}.")
    state = safe_load(checkpoint, what="fine-tuned model")
    found = differences(state.get("contract") or {}, contract, KEYS)
    if found:
        raise BundleError(f"fine-tuned model {checkpoint} was trained under another data contract "
                          f"({'; '.join(f'{k} = {a!r} there, {b!r} here' for k, a, b in found)}): it cannot label "
                          "this data.")
    network.load_state_dict(state["model"])
    network.to(device).eval()
    kept, dropped = [], 0
    for index in range(len(volumes)):
        image = torch.as_tensor(volumes[index]["image"]).to(device)  # (1, H, W, Z)
        slices = image.permute(3, 0, 1, 2)  # (Z, 1, H, W)
        probabilities = torch.cat([network(slices[i:i + batch_size].float()).softmax(1)
                                   for i in range(0, slices.shape[0], batch_size)])  # (Z, K, H, W)
        confidence, label = probabilities.max(1)  # (Z, H, W)
        mean_confidence = float(confidence.mean())
        if mode == "volume" and mean_confidence < threshold:
            dropped += 1
            continue
        label = label.to(torch.uint8)
        if mode == "voxel":
            label[confidence < threshold] = IGNORE
        entry = volumes.data[index]
        kept.append({"image": os.path.abspath(entry["image"]), "label": label.permute(1, 2, 0)[None].cpu(),
                     "confidence": mean_confidence})
    provenance = {"model": os.path.abspath(checkpoint), "model_sha256": file_hash(checkpoint),
                  "threshold": float(threshold), "mode": mode, "contract": dict(contract),
                  "datalist": os.path.abspath(datalist), "key": key, "round": int(round), "kept": len(kept),
                  "dropped": dropped}
    atomic_save({"format": PSEUDO_FORMAT, "provenance": provenance, "volumes": kept}, path)
    logger.info(f"pseudo-labels round {round}: {len(kept)} volumes kept, {dropped} dropped (mode {mode}, threshold "
                f"{threshold}) -> {path}")
    return provenance


class PseudoLabelled(Dataset):
    """The pseudo-labelled volumes of the set ``path`` as fine-tuning items {"image", "label"} (pre-processed, as
    ``CachedVolumes`` gives them), after checking where the set comes from.

    Args:
        path: the pseudo-label set (``pseudo_label``).
        model: the checkpoint the set must come from: its sha256 must be the set's ``model_sha256``.
        contract: the data contract in force: the set's must be the same.
        volumes: the pre-processed unlabelled volumes (``CachedVolumes``, image only) holding the set's images.

    Raises:
        BundleError: (one line) the file is not a pseudo-label set, comes from another model or contract, or names
            an image ``volumes`` does not hold.
    """

    def __init__(self, path: str, model: str, contract: Mapping, volumes: Dataset):
        state = safe_load(path, what="pseudo-label set")
        if not isinstance(state, Mapping) or state.get("format") != PSEUDO_FORMAT:
            raise BundleError(f"pseudo-label set {path}: not a pseudo-label file of this bundle (run pseudo_label).")
        provenance = state["provenance"]
        sha = file_hash(model)
        if provenance["model_sha256"] != sha:
            raise BundleError(f"pseudo-label set {path} was made by another model (sha256 "
                              f"{provenance['model_sha256'][:12]}, {provenance['model']}) than {model} (sha256 "
                              f"{sha[:12]}): run pseudo_label again with this model.")
        found = differences(provenance["contract"], contract, KEYS)
        if found:
            raise BundleError(f"pseudo-label set {path} was made for another data contract "
                              f"({'; '.join(f'{k} = {a!r} there, {b!r} here' for k, a, b in found)}): run "
                              "pseudo_label again on this data.")
        where = {os.path.abspath(entry["image"]): i for i, entry in enumerate(volumes.data)}
        missing = [v["image"] for v in state["volumes"] if v["image"] not in where]
        if missing:
            raise BundleError(f"pseudo-label set {path} labels {missing[0]}, which is not among the unlabelled "
                              "volumes of this datalist: run pseudo_label again on this data.")
        self.provenance, self.volumes = provenance, volumes
        self.items = [(where[v["image"]], v["label"]) for v in state["volumes"]]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        volume, label = self.items[index]
        image = self.volumes[volume]["image"]
        if tuple(image.shape[1:]) != tuple(label.shape[1:]):
            raise BundleError(f"pseudo-label of {self.volumes.data[volume]['image']}: shape {tuple(label.shape)} "
                              f"does not fit its pre-processed image {tuple(image.shape)}.")
        return {"image": image, "label": label.to(torch.float32)}  # as CachedVolumes gives labels


class IgnoreMaskedLoss(torch.nn.Module):
    """Soft Dice + cross-entropy (``scripts.semi_supervised.masked_dice_ce``) that leaves out the voxels labelled
    ``ignore`` (a label map (B, 1, H, W) of class indices, as the fine-tuning loss takes it).

    With no ignored voxel it equals MONAI's ``DiceCELoss(include_background=True, to_onehot_y=True, softmax=True)``
    with the same weights."""

    def __init__(self, dice_weight: float = 1.0, ce_weight: float = 1.0, ignore: int = IGNORE):
        super().__init__()
        self.dice_weight, self.ce_weight, self.ignore = float(dice_weight), float(ce_weight), int(ignore)

    def forward(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        from scripts.semi_supervised import masked_dice_ce

        if label.shape[1] != 1:
            raise BundleError("self-training's loss takes class-index labels (B, 1, H, W); Mixup (mixup_alpha > 0) "
                              "does not combine with it.")
        target = label[:, 0].long()
        mask = (target != self.ignore).float()
        return masked_dice_ce(logits, target, mask, self.dice_weight, self.ce_weight)
