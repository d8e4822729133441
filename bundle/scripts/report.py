"""Tables from evaluation results: the per-volume Dice CSVs that ``evaluate.yaml`` writes with ``MetricsSaver``.

``<evaluation_dir>/test_mean_dice_raw.csv`` has one row per volume: ``filename, <class name>, ..., mean`` with the 3D
Dice of each foreground class (named as in the data contract) on the volume's native grid.
"""

from __future__ import annotations

import csv
import json
import os
import re
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


def mean_dice(evaluation_dir: str) -> float:
    """Mean over volumes of the per-volume mean Dice over foreground classes (NaN classes left out)."""
    return float(np.nanmean(np.nanmean(read_dice(evaluation_dir), axis=1)))


def labelled_size(subset: str) -> str:
    """|XL| of a datalist subset key: ``labelled_2_1`` -> "2", ``labelled_all`` -> "all"."""
    found = re.fullmatch(r"labelled_(\d+)_\d+|labelled_(all)", subset)
    if found is None:
        raise ValueError(f"subset must be a datalist key labelled_<n>_<i> or labelled_all, got {subset!r}")
    return found.group(1) or found.group(2)


def gains_table(
    baseline: str, treatment: str, subsets: Sequence[str], names: Sequence[str] = ("baseline", "treatment")
) -> str:
    """A markdown table of paired results: the same labelled subsets fine-tuned from two initialisations.

    ``baseline`` and ``treatment`` are evaluation directory patterns holding ``{subset}`` (e.g.
    ``bundle/eval/random_init/{subset}/test``), filled with each datalist key in ``subsets``. One row per subset:
    |XL|, the subset, the mean Dice of each (``mean_dice``) and the gain treatment - baseline; then one row per |XL|:
    the mean of each and the mean gain ± its sample standard deviation over that size's subsets (n - 1; "n/a" with
    one subset).
    """
    if not subsets:
        raise ValueError("subsets must name at least one datalist key, e.g. ['labelled_1_0'].")
    for pattern in (baseline, treatment):
        if "{subset}" not in pattern:
            raise ValueError(f"an evaluation directory pattern must contain '{{subset}}', got {pattern!r}")
    rows = []  # (|XL|, subset, baseline Dice, treatment Dice)
    for subset in subsets:
        rows.append((labelled_size(subset), subset, mean_dice(baseline.format(subset=subset)),
                     mean_dice(treatment.format(subset=subset))))
    header = ["\\|XL\\|", "labelled subset", *names, "gain"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for size, subset, b, t in rows:
        lines.append(f"| {size} | {subset} | {b:.3f} | {t:.3f} | {t - b:+.3f} |")
    for size in dict.fromkeys(r[0] for r in rows):
        b, t = (np.array([r[i] for r in rows if r[0] == size]) for i in (2, 3))
        spread = f"{np.std(t - b, ddof=1):.3f}" if len(b) > 1 else "n/a"
        lines.append(f"| **{size}** | mean of {len(b)} | {b.mean():.3f} | {t.mean():.3f} | "
                     f"**{np.mean(t - b):+.3f} ± {spread}** |")
    return "\n".join(lines)


STOP_FILE = "pretrain_{stage}_stop.json"
NO_LEARNING = 0.05  # a plateau whose running loss is within 5% of the stage's first running loss: it did not learn


def stop_summary(output_dir: str, stages: Sequence[str] = ("global", "local")) -> str:
    """One line per pre-training stage from ``<output_dir>/pretrain_<stage>_stop.json`` (written when the stage
    stops: {"stage", "iteration", "reason": "plateau" | "budget" | "schedule", "loss", "history", "converged", ...}):
    whether it converged or ran its learning-rate schedule to the end, and whether its last running loss is still
    within ``NO_LEARNING`` of its first, i.e. the stage never learned. A budget stop is judged by its ``converged``
    flag (``scripts.engines.PlateauStop``); records without one count as not converged."""
    lines = []
    for stage in stages:
        path = os.path.join(output_dir, STOP_FILE.format(stage=stage))
        if not os.path.isfile(path):
            lines.append(f"- {stage} stage: NO stop record ({path} missing): convergence unknown")
            continue
        with open(path) as f:
            stop = json.load(f)
        verdict = {"plateau": "converged (loss plateau)", "budget": "did NOT converge (iteration budget spent)",
                   "schedule": "ran its learning-rate schedule to the end (decayed to 0)"}.get(
            stop.get("reason"), f"stopped for an unknown reason {stop.get('reason')!r}")
        if stop.get("reason") == "budget" and "converged" in stop:  # records written before the flag have none
            verdict = {True: "converged (loss flat for its patience when the iteration budget ended)",
                       None: "ran its iteration budget; convergence not judged (plateau rule off, or no running "
                             "loss judged)"}.get(stop["converged"], verdict)
        history = stop.get("history") or []
        start = f" (first running loss {history[0][1]:.3f})" if history else ""
        if history and history[-1][1] > (1.0 - NO_LEARNING) * history[0][1]:
            verdict = ("stopped on a plateau at its starting loss" if stop.get("reason") == "plateau"
                       else f"{verdict}, its loss still near its first") + ": did NOT learn"
        lines.append(f"- {stage} stage: {verdict} at iteration {stop.get('iteration')}, running loss "
                     f"{float(stop.get('loss', float('nan'))):.3f}{start}")
    return "\n".join(lines)


def read_scalars(log_dir: str, tag: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of the scalar ``tag`` in the TensorBoard event files of ``log_dir`` (as the handlers wrote
    them)."""
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
