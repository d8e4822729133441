"""Tables from evaluation results: the per-volume Dice CSVs that ``evaluate.yaml`` writes with ``MetricsSaver``.

``<evaluation_dir>/test_mean_dice_raw.csv`` has one row per volume: ``filename, <class name>, ..., mean`` with the 3D
Dice of each foreground class (named as in the data contract) on the volume's native grid.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence

import numpy as np

DICE_CSV = "test_mean_dice_raw.csv"


def read_dice_columns(evaluation_dir: str) -> tuple[list[str], np.ndarray]:
    """(class names, (volumes, classes) Dice) per volume and foreground class from ``evaluation_dir``; NaN where
    undefined. The names are the CSV's column headers (the contract's class names)."""
    path = os.path.join(evaluation_dir, DICE_CSV)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: run the evaluation (evaluate.yaml) first.")
    with open(path) as f:
        rows = list(csv.DictReader(f, delimiter=","))
    if not rows:
        raise ValueError(f"{path} holds no volume.")
    columns = [c for c in rows[0] if c not in ("filename", "mean")]
    return columns, np.array([[float(r[c]) for c in columns] for r in rows], dtype=float)


def read_dice(evaluation_dir: str) -> np.ndarray:
    """(volumes, classes) Dice per volume and foreground class from ``evaluation_dir``; NaN where undefined."""
    return read_dice_columns(evaluation_dir)[1]


def dice_table(results: Mapping[str, str], class_names: Sequence[str] | None = None) -> str:
    """A markdown table: one row per named result (name -> evaluation_dir), mean +- std over volumes per class
    and of the per-volume mean over classes. Class names: ``class_names``, else the CSV headers."""
    names = {name: read_dice_columns(directory) for name, directory in results.items()}
    class_names = list(class_names or next(iter(names.values()))[0])
    header = ["initialisation", "volumes", *class_names, "mean"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, directory in results.items():
        dice = names[name][1]
        if dice.shape[1] != len(class_names):
            raise ValueError(f"{directory}: {dice.shape[1]} classes in the CSV, {len(class_names)} names given.")
        per_volume = np.nanmean(dice, axis=1)
        cells = [f"{np.nanmean(c):.3f} ± {np.nanstd(c):.3f}" for c in (*dice.T, per_volume)]
        lines.append("| " + " | ".join([name, str(len(dice)), *cells]) + " |")
    return "\n".join(lines)


def read_scalars(log_dir: str, tag: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of the scalar ``tag`` in the TensorBoard event files of ``log_dir`` (as the handlers wrote them)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(log_dir, size_guidance={"scalars": 0})
    events.Reload()
    if tag not in events.Tags()["scalars"]:
        raise KeyError(f"{log_dir} has no scalar '{tag}'; it has: {', '.join(events.Tags()['scalars'])}.")
    scalars = events.Scalars(tag)
    return np.array([s.step for s in scalars]), np.array([s.value for s in scalars])


def plot_curves(curves: Mapping[str, tuple[str, str]], output: str, smooth: int = 25) -> str:
    """One panel per curve: ``{title: (log_dir, tag)}`` -> a PNG at ``output`` (raw values and a running mean)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(curves), figsize=(4.5 * len(curves), 3.2), squeeze=False)
    for ax, (title, (log_dir, tag)) in zip(axes[0], curves.items()):
        steps, values = read_scalars(log_dir, tag)
        ax.plot(steps, values, color="0.75", linewidth=0.8, label="logged values")
        if len(values) >= smooth:
            ax.plot(*running_mean(steps, values, smooth), label=f"mean of {smooth}")
        ax.set(title=title, xlabel="step as logged (iteration; epoch for validation metrics)", ylabel=tag)
        ax.legend(frameon=False)
    return save_figure(fig, output)


def pyplot():
    """matplotlib.pyplot with the non-interactive Agg backend (imported on first use)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, output: str) -> str:
    """Lay out ``fig``, write it as a PNG at ``output`` (folders created) and release it; returns ``output``."""
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    fig.savefig(output, dpi=110)
    pyplot().close(fig)
    return output


def running_mean(steps: np.ndarray, values: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """The mean of each ``width`` consecutive values, placed at the last step of its window."""
    kernel = np.ones(width) / width
    return steps[width - 1 :], np.convolve(values, kernel, mode="valid")
