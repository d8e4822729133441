"""Speed and memory benchmark of the contrastive losses, and of the data pipeline (``make bench`` or
``PYTHONPATH=bundle python -m study.benchmark``; repository tooling, not shipped in the bundle; docs/performance.md).

Four measurements, each printed as a plain-text table:

1. ``global``: :class:`~scripts.losses.GlobalContrastiveLoss` forward + backward for every strategy against the
   batch size N (embeddings N x 128; metadata of a partition-aware batch: M volumes x S partitions x V views,
   view-major as :class:`~scripts.engines.ContrastiveViews` builds it).
2. ``local``: :class:`~scripts.losses.LocalContrastiveLoss` forward + backward for every strategy and region mode
   against the batch size (images) and the number of regions K, on C x H x W feature maps (default 64 x 48 x 48:
   the output of decoder block 3 for 192 x 192 slices).
3. ``step``: the loss's share of a whole pre-training step. A step is what the trainer runs per iteration:
   augmentation of V views on the device, network forward, loss, backward, Adam step. The global stage is
   ``GlobalContrastiveNet`` on M x S slices x V views (paper: 4 x 4 x 2 = 32 images); the local stage is
   ``LocalContrastiveNet(decoder_blocks=3)`` (frozen encoder) on M x S slices x V views (paper: 12 x 2 = 24
   images). The loss alone is forward + backward on inputs of the shape the network produces. The share is
   ``loss time / step time``. ``--paper`` measures at 192 x 192 (the paper's slice size); the default is a reduced
   size (64 x 64) so the whole run stays short on a CPU.
4. ``pipeline``: for each stage (global, local, fine-tuning, consistency fine-tuning), the real workflow's
   throughput (the bundle's configs: cached data, sampler, data loader, augmentation, step) against the model
   step alone on a ready batch, in images/s, and their ratio (``study/pipeline_bench.py``; one line
   ``stage=... pipeline=... model=... ratio=...`` per stage).

``--paper`` also extends the local sweep to N = 48 images (at K = 256 dense regions that is ~0.9 GiB and ~2 s a call
on 2 CPU cores). Every run reports how much CPU time *other* processes took meanwhile: on a busy machine the
timings are not trustworthy (a warning is printed above 5%).

Times are the median wall-clock time of ``repeats`` calls after ``warmup`` calls (on CUDA with
``torch.cuda.synchronize`` around each call); a call stops being repeated once ``max_seconds`` have passed and at
least 3 repeats were made (the ``reps`` column). The forward + backward of a loss is ``torch.autograd.grad`` of
the loss with respect to its input tensor (no gradient accumulation).

Peak memory ("peak MiB") is the peak, during one call, of the tensor memory allocated *in addition to* what was
allocated before the call (inputs, parameters, optimizer state are therefore not counted; gradients and
activations created in the call are). On CUDA it is ``torch.cuda.max_memory_allocated`` minus the allocation at
the start; on CPU it is the running sum of the allocation and free events that ``torch.profiler`` records with
``profile_memory=True``, in time order (one extra, profiled call; the allocator's caching and the process's RSS
are not included; a block allocated before the call and freed in it is not recorded, so the number can only err
upwards by such blocks).

Examples::

    PYTHONPATH=bundle python -m study.benchmark                     # all four, reduced sizes (~6 min, 2 CPUs)
    PYTHONPATH=bundle python -m study.benchmark --paper             # + step share at 192 x 192, local N up to 48
    PYTHONPATH=bundle python -m study.benchmark --parts step --paper  # only the step share at 192 x 192
    PYTHONPATH=bundle python -m study.benchmark --parts step --image_size 128 --output runs/bench.json
    PYTHONPATH=bundle python -m study.benchmark --device cuda --global_batch_sizes "[32,64,128,256,512]"
    PYTHONPATH=bundle python -m study.benchmark --parts pipeline --pipeline_overrides "{'num_workers': 0}"
"""

from __future__ import annotations

import csv
import json
import os
import time
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from scripts.engines import ContrastiveViews, MetadataLoss, trainable_parameters
from scripts.losses import (
    GLOBAL_STRATEGIES,
    LOCAL_STRATEGIES,
    GlobalContrastiveLoss,
    LocalContrastiveLoss,
    global_pair_masks,
)
from scripts.networks import GlobalContrastiveNet, LocalContrastiveNet, UNet2D
from scripts.transforms import RandBrightnessContrast, RandCropResize
from study.measure import MIB, OtherCpuLoad, environment, measure_peak_memory, measure_time, memory_note
from study.progress import progress

__all__ = [
    "partition_batch_metadata",
    "bench_global_loss",
    "bench_local_loss",
    "bench_step_share",
    "format_table",
    "main",
]

PARTS = ("global", "local", "step", "pipeline")

# ----------------------------------------------------------------------------------------------------------------
# measuring a loss
# ----------------------------------------------------------------------------------------------------------------


def _loss_fn_and_grad(loss: nn.Module, inputs: Tensor, metadata: dict[str, Tensor]) -> Callable[[], None]:
    """A closure running the loss forward and its backward to ``inputs`` (torch.autograd.grad, no accumulation)."""
    call = MetadataLoss(loss)

    def run() -> None:
        value = call(inputs, metadata)
        torch.autograd.grad(value, inputs)

    return run


def _time_and_memory(fn, device, repeats, warmup, max_seconds) -> dict:
    time_ms, reps = measure_time(fn, device, repeats=repeats, warmup=warmup, max_seconds=max_seconds)
    peak = measure_peak_memory(fn, device)
    return {"time_ms": time_ms, "reps": reps, "peak_mib": peak / MIB}


# ----------------------------------------------------------------------------------------------------------------
# batches
# ----------------------------------------------------------------------------------------------------------------


def partition_batch_metadata(
    num_slices: int,
    num_partitions: int = 4,
    num_views: int = 2,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> dict[str, Tensor]:
    """Metadata of a partition-aware batch of ``num_slices`` slices, each in ``num_views`` views (view-major).

    Slice s comes from volume ``s // num_partitions`` and partition ``s % num_partitions`` (so a multiple of S
    slices is M whole volumes x S partitions, as :class:`~scripts.sampler.PartitionBatchSampler` draws them);
    its position is drawn uniformly inside its partition. Keys: volume, partition, sample, position, each of
    length ``num_slices * num_views``, ordered as :class:`~scripts.engines.ContrastiveViews` orders them.
    """
    if num_slices < 1 or num_partitions < 1 or num_views < 1:
        raise ValueError(f"need positive sizes, got {num_slices=}, {num_partitions=}, {num_views=}.")
    g = torch.Generator().manual_seed(seed)
    slices = torch.arange(num_slices)
    partition = slices % num_partitions
    meta = {
        "volume": slices // num_partitions,
        "partition": partition,
        "sample": slices,
        "position": (partition + torch.rand(num_slices, generator=g, dtype=torch.float64)) / num_partitions,
    }
    return {key: value.repeat(num_views).to(device) for key, value in meta.items()}


def _slices_for(num_images: int, num_views: int) -> int:
    if num_images % num_views:
        raise ValueError(f"a batch of {num_images} images is not a whole number of slices x {num_views} views.")
    return num_images // num_views


# ----------------------------------------------------------------------------------------------------------------
# 1. global loss
# ----------------------------------------------------------------------------------------------------------------


def bench_global_loss(batch_sizes: Sequence[int] = (16, 32, 48, 96, 192), strategies: Sequence[str] = GLOBAL_STRATEGIES,
                      features: int = 128, num_partitions: int = 4, num_views: int = 2, temperature: float = 0.1,
                      device: torch.device | str = "cpu", repeats: int = 20, warmup: int = 3, max_seconds: float = 2.0,
                      seed: int = 0, quiet: bool = False) -> list[dict]:
    """Forward + backward time and peak memory of ``GlobalContrastiveLoss`` per strategy and batch size.

    ``batch_sizes`` count images N = M volumes x ``num_partitions`` x ``num_views``; each must be a multiple of
    ``num_partitions * num_views``. Returns one row per (strategy, N): strategy, images, volumes, features,
    positive_pairs, time_ms, reps, peak_mib.
    """
    device = torch.device(device)
    rows = []
    for n in batch_sizes:
        per_volume = num_partitions * num_views
        if n % per_volume:
            raise ValueError(f"global batch size {n} is not M volumes x {num_partitions} partitions x {num_views} "
                             "views.")
        meta = partition_batch_metadata(n // num_views, num_partitions, num_views, device, seed)
        g = torch.Generator().manual_seed(seed)
        embeddings = torch.randn(n, features, generator=g).to(device).requires_grad_(True)
        for strategy in strategies:
            loss = GlobalContrastiveLoss(strategy, temperature=temperature, gather_distributed=False)
            result = _time_and_memory(_loss_fn_and_grad(loss, embeddings, meta), device, repeats, warmup, max_seconds)
            positives = _global_positive_pairs(strategy, meta, loss.position_threshold)
            row = {"strategy": strategy, "images": n, "volumes": n // per_volume, "features": features,
                   "positive_pairs": positives, **result}
            rows.append(row)
            progress(f"[global] {strategy:<12} N={n:<4} {row['time_ms']:9.3f} ms  {row['peak_mib']:8.3f} MiB", quiet)
    return rows


def _global_positive_pairs(strategy: str, meta: dict[str, Tensor], threshold: float) -> int:
    positive, _ = global_pair_masks(strategy, meta["volume"], meta["partition"], meta["sample"], meta["position"],
                                    threshold)
    return int(positive.sum())


# ----------------------------------------------------------------------------------------------------------------
# 2. local loss
# ----------------------------------------------------------------------------------------------------------------


def bench_local_loss(batch_sizes: Sequence[int] = (12, 24, 48), strategies: Sequence[str] = LOCAL_STRATEGIES,
                     grid_regions: Sequence[int] = (13, 25), dense_regions: Sequence[int] = (13, 64, 256),
                     channels: int = 64, feature_size: int = 48, region_size: int = 3, num_partitions: int = 4,
                     num_views: int = 2, temperature: float = 0.1, device: torch.device | str = "cpu",
                     repeats: int = 10, warmup: int = 2, max_seconds: float = 2.0, seed: int = 0,
                     quiet: bool = False) -> list[dict]:
    """Forward + backward time and peak memory of ``LocalContrastiveLoss`` per strategy, region mode, batch size
    (images = slices x ``num_views``) and region count K, on (N, ``channels``, ``feature_size``, ``feature_size``)
    maps. Dense-mode anchors are drawn once per configuration (seeded) and fixed for its repeats.

    Returns one row per configuration: strategy, mode, regions, images, time_ms, reps, peak_mib.
    """
    device = torch.device(device)
    configs = [("grid", k) for k in grid_regions] + [("dense", k) for k in dense_regions]
    rows = []
    for n in batch_sizes:
        meta = partition_batch_metadata(_slices_for(n, num_views), num_partitions, num_views, device, seed)
        g = torch.Generator().manual_seed(seed)
        features = torch.randn(n, channels, feature_size, feature_size, generator=g).to(device).requires_grad_(True)
        for strategy in strategies:
            for mode, k in configs:
                loss = LocalContrastiveLoss(strategy, temperature, region_size, mode, k, gather_distributed=False)
                torch.manual_seed(seed)
                centres = loss.region_centres(feature_size, feature_size, device)

                def run(loss=loss, centres=centres) -> None:
                    value = loss(features, meta["volume"], meta["partition"], meta["sample"], centres=centres)
                    torch.autograd.grad(value, features)

                result = _time_and_memory(run, device, repeats, warmup, max_seconds)
                row = {"strategy": strategy, "mode": mode, "regions": k, "images": n, "channels": channels,
                       "feature_size": feature_size, **result}
                rows.append(row)
                progress(
                    f"[local]  {strategy:<7} {mode:<5} K={k:<4} N={n:<3} {row['time_ms']:9.2f} ms  "
                    f"{row['peak_mib']:9.2f} MiB",
                    quiet,
                )
    return rows


# ----------------------------------------------------------------------------------------------------------------
# 3. the loss's share of a training step
# ----------------------------------------------------------------------------------------------------------------


class _Compose:
    """Apply batch augmentations in order (what the config's monai Compose does with them)."""

    def __init__(self, *transforms):
        self.transforms = transforms

    def __call__(self, x: Tensor) -> Tensor:
        for t in self.transforms:
            x = t(x)
        return x


def _parse_local_variant(variant: str) -> tuple[str, str, int]:
    try:
        strategy, mode, regions = str(variant).split("/")
        return strategy, mode, int(regions)
    except ValueError:
        raise ValueError(f"a local variant is 'strategy/mode/regions', e.g. 'random/grid/13', got {variant!r}.")


def bench_step_share(
    image_size: int = 64,
    global_strategies: Sequence[str] = GLOBAL_STRATEGIES,
    local_variants: Sequence[str] = ("random/grid/13", "domain/grid/13", "random/dense/13", "domain/dense/13"),
    global_volumes: int = 4,
    local_volumes: int = 3,
    num_partitions: int = 4,
    num_views: int = 2,
    decoder_blocks: int = 3,
    region_size: int = 3,
    temperature: float = 0.1,
    learning_rate: float = 1e-3,
    device: torch.device | str = "cpu",
    repeats: int = 5,
    warmup: int = 1,
    loss_repeats: int = 20,
    max_seconds: float = 20.0,
    seed: int = 0,
    quiet: bool = False,
) -> list[dict]:
    """Time of a whole pre-training step vs the loss alone, per loss variant, for the global and local stage.

    Global stage: ``GlobalContrastiveNet`` (the reference U-Net encoder + g1 1024 -> 128) on ``global_volumes``
    x ``num_partitions`` slices x ``num_views`` views of ``image_size``^2, augmented with random crop + resize and
    brightness/contrast; local stage: ``LocalContrastiveNet(decoder_blocks)`` with the frozen encoder on
    ``local_volumes`` x ``num_partitions`` slices x ``num_views`` brightness/contrast views. A step = augment,
    forward, loss, backward, Adam step (gradients are released with ``zero_grad(set_to_none=True)`` at the end
    of the step so the peak memory covers the gradients the step creates). The loss alone = forward + backward
    of the same loss on a random tensor of the network output's shape.

    ``local_variants`` are ``"strategy/mode/regions"`` strings. Returns one row per variant: stage, strategy,
    mode, regions, images, image_size, loss_input, step_ms, loss_ms, share_pct, step_peak_mib, loss_peak_mib.
    """
    settings = {"image_size": image_size, "num_partitions": num_partitions, "num_views": num_views,
                "decoder_blocks": decoder_blocks, "region_size": region_size, "temperature": temperature,
                "learning_rate": learning_rate, "device": torch.device(device), "seed": seed}
    timing = {"repeats": repeats, "warmup": warmup, "loss_repeats": loss_repeats, "max_seconds": max_seconds}
    stages = [("global", s, None, None) for s in global_strategies]
    stages += [("local", *_parse_local_variant(v)) for v in local_variants]
    rows = []
    for stage, strategy, mode, regions in stages:
        volumes = global_volumes if stage == "global" else local_volumes
        rows.append(_step_share_row((stage, strategy, mode, regions), volumes, settings, timing, quiet))
    return rows


def _training_step(variant: tuple, volumes: int, image_size: int, num_partitions: int, num_views: int,
                   decoder_blocks: int, region_size: int, temperature: float, learning_rate: float,
                   device: torch.device, seed: int) -> tuple[Callable[[], None], dict]:
    """One pre-training step of ``variant`` (stage, strategy, mode, regions) on a fixed batch of ``volumes`` x
    ``num_partitions`` random slices (1 x ``image_size`` x ``image_size``), and what measuring the loss alone needs:
    {"batch", "prepare" (the views and their metadata), "net", "loss"}. Seeded: the same network every call."""
    stage, strategy, mode, regions = variant
    torch.manual_seed(seed)
    unet = UNet2D(1, 4).to(device)
    num_slices = volumes * num_partitions
    meta = partition_batch_metadata(num_slices, num_partitions, 1, device, seed)
    batch = {"image": torch.rand(num_slices, 1, image_size, image_size, device=device), **meta}
    if stage == "global":
        net = GlobalContrastiveNet(unet, image_size).to(device)
        augment = _Compose(RandCropResize(area=0.27), RandBrightnessContrast())
        loss = GlobalContrastiveLoss(strategy, temperature=temperature, gather_distributed=False)
    else:
        net = LocalContrastiveNet(unet, decoder_blocks).to(device)
        augment = RandBrightnessContrast()
        loss = LocalContrastiveLoss(strategy, temperature, region_size, mode, regions, gather_distributed=False)
    for i, t in enumerate(getattr(augment, "transforms", (augment,))):
        t.set_random_state(seed + i)
    net.train()
    prepare = ContrastiveViews(augment, num_views=num_views)
    criterion = MetadataLoss(loss)
    optimizer = torch.optim.Adam(trainable_parameters(net), lr=learning_rate)

    def step() -> None:
        views, metadata = prepare(batch, device)
        criterion(net(views), metadata).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, {"batch": batch, "prepare": prepare, "net": net, "loss": loss}


def _step_share_row(variant: tuple, volumes: int, settings: dict, timing: dict, quiet: bool) -> dict:
    """The row of ``bench_step_share`` for one ``variant`` (stage, strategy, mode, regions): the step timed, then the
    loss alone on a random tensor of the network output's shape. ``settings`` are ``_training_step``'s keywords,
    ``timing`` holds repeats, warmup, loss_repeats and max_seconds."""
    stage, strategy, mode, regions = variant
    device, seed, image_size = settings["device"], settings["seed"], settings["image_size"]
    step, parts = _training_step(variant, volumes, **settings)
    images = volumes * settings["num_partitions"] * settings["num_views"]
    progress(f"[step]   {stage:<6} {strategy:<12} {mode or '':<5} {regions or '':<3} {image_size}px x {images}: "
             f"timing the step ...", quiet)
    step_ms, step_reps = measure_time(step, device, repeats=timing["repeats"], warmup=timing["warmup"],
                                      max_seconds=timing["max_seconds"])
    step_peak = measure_peak_memory(step, device)
    with torch.no_grad():
        views, metadata = parts["prepare"](parts["batch"], device)
        output_shape = tuple(parts["net"](views).shape)
    del views
    g = torch.Generator().manual_seed(seed)
    loss_input = torch.randn(output_shape, generator=g).to(device).requires_grad_(True)
    loss_ms, loss_reps = measure_time(_loss_fn_and_grad(parts["loss"], loss_input, metadata), device,
                                      repeats=timing["loss_repeats"], warmup=2, max_seconds=timing["max_seconds"])
    loss_peak = measure_peak_memory(_loss_fn_and_grad(parts["loss"], loss_input, metadata), device)
    row = {
        "stage": stage, "strategy": strategy, "mode": mode, "regions": regions, "images": images,
        "image_size": image_size, "loss_input": "x".join(map(str, output_shape)),
        "step_ms": step_ms, "step_reps": step_reps, "loss_ms": loss_ms, "loss_reps": loss_reps,
        "share_pct": 100.0 * loss_ms / step_ms,
        "step_peak_mib": step_peak / MIB, "loss_peak_mib": loss_peak / MIB,
    }
    progress(f"[step]   {stage:<6} {strategy:<12} step {step_ms:9.1f} ms, loss {loss_ms:8.2f} ms "
             f"-> {row['share_pct']:.2f}%", quiet)
    return row


# ----------------------------------------------------------------------------------------------------------------
# output
# ----------------------------------------------------------------------------------------------------------------


def format_table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> str:
    """A plain-text table: ``columns`` are (key, header, format spec); text left-aligned, numbers right-aligned,
    None shown as "-"."""
    def cell(value, spec) -> str:
        return "-" if value is None else format(value, spec) if spec else str(value)

    cells = [[cell(row[key], spec) for key, _, spec in columns] for row in rows]
    headers = [header for _, header, _ in columns]
    numeric = [all(isinstance(row[key], (int, float)) and not isinstance(row[key], bool)
                   for row in rows if row[key] is not None) for key, _, _ in columns]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(headers)]

    def line(values) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule] + [line(c) for c in cells])


GLOBAL_COLUMNS = [("strategy", "strategy", ""), ("images", "N", "d"), ("volumes", "M", "d"),
                  ("positive_pairs", "pos. pairs", "d"), ("time_ms", "fwd+bwd ms", ".3f"),
                  ("peak_mib", "peak MiB", ".3f"), ("reps", "reps", "d")]
LOCAL_COLUMNS = [("strategy", "strategy", ""), ("mode", "mode", ""), ("regions", "K", "d"), ("images", "N", "d"),
                 ("time_ms", "fwd+bwd ms", ".2f"), ("peak_mib", "peak MiB", ".2f"), ("reps", "reps", "d")]
PIPELINE_COLUMNS = [("stage", "stage", ""), ("images", "images/step", "d"), ("num_workers", "workers", "d"),
                    ("iterations", "iterations", "d"), ("pipeline_ips", "pipeline img/s", ".1f"),
                    ("model_ips", "model img/s", ".1f"), ("ratio", "ratio", ".3f")]
STEP_COLUMNS = [("stage", "stage", ""), ("strategy", "strategy", ""), ("mode", "mode", ""), ("regions", "K", "d"),
                ("images", "images", "d"), ("loss_input", "loss input", ""), ("step_ms", "step ms", ".1f"),
                ("loss_ms", "loss ms", ".2f"), ("share_pct", "loss share %", ".2f"),
                ("step_peak_mib", "step peak MiB", ".1f"), ("loss_peak_mib", "loss peak MiB", ".1f")]


def _write_output(path: str, env: dict, results: dict[str, list[dict]]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    if path.endswith(".csv"):
        keys: list[str] = ["benchmark"]
        for rows in results.values():
            for row in rows:
                keys += [k for k in row if k not in keys]
        keys += [k for k in env if k not in keys]
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            for name, rows in results.items():
                for row in rows:
                    writer.writerow({"benchmark": name, **env, **row})
    else:
        with open(tmp, "w") as f:
            json.dump({"environment": env, **results}, f, indent=2, allow_nan=True)
    os.replace(tmp, path)


def _as_tuple(value, cast=int) -> tuple:
    if isinstance(value, (list, tuple)):
        return tuple(cast(v) for v in value)
    if isinstance(value, str):
        return tuple(cast(v) for v in value.replace("[", "").replace("]", "").replace("(", "").replace(")", "")
                     .split(",") if v.strip())
    return (cast(value),)


def main(
    parts: str | Sequence[str] = PARTS,
    device: str = "auto",
    threads: int | None = None,
    paper: bool = False,
    image_size: int | None = None,
    global_batch_sizes: Sequence[int] = (16, 32, 48, 96, 192),
    local_batch_sizes: Sequence[int] | None = None,
    grid_regions: Sequence[int] = (13, 25),
    dense_regions: Sequence[int] = (13, 64, 256),
    feature_size: int = 48,
    channels: int = 64,
    global_strategies: Sequence[str] = GLOBAL_STRATEGIES,
    local_strategies: Sequence[str] = LOCAL_STRATEGIES,
    local_variants: Sequence[str] = ("random/grid/13", "domain/grid/13", "random/dense/13", "domain/dense/13"),
    repeats: int = 10,
    step_repeats: int = 3,
    max_seconds: float = 2.0,
    pipeline_stages: Sequence[str] = ("global", "local", "finetune", "consistency"),
    pipeline_iterations: int = 120,
    pipeline_warmup: int = 5,
    pipeline_overrides: dict | None = None,
    seed: int = 0,
    output: str | None = None,
    quiet: bool = False,
) -> dict:
    """Run the benchmarks and print their tables (progress goes to stderr).

    Args:
        parts: any of "global", "local", "step", "pipeline" (comma-separated or a list); all by default.
        device: "auto" (cuda when available), "cpu" or "cuda[:i]".
        threads: torch intra-op threads (default: torch's choice).
        paper: the full settings: the step share at the paper's 192 x 192 slices (sets ``image_size`` to 192
            unless given) and the local sweep up to N = 48 images.
        image_size: slice size of the step share (a multiple of 32); default 64 (reduced, fast on a CPU).
        global_batch_sizes: images N of the global sweep (multiples of 8 = 4 partitions x 2 views).
        local_batch_sizes: images N of the local sweep (even: slices x 2 views); default (12, 24), the paper's
            24 and half of it, and with ``paper`` also 48 (dense K = 256 at N = 48 takes ~2 s a call, ~0.9 GiB).
        grid_regions / dense_regions: region counts K of the local sweep per mode.
        feature_size / channels: the local sweep's feature maps (default 64 x 48 x 48: block 3 at 192 x 192).
        global_strategies / local_strategies: strategies of the sweeps (and of the global step share).
        local_variants: "strategy/mode/regions" of the local step share.
        repeats: timed calls per loss configuration (median reported), fewer once ``max_seconds`` passed.
        step_repeats: timed steps per step-share row.
        max_seconds: time budget per loss configuration before repeats are cut (steps: 10 x this).
        pipeline_stages: stages of the pipeline part ("global", "local", "finetune", "consistency").
        pipeline_iterations / pipeline_warmup: timed and untimed iterations of each stage's workflow (and as many
            model-only steps); the default 120 spans an epoch boundary in every stage.
        pipeline_overrides: config ids -> values for the pipeline part's workflows, e.g. ``{"num_workers": 0}``
            (default: the configs' own settings).
        output: also write the results to this .json or .csv file.
        quiet: no progress lines.

    Returns:
        {"environment": ..., "global_loss": rows, "local_loss": rows, "step_share": rows, "pipeline": rows}
        (parts run only).
    """
    parts = _as_tuple(parts, str)
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise ValueError(f"parts must be among {PARTS}, got {unknown}.")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if threads is not None:
        torch.set_num_threads(int(threads))
    image_size = int(image_size) if image_size is not None else (192 if paper else 64)
    if local_batch_sizes is None:
        local_batch_sizes = (12, 24, 48) if paper else (12, 24)
    env = environment(device)
    common = {"device": device, "seed": seed, "quiet": quiet}
    print(f"Benchmark ({', '.join(parts)}): device {env['device']} ({env['device_name']}), torch {env['torch']}, "
          f"monai {env['monai']}, {env['threads']} threads")
    print(memory_note(device))
    results: dict[str, list[dict]] = {}
    started = time.perf_counter()
    other_load = OtherCpuLoad()
    other_load.start()
    if "global" in parts:
        results["global_loss"] = _global_part(global_batch_sizes, global_strategies, 2 * repeats, max_seconds, common)
    if "local" in parts:
        results["local_loss"] = _local_part(local_batch_sizes, local_strategies, grid_regions, dense_regions,
                                            channels, feature_size, repeats, max_seconds, common)
    if "step" in parts:
        results["step_share"] = _step_part(image_size, global_strategies, local_variants, step_repeats,
                                           10 * max_seconds, common)
    if "pipeline" in parts:
        results["pipeline"] = _pipeline_part(pipeline_stages, pipeline_iterations, pipeline_warmup,
                                             pipeline_overrides, quiet)
    _finish(env, other_load.stop(), time.perf_counter() - started, output, results)
    return {"environment": env, **results}


def _global_part(batch_sizes, strategies, repeats: int, max_seconds: float, common: dict) -> list[dict]:
    """``bench_global_loss`` run (``common``: device, seed, quiet) and its table printed; returns its rows."""
    rows = bench_global_loss(_as_tuple(batch_sizes), _as_tuple(strategies, str), repeats=repeats,
                             max_seconds=max_seconds, **common)
    print("\nGlobalContrastiveLoss, forward + backward: embeddings N x 128, N = M volumes x 4 partitions x 2 views,"
          " tau = 0.1")
    print(format_table(rows, GLOBAL_COLUMNS))
    return rows


def _local_part(batch_sizes, strategies, grid_regions, dense_regions, channels: int, feature_size: int,
                repeats: int, max_seconds: float, common: dict) -> list[dict]:
    """``bench_local_loss`` run (``common``: device, seed, quiet) and its table printed; returns its rows."""
    rows = bench_local_loss(_as_tuple(batch_sizes), _as_tuple(strategies, str), _as_tuple(grid_regions),
                            _as_tuple(dense_regions), channels=channels, feature_size=feature_size, repeats=repeats,
                            max_seconds=max_seconds, **common)
    print(f"\nLocalContrastiveLoss, forward + backward: feature maps N x {channels} x {feature_size} x "
          f"{feature_size}, 3x3 regions, K anchor regions per image (dense: every other window a negative)")
    print(format_table(rows, LOCAL_COLUMNS))
    return rows


def _step_part(image_size: int, global_strategies, local_variants, repeats: int, max_seconds: float,
               common: dict) -> list[dict]:
    """``bench_step_share`` run (``common``: device, seed, quiet), its table and the verdict on the largest loss
    share (the 10% target) printed; returns its rows."""
    rows = bench_step_share(image_size, _as_tuple(global_strategies, str), _as_tuple(local_variants, str),
                            repeats=repeats, max_seconds=max_seconds, **common)
    label = "the paper's size" if image_size == 192 else "reduced size; --paper for 192 x 192"
    print(f"\nLoss share of a pre-training step at {image_size} x {image_size} ({label}): global = encoder + g1,"
          f" 4 volumes x 4 partitions x 2 views; local = frozen encoder + decoder blocks 1-3 + g2, 12 slices x 2"
          f" views; step = augment + forward + loss + backward + Adam")
    print(format_table(rows, STEP_COLUMNS))
    worst = max(rows, key=lambda r: r["share_pct"])
    verdict = "under" if worst["share_pct"] < 10.0 else "NOT under"
    which = " ".join(str(worst[k]) for k in ("stage", "strategy", "mode", "regions") if worst[k] is not None)
    print(f"Largest loss share: {worst['share_pct']:.2f}% ({which}) -> {verdict} the 10% target.")
    return rows


def _pipeline_part(stages, iterations: int, warmup: int, overrides: dict | None, quiet: bool) -> list[dict]:
    """``study.pipeline_bench.bench_pipeline`` run, its table and one ``format_line`` per stage printed; returns its
    rows."""
    from study.pipeline_bench import bench_pipeline, format_line

    rows = bench_pipeline(_as_tuple(stages, str), int(iterations), int(warmup), overrides, quiet=quiet)
    print(f"\nData pipeline: each stage's workflow (bundle configs: loader, augmentation, step) against its model "
          f"step alone on a ready batch, images/s, {iterations} iterations each after "
          f"{warmup}; ratio = pipeline / model (goal >= 0.9)")
    print(format_table(rows, PIPELINE_COLUMNS))
    for row in rows:
        print(format_line(row))
    return rows


def _finish(env: dict, others: float | None, seconds: float, output: str | None,
            results: dict[str, list[dict]]) -> None:
    """Record the other processes' CPU share (``others``, %) in ``env``, print the total time and a warning above 5%,
    and write ``output`` when given."""
    env["other_processes_cpu_pct"] = others
    busy = "" if others is None else (
        f"; other processes used {others:.1f}% of the machine's CPU time meanwhile"
        + (" -- the timings are disturbed, rerun on an idle machine" if others > 5.0 else ""))
    print(f"\n(total {seconds:.0f} s{busy})")
    if output:
        _write_output(output, env, results)
        print(f"results written to {output}")


def _cli() -> None:
    import fire

    fire.Fire(main, serialize=lambda _: None)  # the tables are the output; do not print the returned dict


if __name__ == "__main__":
    _cli()
