"""Glue that lets MONAI's ``SupervisedTrainer`` run the fine-tuning and contrastive pre-training steps unchanged.

The trainer's default iteration computes ``loss(network(inputs), targets)``. For fine-tuning, ``AugmentedBatch`` is
its ``prepare_batch``: the batch's slices and labels augmented together on the device. For pre-training,
``ContrastiveViews`` is its ``prepare_batch``: it turns a batch of B slices into V augmented views (V*B images, on
the device) and a metadata dict as the "targets"; ``MetadataLoss`` calls a contrastive loss with that metadata.
AMP, gradient accumulation, events and handlers all come from the trainer.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence

import torch
from monai.handlers import MetricsSaver
from torch import nn

METADATA_KEYS = ("volume", "partition", "sample", "position")


class ContrastiveViews:
    """``prepare_batch`` for pre-training.

    Args:
        augment: a callable on a batch tensor (B, C, H, W) -> (B, C, H, W) with independent random draws per slice.
        num_views: V, augmented views per slice (the paper: 2).
        channels_last: return the views in channels_last memory format (faster convolutions on GPU).

    Call: ``(batchdata, device, non_blocking) -> (views (V*B, C, H, W), metadata)`` where ``metadata`` holds
    "volume", "partition", "position" repeated per view and "sample" = the slice's index within this batch, so the
    V views of one slice share it (view-major order: all first views, then all second views, ...).
    """

    def __init__(self, augment: Callable[[torch.Tensor], torch.Tensor], num_views: int = 2, channels_last: bool = False):
        if num_views < 1:
            raise ValueError(f"num_views must be >= 1, got {num_views}.")
        self.augment, self.num_views, self.channels_last = augment, num_views, channels_last

    def __call__(self, batchdata: dict, device: torch.device | str | None = None, non_blocking: bool = False, **_):
        images = torch.as_tensor(batchdata["image"]).to(device=device, non_blocking=non_blocking)
        views = torch.cat([self.augment(images) for _ in range(self.num_views)])
        if self.channels_last:
            views = views.contiguous(memory_format=torch.channels_last)
        metadata = {
            key: torch.as_tensor(batchdata[key]).to(device=device, non_blocking=non_blocking).repeat(self.num_views)
            for key in ("volume", "partition", "position")
        }
        metadata["sample"] = torch.arange(images.shape[0], device=images.device).repeat(self.num_views)
        return views, metadata


class AugmentedBatch:
    """``prepare_batch`` for fine-tuning: the batch moved to the device, then augmented there.

    Args:
        augment: dict of batch tensors -> dict, e.g. ``Compose([RandSpatialAugmentd(["image", "label"])])``.
        keys: the (input, target) entries of the batch.

    Call: ``(batchdata, device, non_blocking) -> (image (B, C, H, W), label (B, 1, H, W))``, augmented together.
    """

    def __init__(self, augment: Callable[[dict], dict], keys: Sequence[str] = ("image", "label")):
        self.augment, self.keys = augment, tuple(keys)

    def __call__(self, batchdata: dict, device: torch.device | str | None = None, non_blocking: bool = False, **_):
        data = {k: torch.as_tensor(batchdata[k]).to(device=device, non_blocking=non_blocking) for k in self.keys}
        data = self.augment(data)
        return data[self.keys[0]], data[self.keys[1]]


class MetadataLoss(nn.Module):
    """Calls ``loss(pred, **metadata)`` for the metadata keys ``loss.forward`` accepts (trainer: ``loss(pred, target)``)."""

    def __init__(self, loss: nn.Module):
        super().__init__()
        self.loss = loss
        accepted = inspect.signature(loss.forward).parameters
        self.keys = tuple(k for k in METADATA_KEYS if k in accepted)

    def forward(self, pred: torch.Tensor, metadata: dict) -> torch.Tensor:
        return self.loss(pred, **{k: metadata[k] for k in self.keys})


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    """Parameters with ``requires_grad`` (e.g. everything but the frozen encoder in the local stage)."""
    return [p for p in module.parameters() if p.requires_grad]


def loss_value(output) -> float:
    """The ``"loss"`` of an engine output: a dict (``decollate=False``) or a list of decollated dicts."""
    first = output[0] if isinstance(output, (list, tuple)) else output
    return float(first["loss"])


class LossProgressBar:
    """A MONAI-style handler: a tqdm bar over the iterations of each epoch, showing the current loss."""

    def __init__(self, desc: str = "train", mininterval: float = 2.0):
        from ignite.handlers import ProgressBar

        self.bar = ProgressBar(persist=True, desc=desc, ncols=100, mininterval=mininterval)

    def attach(self, engine) -> None:
        self.bar.attach(engine, output_transform=lambda output: {"loss": loss_value(output)})


class NamedMetricsSaver(MetricsSaver):
    """MONAI's ``MetricsSaver`` whose per-class columns and rows carry the class names (``class_names``, foreground
    classes in order) instead of ``class0, class1, ...``; everything else is MONAI's."""

    def __init__(self, class_names: Sequence[str], **kwargs):
        super().__init__(**kwargs)
        self.class_names = [str(n) for n in class_names]

    def __call__(self, engine) -> None:
        # MetricsSaver does not pass class labels on to write_metrics_reports (monai 1.6): supply them for this call
        import monai.handlers.metrics_saver as saver

        original = saver.write_metrics_reports
        saver.write_metrics_reports = functools.partial(original, class_labels=self.class_names)
        try:
            super().__call__(engine)
        finally:
            saver.write_metrics_reports = original
