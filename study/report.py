"""The study's report: tables, the paper's claims checked, and figures from the results file of ``study.experiments``.

Repository tooling, not part of the bundle: it reads the bundle's evaluation CSVs and TensorBoard logs through
``scripts.report`` (run with the bundle folder on ``PYTHONPATH``, as ``make report`` does).

A results line holds "label" (initialisation), "recipe" ({"global", "local"} strategies, null for none),
"num_labelled" (|XL|, or "all" for the benchmark), "subset", "seed", "volumes" ([{"image", "dice": per class}]),
"classes", "class_dice" and "mean_dice" (means over the run's test volumes), "val_dice" (the best validation Dice of
the fine-tuning, the model-selection score; absent in older results), "wall_time_s".
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence

import numpy as np

from scripts.report import DICE_CSV, pyplot, read_dice, read_scalars, running_mean, save_figure

PAPER_ORDER = ((None, None), ("random", None), ("domain_minus", None), ("domain", None))   # random < G^R < G^D- < G^D


def read_dice_rows(evaluation_dir: str) -> tuple[list[str], list[list[float]]]:
    """(file names, Dice per volume and foreground class) from ``evaluation_dir``; NaN where undefined."""
    path = os.path.join(evaluation_dir, DICE_CSV)
    dice = read_dice(evaluation_dir)
    with open(path) as f:
        names = [row["filename"] for row in csv.DictReader(f)]
    return names, dice.tolist()


VALIDATION_TAG = "val_mean_dice"   # train.yaml's validation metric, written to TensorBoard in its output_dir


def best_validation_dice(output_dir: str) -> float | None:
    """The highest ``val_mean_dice`` a fine-tuning logged in ``output_dir`` (the score that selected its model.pt), or
    None when it logged none."""
    if not os.path.isdir(output_dir):
        return None
    try:
        values = read_scalars(output_dir, VALIDATION_TAG)[1]
    except KeyError:
        return None
    return float(values.max()) if len(values) else None


def _sizes(records: Sequence[dict]) -> list:
    numbers = sorted({r["num_labelled"] for r in records if r["num_labelled"] != "all"})
    return numbers + (["all"] if any(r["num_labelled"] == "all" for r in records) else [])


def _labels(records: Sequence[dict], order: Sequence[str] | None) -> list[str]:
    present = {r["label"] for r in records}
    return [n for n in (order or []) if n in present] + sorted(present - set(order or []))


def _group(records: Sequence[dict]) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        if r.get("mean_dice") is not None:
            groups.setdefault((r["label"], r["num_labelled"]), []).append(r)
    return groups


def _paired_gains(groups: Mapping[tuple, list[dict]], base: str, label: str, size, key: str = "mean_dice"
                  ) -> list[float]:
    """``key`` (mean test Dice by default) of ``label`` minus that of ``base`` at ``size``, one difference per
    (subset, seed) where both ran and have a value."""
    before = {(r["subset"], r["seed"]): r.get(key) for r in groups.get((base, size), [])}
    return [r[key] - before[(r["subset"], r["seed"])] for r in groups.get((label, size), [])
            if r.get(key) is not None and before.get((r["subset"], r["seed"])) is not None]


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value), NaNs left out."""
    values = np.asarray([v for v in values if v is not None], dtype=float)
    values = values[~np.isnan(values)]
    if values.size == 0:
        return float("nan"), float("nan")
    return float(values.mean()), float(values.std(ddof=1)) if values.size > 1 else 0.0


def _cell(values: Sequence[float]) -> str:
    mean, std = _mean_std(values)
    return "–" if np.isnan(mean) else f"{mean:.3f} ± {std:.3f}"


def _xl(size, table: bool = True) -> str:
    """Column or row name of a training-set size; ``|`` escaped inside markdown tables."""
    bar = "\\|" if table else "|"
    return "all labelled" if size == "all" else f"{bar}XL{bar} = {size}"


def _benchmark(records: Sequence[dict]) -> tuple[float, str] | None:
    """Mean Dice of the benchmark (all labelled volumes; the random initialisation when several were run) and its
    description."""
    runs = [r for r in records if r["num_labelled"] == "all" and r.get("mean_dice") is not None]
    if not runs:
        return None
    chosen = [r for r in runs if r["recipe"]["global"] is None] or runs
    count = chosen[0].get("num_train_volumes")
    volumes = f"all {count} labelled training volumes" if count else "all labelled training volumes"
    return _mean_std([r["mean_dice"] for r in chosen])[0], f"{chosen[0]['label']} on {volumes}, {len(chosen)} run(s)"


def study_tables(records: Sequence[dict], order: Sequence[str] | None = None) -> str:
    """Markdown tables of test Dice per initialisation x |XL|: the summary (mean foreground Dice, mean ± std over the
    runs, i.e. labelled subsets and seeds), per class (with the std over all test volumes of those runs), the gain over
    random initialisation paired by subset and seed, and the fraction of the benchmark reached."""
    groups, sizes, labels = _group(records), _sizes(records), _labels(records, order)
    out = ["**Mean foreground Dice** on the test volumes: mean ± std over runs (labelled subsets × seeds); "
           "each run's value is the mean over test volumes of the per-volume mean over classes.", "",
           "| initialisation | " + " | ".join(_xl(s) for s in sizes) + " |", "|---|" + "---|" * len(sizes)]
    for label in labels:
        cells = [_cell([r["mean_dice"] for r in groups.get((label, s), [])]) for s in sizes]
        out.append(f"| {label} | " + " | ".join(cells) + " |")

    classes = next(r["classes"] for r in records)
    out += ["", "**Per class**: mean ± std over runs; the last column is the std over every test volume of those runs "
            "(per-volume mean over classes).", "",
            "| initialisation | labelled | runs | volumes | " + " | ".join(classes) + " | mean | std over volumes |",
            "|---|---|---|---|" + "---|" * (len(classes) + 2)]
    for s in sizes:
        for label in labels:
            runs = groups.get((label, s))
            if not runs:
                continue
            per_volume = [np.nanmean(np.array(v["dice"], dtype=float)) for r in runs for v in r["volumes"]]
            cells = [_cell([r["class_dice"][c] for r in runs]) for c in range(len(classes))]
            cells += [_cell([r["mean_dice"] for r in runs]), f"{_mean_std(per_volume)[1]:.3f}"]
            out.append(f"| {label} | {_xl(s)} | {len(runs)} | {len(per_volume)} | " + " | ".join(cells) + " |")

    random_label = next((r["label"] for r in records if r["recipe"]["global"] is None), None)
    if random_label is not None:
        out += ["", f"**Gain over {random_label}**, paired by labelled subset and seed: mean ± std of the differences "
                "in mean Dice (runs where the pre-trained model is better / pairs).", "",
                "| initialisation | " + " | ".join(_xl(s) for s in sizes) + " |", "|---|" + "---|" * len(sizes)]
        for label in labels:
            if label == random_label:
                continue
            cells = []
            for s in sizes:
                diffs = _paired_gains(groups, random_label, label, s)
                mean, std = _mean_std(diffs)
                better = sum(d > 0 for d in diffs)
                cells.append("–" if not diffs else f"{mean:+.3f} ± {std:.3f} ({better}/{len(diffs)})")
            out.append(f"| {label} | " + " | ".join(cells) + " |")

    out += validation_table(records, order)
    bench = _benchmark(records)
    if bench is not None:
        numbers = [s for s in sizes if s != "all"]
        out += ["", f"**Fraction of the benchmark** ({bench[1]}: mean Dice {bench[0]:.3f}) reached: mean Dice / "
                "benchmark.", "",
                "| initialisation | " + " | ".join(_xl(s) for s in numbers) + " |", "|---|" + "---|" * len(numbers)]
        for label in labels:
            cells = []
            for s in numbers:
                mean = _mean_std([r["mean_dice"] for r in groups.get((label, s), [])])[0]
                cells.append("–" if np.isnan(mean) else f"{100 * mean / bench[0]:.0f} %")
            out.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def comparison_table(records: Sequence[dict], pairs: Sequence[Sequence[str]]) -> list[str]:
    """Markdown lines comparing each pair (base label, other label) of ``pairs``, paired by labelled subset and seed:
    the mean ± std of other - base in mean test Dice and in best validation Dice (runs where other is better /
    pairs), and each one's mean wall time per fine-tuning job (every step: fine-tunings, pseudo-labels, evaluation)."""
    if not pairs:
        return []
    groups, sizes = _group(records), [s for s in _sizes(records) if s != "all"]
    out = ["", "**Paired comparisons**: other minus base, paired by labelled subset and seed: mean ± std of the "
           "differences (pairs where other is better / pairs); test Dice, then best validation Dice.", "",
           "| other | base | " + " | ".join(f"test, {_xl(s)} | validation, {_xl(s)}" for s in sizes) + " |",
           "|---|---|" + "---|---|" * len(sizes)]

    for base, other in pairs:
        cells = []
        for s in sizes:
            for key in ("mean_dice", "val_dice"):
                diffs = _paired_gains(groups, base, other, s, key)
                mean, std, better = *_mean_std(diffs), sum(d > 0 for d in diffs)
                cells.append("–" if not diffs else f"{mean:+.3f} ± {std:.3f} ({better}/{len(diffs)})")
        out.append(f"| {other} | {base} | " + " | ".join(cells) + " |")
    times: dict[str, list[float]] = {}
    for r in records:
        if r["num_labelled"] != "all" and r.get("wall_time_s"):
            times.setdefault(r["label"], []).append(sum(r["wall_time_s"].values()))
    labels = [label for pair in pairs for label in pair]
    out += ["", "**Wall time per fine-tuning job** on the labelled subsets (every step of the job, mean over its "
            "runs):", "", "| initialisation | runs | mean per job |", "|---|---|---|"]
    out += [f"| {label} | {len(times[label])} | {_minutes(np.mean(times[label]))} |"
            for label in dict.fromkeys(labels) if label in times]
    return out


def validation_table(records: Sequence[dict], order: Sequence[str] | None = None) -> list[str]:
    """Markdown lines: the best validation Dice (model selection) per initialisation x |XL|, mean ± std over runs, and
    per initialisation over all its runs with a labelled subset: the score that chooses between pre-training recipes,
    since the test volumes must not. Empty when no record has "val_dice"."""
    scored = [r for r in records if r.get("val_dice") is not None]
    if not scored:
        return []
    sizes = [s for s in _sizes(scored) if s != "all"]
    out = ["", "**Best validation Dice** (the validation volumes, the score that selected each model.pt; use it, not "
           "the test Dice, to choose between initialisations): mean ± std over runs; last column over all of an "
           "initialisation's runs on labelled subsets.", "",
           "| initialisation | " + " | ".join(_xl(s) for s in sizes) + " | all subsets |",
           "|---|" + "---|" * (len(sizes) + 1)]
    for label in _labels(scored, order):
        runs = [r for r in scored if r["label"] == label and r["num_labelled"] != "all"]
        cells = [_cell([r["val_dice"] for r in runs if r["num_labelled"] == s]) for s in sizes]
        out.append(f"| {label} | " + " | ".join(cells) + f" | {_cell([r['val_dice'] for r in runs])} |")
    return out


def study_claims(records: Sequence[dict]) -> list[str]:
    """The paper's claims checked against the results, one sentence each (computed, not judged): the ordering
    random < G^R < G^D- < G^D per |XL|, the local stage on top of G^D, and 2 labelled volumes within 8% of the
    benchmark. Initialisations are recognised by their recipe, whatever their labels."""
    groups = _group(records)
    by_recipe: dict[tuple, str] = {}
    for r in records:
        by_recipe.setdefault((r["recipe"]["global"], r["recipe"]["local"]), r["label"])

    def mean(label, size):
        return _mean_std([r["mean_dice"] for r in groups.get((label, size), [])])[0]

    lines = []
    for size in [s for s in _sizes(records) if s != "all"]:
        chain = [(by_recipe[k], mean(by_recipe[k], size)) for k in PAPER_ORDER if k in by_recipe]
        chain = [(label, m) for label, m in chain if not np.isnan(m)]
        if len(chain) >= 2:
            holds = all(a[1] < b[1] for a, b in zip(chain, chain[1:]))
            text = " < ".join(f"{label} ({m:.3f})" for label, m in chain)
            verdict = "holds" if holds else "does not hold"
            lines.append(f"{_xl(size, False)}: {text} — the paper's ordering {verdict}.")
        base = by_recipe.get(("domain", None))
        for local in ("random", "domain"):
            top = by_recipe.get(("domain", local))
            if base and top and not np.isnan(mean(base, size)) and not np.isnan(mean(top, size)):
                gain = mean(top, size) - mean(base, size)
                pairs = _paired_gains(groups, base, top, size)
                better = sum(d > 0 for d in pairs)
                verdict = ("helps" if pairs and better == len(pairs) else "does not help" if better == 0
                           else "helps in some subsets, not in others")
                lines.append(f"{_xl(size, False)}: {top} vs {base}: {gain:+.3f}, better in {better}/{len(pairs)} "
                             f"paired subsets — the local stage {verdict}.")
    bench = _benchmark(records)
    if bench is not None and (2 in _sizes(records)):
        best = max(((label, mean(label, 2)) for (label, s) in groups if s == 2), key=lambda x: x[1])
        gap = 1 - best[1] / bench[0]
        verdict = "holds" if gap <= 0.08 else "does not hold"
        lines.append(f"|XL| = 2: the best initialisation, {best[0]} ({best[1]:.3f}), is {100 * gap:.1f}% below the "
                     f"benchmark ({bench[0]:.3f}) — the paper's 'within 8%' {verdict}.")
    return lines


def loss_summary(curves: Mapping[str, Sequence[tuple[str, str, str]]], fraction: float = 0.05) -> dict[str, dict]:
    """Per pre-training stage (``{panel: [(name, log_dir, tag), ...]}``): iterations and the mean loss over the first
    and last ``fraction`` of its iterations; stages whose logs cannot be read are left out."""
    summary = {}
    for entries in curves.values():
        for name, log_dir, tag in entries:
            try:
                steps, values = read_scalars(log_dir, tag)
            except (KeyError, OSError):
                continue
            if len(values):
                k = max(1, int(len(values) * fraction))
                summary[name] = {"iterations": int(steps[-1]), "first": float(values[:k].mean()),
                                 "last": float(values[-k:].mean())}
    return summary


def selection_table(selected: Sequence[dict], records: Sequence[dict]) -> list[str]:
    """Markdown lines: each fine-tuning on selected volumes (a record with "selection", the rule) against the runs of
    the same initialisation and |XL| on the random labelled subsets (``records``): its Dice, the random runs' mean
    [min, max] (count) and its rank among all of them (1 = best), on the test volumes and, to choose a rule without
    looking at the test volumes, on the validation volumes (best validation Dice)."""
    if not selected:
        return []
    out = ["", "## Which volumes to label first", "",
           "Fine-tuning on the volumes a rule selected (scripts/selection.py) against the same initialisation on the "
           "random labelled subsets of that size: Dice of the selection, the random subsets' mean [min, max] "
           "(count), and the selection's rank among all of them (1 = best). Choose a rule on the validation columns.",
           "", "| initialisation | labelled | rule | test: selected | test: random subsets | test rank | "
           "validation: selected | validation: random subsets | validation rank |", "|---" * 9 + "|"]

    def compare(value, others) -> tuple[str, str, str]:
        others = [v for v in others if v is not None]
        if value is None:
            return "–", "–", "–"
        spread = f"{np.mean(others):.3f} [{min(others):.3f}, {max(others):.3f}] ({len(others)})" if others else "–"
        return f"{value:.3f}", spread, f"{1 + sum(v > value for v in others)} of {len(others) + 1}"

    for r in sorted(selected, key=lambda r: (r["label"], r["num_labelled"], r["selection"], r["seed"])):
        random_runs = [x for x in records if x["label"] == r["label"] and x["num_labelled"] == r["num_labelled"]
                       and x["seed"] == r["seed"] and "selection" not in x]
        test = compare(r.get("mean_dice"), [x.get("mean_dice") for x in random_runs])
        val = compare(r.get("val_dice"), [x.get("val_dice") for x in random_runs])
        out.append(f"| {r['label']} | {_xl(r['num_labelled'])} | {r['selection']} | " + " | ".join(test + val) + " |")
    chosen = {(r["num_labelled"], r["selection"], r["seed"]): r["chosen"] for r in selected if r.get("chosen")}
    if chosen:   # the same volumes for every initialisation: one line per |XL|, rule and seed
        out += ["", "Volumes chosen, in the order chosen:", ""]
        out += [f"- {rule}, {_xl(size)}, seed {seed}: {', '.join(names)}"
                for (size, rule, seed), names in sorted(chosen.items())]
    return out


def study_markdown(records: Sequence[dict], stages: Sequence[dict] = (), order: Sequence[str] | None = None,
                   losses: Mapping[str, dict] | None = None, title: str = "", protocol: Mapping | None = None,
                   selected: Sequence[dict] = (), comparisons: Sequence[Sequence[str]] = ()) -> str:
    """The report of a study as markdown: tables, the paper's claims checked, the selections against random subsets
    (``selected``: records of fine-tunings on selected volumes, kept out of the other tables), the ``comparisons``
    (pairs of labels, ``comparison_table``), pre-training losses, wall time, machine and protocol."""
    out = [f"# {title}" if title else "# Results", "",
           f"{len(records)} fine-tuning runs, each evaluated on the same {len(records[0]['volumes'])} test volume(s) "
           "(3D Dice per class on the native grid); model selection on the validation volumes only.", "",
           study_tables(records, order)]
    out += comparison_table(records, comparisons)
    claims = study_claims(records)
    if claims:
        out += ["", "## The paper's claims, checked", ""] + [f"- {c}" for c in claims]
    out += selection_table(selected, records)
    pretrainings = [s for s in stages if s.get("kind") in ("global", "local")]
    if pretrainings:
        out += ["", "## Pre-training", "",
                "| stage | iterations | loss, first 5% | loss, last 5% | stopped by | wall time |",
                "|---|---|---|---|---|---|"]
        for s in pretrainings:
            loss = (losses or {}).get(s["id"])
            cells = [str(loss["iterations"]), f"{loss['first']:.3f}", f"{loss['last']:.3f}"] if loss else ["–"] * 3
            cells.append(s["stop"]["reason"] if s.get("stop") else "–")  # plateau | budget (the stopping rule's report)
            out.append(f"| {s['id']} | " + " | ".join(cells) + f" | {_minutes(sum(s['wall_time_s'].values()))} |")
    timed = [*stages, *records, *selected]   # every job: pre-trainings, selections, every fine-tuning
    times: dict[str, list[float]] = {}
    for record in timed:
        for step, seconds in record.get("wall_time_s", {}).items():
            times.setdefault(step, []).append(seconds)
    total = sum(sum(v) for v in times.values())
    machines = sorted({f"{m['node']} ({m['cpus']} CPUs, {m['platform']})" for m in
                       (r.get("machine") for r in timed) if m})
    elapsed = _elapsed(timed)
    span = (f" From the first job's start to the last job's end: {_minutes(elapsed)} (less than the total when jobs "
            "ran side by side, more when the runner was paused between starts)." if elapsed else "")
    out += ["", "## Wall time", "", f"Total {_minutes(total)} over {len(timed)} jobs, on "
            + "; ".join(machines) + "." + span, "", "| step | runs | mean per run | total |", "|---|---|---|---|"]
    out += [f"| {step} | {len(v)} | {_minutes(np.mean(v))} | {_minutes(sum(v))} |" for step, v in times.items()]
    if protocol:
        import yaml

        dumped = yaml.safe_dump(dict(protocol), sort_keys=False, allow_unicode=True, default_flow_style=None)
        out += ["", "## Protocol (config overrides per stage)", "", "```yaml", dumped.rstrip(), "```"]
    return "\n".join(out) + "\n"


def _elapsed(records: Sequence[dict]) -> float | None:
    """Seconds from the earliest job start (``finished`` minus its ``wall_time_s``) to the latest ``finished``."""
    import datetime

    spans = []
    for r in records:
        if r.get("finished") and r.get("wall_time_s"):
            end = datetime.datetime.fromisoformat(r["finished"]).timestamp()
            spans.append((end - sum(r["wall_time_s"].values()), end))
    return max(e for _, e in spans) - min(s for s, _ in spans) if spans else None


def _minutes(seconds: float) -> str:
    seconds = float(seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def plot_dice_vs_labelled(records: Sequence[dict], output: str, order: Sequence[str] | None = None) -> str:
    """Mean test Dice against |XL| (log axis) per initialisation, error bars = std over runs; the benchmark (all
    labelled volumes) as a horizontal band. Writes a PNG at ``output``."""
    plt = pyplot()
    groups = _group(records)
    sizes = [s for s in _sizes(records) if s != "all"]
    labels = _labels(records, order)
    beside = len(labels) > 6   # a long legend goes beside the axes, not over the points
    fig, ax = plt.subplots(figsize=(10.0 if beside else 6.4, 4.2))
    colours = plt.get_cmap("tab20" if len(labels) > 10 else "tab10").colors
    for k, label in enumerate(labels):
        points = [(s, *_mean_std([r["mean_dice"] for r in groups[(label, s)]])) for s in sizes if (label, s) in groups]
        if points:
            x, mean, std = map(np.array, zip(*points))
            x = x * 2 ** (0.03 * (k - (len(labels) - 1) / 2))   # a small horizontal offset keeps error bars apart
            ax.errorbar(x, mean, yerr=std, marker="osD^v"[k % 5], color=colours[k % len(colours)], capsize=3,
                        label=label)
    bench = [r for r in records if r["num_labelled"] == "all" and r.get("mean_dice") is not None]
    if bench:
        mean, std = _mean_std([r["mean_dice"] for r in bench])
        count = bench[0].get("num_train_volumes")
        name = f"all {count} labelled volumes" if count else "all labelled volumes"
        ax.axhline(mean, color="k", linestyle="--", linewidth=1, label=f"{name} ({bench[0]['label']})")
        ax.axhspan(mean - std, mean + std, color="k", alpha=0.08)
    ax.set_xscale("log", base=2)
    if sizes:
        ax.set_xticks(sizes, [str(s) for s in sizes])
        ax.set_xlim(min(sizes) / 1.6, max(sizes) * 1.6)
        ax.minorticks_off()
    ax.set(xlabel="labelled training volumes |XL|", ylabel="mean test Dice (foreground)",
           title="Test Dice against the number of labelled volumes")
    ax.grid(alpha=0.3)
    if beside:
        ax.legend(fontsize=7, frameon=False, loc="center left", bbox_to_anchor=(1.01, 0.5))
    else:
        ax.legend(fontsize=8, frameon=False)
    return save_figure(fig, output)


def plot_loss_curves(curves: Mapping[str, Sequence[tuple[str, str, str]]], output: str, smooth: int = 50) -> str:
    """One panel per entry of ``{panel title: [(name, log_dir, tag), ...]}``, a running mean of each loss curve."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(curves), figsize=(5.5 * len(curves), 3.6), squeeze=False)
    for ax, (title, entries) in zip(axes[0], curves.items()):
        for name, log_dir, tag in entries:
            try:
                steps, values = read_scalars(log_dir, tag)
            except (KeyError, OSError):
                continue
            ax.plot(*running_mean(steps, values, max(1, min(smooth, len(values) // 5))), label=name)
        ax.set(title=title, xlabel="iteration", ylabel=f"loss (running mean of {smooth})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, frameon=False)
    return save_figure(fig, output)


def plot_examples(rows: Sequence[Mapping], output: str) -> str:
    """A grid of example slices: per row the image and then each labelled panel overlaid on it.

    ``rows``: ``[{"title": str, "image": (H, W) array, "panels": [(name, (H, W) integer label map), ...]}, ...]``.
    """
    plt = pyplot()
    from matplotlib.colors import ListedColormap

    colours = ListedColormap([(0, 0, 0, 0), (0.9, 0.2, 0.2, 0.55), (0.2, 0.8, 0.2, 0.55), (0.2, 0.4, 1.0, 0.55),
                              (1.0, 0.8, 0.1, 0.55), (0.8, 0.2, 0.9, 0.55), (0.1, 0.9, 0.9, 0.55), (1, 1, 1, 0.55)])
    columns = 1 + max(len(r["panels"]) for r in rows)
    fig, axes = plt.subplots(len(rows), columns, figsize=(2.7 * columns, 2.9 * len(rows)), squeeze=False)
    for row, ax_row in zip(rows, axes):
        image = np.asarray(row["image"], dtype=float)
        ax_row[0].imshow(image.T, cmap="gray", origin="lower")
        ax_row[0].set_title("image", fontsize=8)
        ax_row[0].set_ylabel(row["title"], fontsize=7)
        for ax, (name, labels) in zip(ax_row[1:], row["panels"]):
            ax.imshow(image.T, cmap="gray", origin="lower")
            ax.imshow(np.asarray(labels).T, cmap=colours, vmin=0, vmax=colours.N - 1, origin="lower",
                      interpolation="nearest")
            ax.set_title(name, fontsize=8)
        for ax in ax_row:
            ax.set_xticks([])
            ax.set_yticks([])
    return save_figure(fig, output)
