"""Does the data pipeline keep the model busy? The real workflows' throughput against the model step alone (part
``pipeline`` of ``make bench``; repository tooling, not shipped in the bundle).

For each stage — ``global`` and ``local`` pre-training (``train.yaml`` + ``pretrain.yaml``), ``finetune``
(``train.yaml``), ``consistency`` (semi-supervised fine-tuning, ``train.yaml`` + ``consistency.yaml``) — the
bundle's own configs are parsed with ``monai.bundle.ConfigParser`` and two throughputs are measured, in network
input images per second (pre-training: V views x B slices per step; fine-tuning: B slices; consistency: B labelled
slices and the weak, strong and feature-perturbed views of U unlabelled ones, B + 3U):

- ``pipeline``: the stage's real trainer (``global#trainer``, ``local#trainer``, ``train#trainer``) runs
  ``warmup + iterations`` iterations: cached volumes, sampler, data loader (its workers, collation), augmentation,
  network, loss, backward, optimiser step, across epoch boundaries (a non-persistent loader starts its workers again
  each epoch). The first ``warmup`` iterations (start-up: the loader's first batches, the disk cache filled) are
  not timed. The trainer's handlers (progress bar, logs, checkpoints, training state, validation) are left out:
  they are not the data pipeline, and validation is per epoch, not per image; the moving average of the weights
  (``ema_decay`` > 0, consistency.yaml's default) is updated after each iteration, as in training.
- ``model``: the trainer's network, loss and optimiser on one ready batch of the same shape (a batch of the stage's
  loader, moved to the device and augmented once): zero_grad, forward, loss, backward, optimiser step, and the
  weight average's update where the stage keeps one; nothing else.
  Half of the ``iterations`` steps run before the workflow and half after it, so that a load on the machine that
  drifts during the measurement weighs on both alike.

``ratio = pipeline / model``: 1 means the pipeline never makes the model wait; the goal is >= 0.9. Both are means
over ``iterations`` steps after ``warmup`` untimed ones. The data is the embedded synthetic dataset, prepared into a
temporary folder with the bundle's own ``prepare_synthetic`` run id; the local stage starts from a randomly
initialised U-Net saved as the global stage's checkpoint (the weights do not change the timing); fine-tuning
starts from random initialisation (``use_pretrained: false``, likewise). Everything else is the configs' defaults
(image size 64, batch shapes, ``num_workers``) unless ``overrides`` changes it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence

from ignite.engine import Events
from monai.bundle import ConfigParser

from scripts.files import atomic_save
from study.configs import BUNDLE_DIR, config_files, read_configs
from study.progress import progress

__all__ = ["STAGES", "prepare_data", "stage_parser", "bench_pipeline", "format_line"]

STAGES = ("global", "local", "finetune", "consistency")
# each stage: its config files, and the id of its trainer in them
STAGE_CONFIGS = {
    "global": (("train.yaml", "pretrain.yaml"), "global"),
    "local": (("train.yaml", "pretrain.yaml"), "local"),
    "finetune": (("train.yaml",), "train"),
    "consistency": (("train.yaml", "consistency.yaml"), "train"),
}


def prepare_data(dataset_dir: str | os.PathLike, overrides: Sequence[str] = ()) -> str:
    """Prepare the embedded synthetic dataset in ``dataset_dir`` with the bundle's own ``prepare_synthetic`` run id
    (``python -m monai.bundle run``, a subprocess; ``overrides`` are extra command-line arguments such as
    ``["--synthetic#num_patients", "6"]``). Returns the datalist's path."""
    configs = str(config_files("train.yaml", "prepare.yaml"))
    command = [sys.executable, "-m", "monai.bundle", "run", "prepare_synthetic", "--config_file", configs,
               "--dataset_dir", str(dataset_dir), *map(str, overrides)]
    bundle = BUNDLE_DIR  # the `scripts` next to these configs, whatever else is installed
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [bundle, os.environ.get("PYTHONPATH")])))
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"preparing the synthetic data failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    return os.path.join(str(dataset_dir), "datalist.json")


def stage_parser(stage: str, dataset_dir: str, work_dir: str, overrides: Mapping | None = None) -> ConfigParser:
    """The stage's configs parsed as ``monai.bundle run`` parses them, with the data in ``dataset_dir``, models and
    logs under ``work_dir``, no handlers on the stage's trainer, and ``overrides`` (config ids -> values, e.g.
    ``{"num_workers": 0}``) applied last; an override under a top-level id these configs lack (``global#...`` for
    fine-tuning) is skipped."""
    files, prefix = STAGE_CONFIGS[stage]
    parser = read_configs(files, {"dataset_dir": str(dataset_dir), "model_dir": os.path.join(work_dir, "models"),
                                  "output_dir": os.path.join(work_dir, "eval"), f"{prefix}#handlers": [],
                                  "use_pretrained": False})
    top = parser.get()
    parser.update({key: value for key, value in (overrides or {}).items() if key.split("#")[0] in top})
    return parser


def _save_random_global_checkpoint(parser: ConfigParser) -> None:
    """A randomly initialised U-Net in the global stage's checkpoint format ({"model", "contract"}) where the local
    stage reads it."""
    state = {"model": parser.get_parsed_content("network_def").state_dict(),
             "contract": parser.get_parsed_content("record_contract").state_dict()}
    atomic_save(state, parser.get_parsed_content("local#global_checkpoint"))


def _images(output) -> int:
    """Network input images of one iteration's output (a dict with "image" when not decollated, else a list; the
    consistency step's dict counts them under "network_images": labelled, weak, strong and perturbed views)."""
    if isinstance(output, Mapping):
        return int(output.get("network_images", output["image"].shape[0]))
    return len(output)


def _time_pipeline(trainer, warmup: int, iterations: int) -> tuple[float, int]:
    """Run ``trainer`` for ``warmup + iterations`` iterations (over as many epochs as that takes); returns the
    seconds and the network input images of the last ``iterations``, and leaves no batch or output in
    ``trainer.state``."""
    stamps: list[float] = []
    images: list[int] = []
    total = warmup + iterations

    def record(engine) -> None:
        stamps.append(time.perf_counter())
        images.append(_images(engine.state.output))
        if len(stamps) >= total:
            engine.terminate()

    trainer.add_event_handler(Events.ITERATION_COMPLETED, record)
    epoch_length = trainer.state.epoch_length or len(trainer.data_loader)
    trainer.state.max_epochs = -(-total // epoch_length) + 1
    trainer.run()
    # the run leaves its last batch and output in the trainer's state, and model-only steps that fire the trainer's
    # iteration events (the consistency step) would decollate them again at every step: drop them, as before the run
    trainer.state.batch = trainer.state.output = None
    if len(stamps) < total:
        raise RuntimeError(f"the trainer stopped after {len(stamps)} of {total} iterations.")
    return stamps[-1] - stamps[warmup - 1], sum(images[warmup:])


def _model_step(trainer, batch):
    """A closure running one model-only step of the trainer's network, loss and optimiser on ``batch`` (a batch of
    its data loader), prepared once, here (moved to the device; augmented, and for pre-training made into views):
    zero_grad, forward, loss, backward, optimiser step.
    Returns the closure and the number of network input images per step.
    A trainer whose iteration is a ``ConsistencyStep`` (consistency.yaml) runs its ``compute`` on the tensors its
    ``prepare`` made once (the labelled batch, the unlabelled batch's weak and strong views)."""
    update = getattr(trainer, "_process_function", None)
    if hasattr(update, "prepare") and hasattr(update, "compute"):
        prepared = update.prepare(trainer, batch)
        images = update.compute(trainer, prepared)["network_images"]
        return (lambda: update.compute(trainer, prepared)), int(images)
    inputs, targets = trainer.prepare_batch(batch, trainer.state.device, trainer.non_blocking)[:2]
    network, loss_function, optimizer = trainer.network, trainer.loss_function, trainer.optimizer

    def step() -> None:
        network.train()
        optimizer.zero_grad(set_to_none=True)
        loss_function(trainer.inferer(inputs, network), targets).backward()
        optimizer.step()

    return step, int(inputs.shape[0])


def _with_weight_average(parser: ConfigParser, ema_decay: float, trainer, step):
    """Where the stage keeps a moving average of the weights (``train#averaged``, ``ema_decay`` > 0: consistency.yaml
    turns it on), its update after every iteration is part of the step: it is attached to ``trainer`` (whose own
    handlers, the average's among them, are left out) and added to the model-only ``step``, which is returned."""
    if ema_decay <= 0:
        return step
    average = parser.get_parsed_content("train#averaged")
    trainer.add_event_handler(Events.ITERATION_COMPLETED, average.update)

    def step_and_average() -> None:
        step()
        average.update()

    return step_and_average


def _time_steps(step, warmup: int, iterations: int) -> float:
    """Seconds of ``iterations`` calls of ``step`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(iterations):
        step()
    return time.perf_counter() - start


def bench_pipeline(
    stages: Sequence[str] = STAGES,
    iterations: int = 120,
    warmup: int = 5,
    overrides: Mapping | None = None,
    prepare_overrides: Sequence[str] = (),
    quiet: bool = False,
) -> list[dict]:
    """Pipeline and model-only throughput of each stage in ``stages`` (see the module docstring).

    Args:
        stages: any of "global", "local", "finetune".
        iterations: timed iterations per measurement (default 120: more than one epoch in every stage, so that a
            per-epoch cost such as starting loader workers is counted).
        warmup: untimed iterations first (>= 1).
        overrides: config ids -> values for every stage (e.g. ``{"num_workers": 0, "batch_size": 20}``).
        prepare_overrides: extra command-line arguments of the data preparation.
        quiet: no progress lines on stderr.

    Returns:
        One row per stage: stage, images (per step), iterations, pipeline_ips, model_ips (images/s), ratio,
        num_workers, ema_decay (the weight average's decay; 0: none).
    """
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"stages must be among {STAGES}, got {unknown}.")
    if warmup < 1 or iterations < 1:
        raise ValueError(f"need warmup >= 1 and iterations >= 1, got {warmup=}, {iterations=}.")
    rows = []
    with tempfile.TemporaryDirectory(prefix="pipeline-bench-") as work:
        dataset_dir = os.path.join(work, "data")
        progress("[pipeline] preparing the synthetic data ...", quiet)
        prepare_data(dataset_dir, prepare_overrides)
        for stage in stages:
            parser = stage_parser(stage, dataset_dir, work, overrides)
            prefix = STAGE_CONFIGS[stage][1]
            parser.get_parsed_content("initialize")  # set_determinism(seed), as `monai.bundle run` does first
            if stage == "local":
                _save_random_global_checkpoint(parser)
            trainer = parser.get_parsed_content(f"{prefix}#trainer")
            step, images = _model_step(trainer, next(iter(trainer.data_loader)))
            ema_decay = parser.get_parsed_content("ema_decay") if prefix == "train" else 0.0   # pre-training: none
            step = _with_weight_average(parser, ema_decay, trainer, step)
            half = max(1, iterations // 2)
            progress(f"[pipeline] {stage}: model-only steps, then {warmup} + {iterations} iterations of the "
                     "workflow, then model-only steps ...", quiet)
            model_s = _time_steps(step, warmup, half)
            pipeline_s, pipeline_images = _time_pipeline(trainer, warmup, iterations)
            model_s += _time_steps(step, 1, half)
            pipeline_ips, model_ips = pipeline_images / pipeline_s, 2 * half * images / model_s
            row = {"stage": stage, "images": images, "iterations": iterations,
                   "num_workers": parser.get_parsed_content(f"{prefix}#dataloader#num_workers"),
                   "ema_decay": ema_decay,
                   "pipeline_ips": pipeline_ips, "model_ips": model_ips, "ratio": pipeline_ips / model_ips}
            rows.append(row)
            progress(f"[pipeline] {format_line(row)}", quiet)
            del trainer, parser
    return rows


def format_line(row: Mapping) -> str:
    """``stage=<stage> pipeline=<img/s> model=<img/s> ratio=<pipeline/model>``."""
    return (f"stage={row['stage']} pipeline={row['pipeline_ips']:.1f} model={row['model_ips']:.1f} "
            f"ratio={row['ratio']:.3f}")
