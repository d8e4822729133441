"""The results line of a finished fine-tuning job, and the datalist check it relies on.

A results line (``results.jsonl``, see ``study.report`` for every key) holds the job's ``info`` (``study.jobs``),
the per-volume Dice per class of the evaluation CSV, their means, the best validation Dice and the number of
training volumes. The class names come from the data contract in ``datalist.json``.
"""

from __future__ import annotations

import json
import os

from study.configs import all_labelled_key
from study.jobs import Job


def check_datalist(plan: dict, jobs: list[Job]) -> tuple[list, dict]:
    """The datalist must hold every list the jobs read; returns its class names (the data contract's, background
    first, or []) and the number of volumes of each list. Raises FileNotFoundError (no datalist) or ValueError
    (a list is missing)."""
    path = os.path.join(plan["dataset"]["dataset_dir"], "datalist.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: give dataset.prepare in the plan, or prepare the dataset first.")
    with open(path) as f:
        datalist = json.load(f)
    needed = {"validation", "test"}
    needed |= {"pretrain" for j in jobs if j.kind in ("global", "local")}
    needed |= {all_labelled_key() for j in jobs if j.kind == "select"}   # the pool the selections choose from
    needed |= {j.info["train_key"] for j in jobs if j.kind == "finetune" and "selection" not in j.info}
    missing = sorted(k for k in needed if not isinstance(datalist.get(k), list))
    if missing:
        raise ValueError(f"{path} lacks {missing}: prepare the dataset with more subsets (split#num_subsets, "
                         "split#subset_sizes in dataset.overrides) or plan fewer.")
    names = (datalist.get("contract") or {}).get("class_names") or []
    return names, {k: len(v) for k, v in datalist.items() if isinstance(v, list)}


def _class_names(class_names: list, count: int) -> list[str]:
    if len(class_names) == count + 1:
        return list(class_names[1:])
    return [f"class {k + 1}" for k in range(count)]


def result_line(job: Job, experiment_dir: str, class_names: list, sizes: dict) -> dict:
    """The results line of a finished fine-tuning job (without id, config, times): per-volume Dice per class from
    the evaluation CSV, and the best validation Dice of the fine-tuning ("val_dice", the model-selection score; None
    when it was never validated). ``class_names`` and ``sizes`` are what ``check_datalist`` returned."""
    from study.report import best_validation_dice, read_dice_rows  # numpy and the bundle's scripts: when needed

    output_dir = os.path.join(experiment_dir, job.info["output_dir"])
    names, dice = read_dice_rows(os.path.join(output_dir, "test"))
    per_volume = [nanmean(row) for row in dice]
    classes = _class_names(class_names, len(dice[0]) if dice else 0)
    return {
        **job.info,
        "num_train_volumes": sizes.get(job.info["train_key"], job.info["num_labelled"]),   # selections: written later
        "classes": classes,
        "volumes": [{"image": n, "dice": [None if v != v else v for v in row]} for n, row in zip(names, dice)],
        "class_dice": [nanmean([row[c] for row in dice]) for c in range(len(classes))],
        "mean_dice": nanmean(per_volume),
        "val_dice": best_validation_dice(output_dir),
    }


def nanmean(values) -> float | None:
    """The mean of ``values`` leaving out None and NaN; None when nothing is left."""
    values = [v for v in values if v is not None and v == v]
    return sum(values) / len(values) if values else None
