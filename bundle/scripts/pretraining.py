"""One definition of a contrastive pre-training stage: what pretrain.yaml's ``global`` and ``local`` stages share.

A stage is a ``SupervisedTrainer`` over partition-aware batches of unlabelled slices. The two stages differ in their
network, loss, augmentation, optimiser (and schedules), stopping rule and budget, which pretrain.yaml defines per
stage; everything else is built here, the same way for both, from the stage's name and its parts:

- ``partition_loader``: the data loader (``scripts.sampler.PartitionBatchSampler`` over ``VolumeSlices``);
- ``stage_handlers``: progress bar, the stage's schedules, its stopping rule, loss logs (console every epoch,
  TensorBoard under ``<output_dir>/pretrain_<stage>``), the final checkpoint ``<model_dir>/pretrained_<stage>.pt``
  (``{"model": U-Net state_dict, "contract": ...}``), the non-finite-loss guard and the training state
  ``<model_dir>/state_<stage>.pt`` (``--resume``);
- ``stage_trainer``: the trainer, its ``prepare_batch`` the contrastive views (``scripts.engines.ContrastiveViews``).

``settings`` is pretrain.yaml's ``stage_settings``: a mapping with "slices" (``scripts.data.VolumeSlices``),
"num_partitions", "epoch_length" (iterations per epoch), "num_views", "channels_last", "device", "amp",
"model_dir", "output_dir", "contract" (the ``ContractRecord`` saved beside the weights), "state_interval",
"resume" and "quiet" (true on ranks > 0 under torchrun: no handler that writes or prints is made).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from monai.data import DataLoader
from monai.engines import SupervisedTrainer
from monai.handlers import StatsHandler, TensorBoardStatsHandler
from torch import nn

from scripts.checkpoints import CheckpointSaver, NonFiniteGuard, TrainingState
from scripts.distributed import data_parallel
from scripts.engines import ContrastiveViews, LossProgressBar, loss_value
from scripts.sampler import PartitionBatchSampler

__all__ = ["partition_loader", "stage_handlers", "stage_trainer"]


def partition_loader(settings: Mapping, volumes_per_batch: int, seed: int, num_workers: int = 0) -> DataLoader:
    """Data loader of a stage: ``settings["epoch_length"]`` batches per epoch, each of ``volumes_per_batch`` volumes
    x ``settings["num_partitions"]`` partitions, one slice per partition (``PartitionBatchSampler``, seeded with
    ``seed``; its ``batch_sampler``). A batch is a dict of (M*S, C, H, W) images and per-slice metadata."""
    slices = settings["slices"]
    sampler = PartitionBatchSampler(slice_counts=slices.slice_counts, volumes_per_batch=volumes_per_batch,
                                    num_partitions=settings["num_partitions"], num_batches=settings["epoch_length"],
                                    seed=seed)
    return DataLoader(dataset=slices, batch_sampler=sampler, num_workers=num_workers)   # MONAI's, as the configs'


def stage_handlers(
    stage: str,
    settings: Mapping,
    network: nn.Module,
    optimizer,
    stop,
    augmentation,
    dataloader: DataLoader,
    run: Mapping,
    schedules: Sequence = (),
    state: Mapping | None = None,
) -> list:
    """The handlers of stage ``stage`` ("global" or "local"), in the order they are attached.

    Args:
        stage: the stage's name; it names the logs, the files and the stage in messages and training states.
        settings: pretrain.yaml's ``stage_settings`` (module docstring).
        network: the stage's network; its ``unet`` is what ``pretrained_<stage>.pt`` holds.
        optimizer: the stage's optimiser (saved in the training state).
        stop: the stage's stopping rule (``scripts.engines.PlateauStop``; saved in the training state).
        augmentation: the views' augmentation; its random transforms' states are saved in the training state.
        dataloader: from ``partition_loader``; its batch sampler's epoch follows the trainer's.
        run: what determines the stage's result (``TrainingState``'s ``run``).
        schedules: handlers that set a value every iteration (learning rate, crop area), attached after the
            progress bar and before the stopping rule.
        state: further entries of the training state (e.g. ``{"lr_schedule": ...}``), saved after the optimiser.

    Returns:
        [progress bar, *schedules, stop, console log, TensorBoard log, final checkpoint, non-finite guard, training
        state]; those that write or print are left out when ``settings["quiet"]``.
    """
    quiet, epoch_length = bool(settings["quiet"]), settings["epoch_length"]
    model_dir, tag = settings["model_dir"], f"{stage}_loss"
    handlers = [] if quiet else [LossProgressBar(desc=f"pretrain-{stage}")]
    handlers += [*schedules, stop]
    if not quiet:
        handlers += [
            StatsHandler(tag_name=tag, iteration_log=lambda engine, event: event % epoch_length == 0,
                         output_transform=loss_value),
            TensorBoardStatsHandler(log_dir=f"{settings['output_dir']}/pretrain_{stage}", tag_name=tag,
                                    output_transform=loss_value),
            CheckpointSaver(save_dir=model_dir, save_dict={"model": network.unet, "contract": settings["contract"]},
                            save_final=True, final_filename=f"pretrained_{stage}.pt"),
        ]
    handlers += [
        NonFiniteGuard(stage=stage),
        TrainingState(path=f"{model_dir}/state_{stage}.pt", stage=stage,
                      save_dict={"model": network, "optimizer": optimizer, **(state or {}), "stop": stop},
                      randomizables=augmentation, samplers=[dataloader.batch_sampler],
                      interval=settings["state_interval"], resume=settings["resume"], run=run),
    ]
    return handlers


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
