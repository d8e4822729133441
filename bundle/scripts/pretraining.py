"""The two pieces of a contrastive pre-training stage that pretrain.yaml's ``global`` and ``local`` stages build the
same way: the data loader and the trainer. Everything else (network, loss, augmentation, optimiser, schedules,
stopping rule, handlers, record) is written per stage in pretrain.yaml.

- ``partition_loader``: the data loader (``scripts.sampler.PartitionBatchSampler`` over ``VolumeSlices``);
- ``stage_trainer``: the trainer, its ``prepare_batch`` the contrastive views (``scripts.engines.ContrastiveViews``).

``settings`` is pretrain.yaml's ``stage_settings``: a mapping with "slices" (``scripts.data.VolumeSlices``),
"num_partitions", "epoch_length" (iterations per epoch), "num_views", "channels_last", "device" and "amp".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from monai.data import DataLoader
from monai.engines import SupervisedTrainer
from torch import nn

from scripts.distributed import data_parallel
from scripts.engines import ContrastiveViews
from scripts.sampler import PartitionBatchSampler

__all__ = ["partition_loader", "stage_trainer"]


def partition_loader(settings: Mapping, volumes_per_batch: int, seed: int, num_workers: int = 0) -> DataLoader:
    """Data loader of a stage: ``settings["epoch_length"]`` batches per epoch, each of ``volumes_per_batch`` volumes
    x ``settings["num_partitions"]`` partitions, one slice per partition (``PartitionBatchSampler``, seeded with
    ``seed``; its ``batch_sampler``). A batch is a dict of (M*S, C, H, W) images and per-slice metadata."""
    slices = settings["slices"]
    sampler = PartitionBatchSampler(slice_counts=slices.slice_counts, volumes_per_batch=volumes_per_batch,
                                    num_partitions=settings["num_partitions"], num_batches=settings["epoch_length"],
                                    seed=seed)
    return DataLoader(dataset=slices, batch_sampler=sampler, num_workers=num_workers)   # MONAI's, as the configs'


def stage_trainer(settings: Mapping, dataloader: DataLoader, network: nn.Module, augmentation, loss: nn.Module,
                  optimizer, handlers: Sequence, max_iterations: int):
    """The stage's ``SupervisedTrainer``: ``max(1, max_iterations // epoch_length)`` epochs of ``dataloader``'s
    batches, each turned into ``settings["num_views"]`` augmented views (``ContrastiveViews``) on the device, the
    ``loss`` called with their metadata. ``network`` runs under ``DistributedDataParallel`` when a process group is
    running (``find_unused_parameters``: the decoder, or the later decoder blocks, get no gradient)."""
    views = ContrastiveViews(augment=augmentation, num_views=settings["num_views"],
                             channels_last=settings["channels_last"])
    return SupervisedTrainer(
        max_epochs=max(1, max_iterations // settings["epoch_length"]), device=settings["device"],
        train_data_loader=dataloader, network=data_parallel(network, find_unused_parameters=True),
        prepare_batch=views, loss_function=loss, optimizer=optimizer, train_handlers=handlers, decollate=False,
        amp=settings["amp"])
