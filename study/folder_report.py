"""The report of an experiment folder (``python -m study.experiments report``): ``results.md`` (``study.report``'s
tables and claims), Dice against |XL|, the pre-training loss curves and example test slices, from the folder's
``plan.yaml`` and ledgers (``study.ledger``).

The example slices are predicted here, in-process: each chosen run's ``models/model.pt`` is loaded into the
config's ``network_def`` and run on the test volume pre-processed by the config's ``train#preprocessing``
(``train.yaml`` with the plan's overrides), so the slices are shown on the network's input grid.
"""

from __future__ import annotations

import json
import os

import yaml

from study.configs import read_configs
from study.ledger import PLAN_COPY, RESULTS, STAGES_FILE, read_ledger, write_text
from study.plan import load_plan, normalise_plan
from study.results import nanmean


def report(target: str, output: str, examples: bool = True, experiment_dir: str | None = None) -> list[str]:
    """Tables (markdown), Dice against |XL| (PNG), pre-training loss curves (PNG) and example test slices (PNG) from
    an experiment folder's results; ``target`` is the plan file or the experiment folder. Returns the files written.

    The example slices are predicted here, in-process: each chosen run's ``models/model.pt`` is loaded into the
    config's ``network_def`` and run on the test volume pre-processed by the config's ``train#preprocessing``
    (``train.yaml`` with the plan's overrides), so the slices are shown on the network's input grid.
    """
    from study import report as tables

    exp, plan = _experiment(target, experiment_dir)
    records = read_ledger(os.path.join(exp, RESULTS))
    selected = [r for r in records if r.get("selection")]   # fine-tunings on selected volumes: their own table
    records = [r for r in records if not r.get("selection")]
    if selected:
        _add_chosen_volumes(selected, plan["dataset"]["dataset_dir"])
    if not records:
        raise ValueError(f"{os.path.join(exp, RESULTS)} holds no result on labelled subsets yet.")
    stages = read_ledger(os.path.join(exp, STAGES_FILE))
    order = [i["label"] for i in plan["initialisations"]]
    os.makedirs(output, exist_ok=True)
    written = []
    curves = _loss_curves(stages, exp)
    losses = tables.loss_summary(curves)
    protocol = dict(plan["protocol"])
    if plan["benchmark"] and plan["benchmark"]["finetune"]:   # the all-labels runs' own overrides
        protocol["finetune on labelled_all"] = plan["benchmark"]["finetune"]
    text = tables.study_markdown(records, stages, order, losses=losses, title=plan.get("description") or plan["name"],
                                 protocol=protocol, selected=selected, comparisons=_comparisons(plan))
    written.append(write_text(os.path.join(output, "results.md"), text))
    written.append(tables.plot_dice_vs_labelled(records, os.path.join(output, "dice_vs_labelled.png"), order))
    if curves:
        written.append(tables.plot_loss_curves(curves, os.path.join(output, "pretraining_losses.png")))
    if examples:
        rows = example_rows(plan, records, exp)
        if rows:
            written.append(tables.plot_examples(rows, os.path.join(output, "examples.png")))
        else:
            print("no example figure: no |XL| with both a random-initialisation run and a pre-trained run")
    for path in written:
        print(path)
    return written


def _comparisons(plan: dict) -> list[tuple[str, str]]:
    """The plan's ``comparisons`` (pairs of initialisation names) as pairs of their labels."""
    label = {i["name"]: i["label"] for i in plan["initialisations"]}
    return [(label[base], label[other]) for base, other in plan["comparisons"]]


def _experiment(target: str, experiment_dir: str | None) -> tuple[str, dict]:
    """The experiment folder ``target`` names (a plan file or the folder; ``experiment_dir`` replaces it) and the
    plan of its last start (its ``plan.yaml``, checked). Raises FileNotFoundError when the folder has no plan copy."""
    if os.path.isfile(target):
        exp = load_plan(target, experiment_dir)["experiment_dir"]
    else:
        exp = os.path.abspath(experiment_dir or target)
    copy = os.path.join(exp, PLAN_COPY)
    if not os.path.isfile(copy):
        raise FileNotFoundError(f"{copy} not found: {exp} is not an experiment folder written by this runner.")
    with open(copy) as f:
        return exp, normalise_plan(yaml.safe_load(f), source=copy)


def _loss_curves(stages: list[dict], exp: str) -> dict[str, list[tuple[str, str, str]]]:
    """{panel: [(stage id, TensorBoard log folder, loss tag)]} of the pre-training stages; each stage's line gains
    ``stop``, the stopping rule's report (scripts.engines.PlateauStop: why the stage ended), when there is one."""
    from scripts.report import STOP_FILE

    curves: dict[str, list[tuple[str, str, str]]] = {}
    for record in stages:
        if record["kind"] in ("global", "local"):
            panel = "global stage" if record["kind"] == "global" else "local stage (encoder frozen)"
            curves.setdefault(panel, []).append((record["id"], os.path.join(exp, record["log_dir"]), record["tag"]))
            stop = os.path.join(exp, os.path.dirname(record["log_dir"]), STOP_FILE.format(stage=record["kind"]))
            if os.path.isfile(stop):
                with open(stop) as f:
                    record["stop"] = json.load(f)
    return curves


def _add_chosen_volumes(selected: list[dict], dataset_dir: str) -> None:
    """Set each selection record's ``chosen``: the names of the volumes its datalist key (``train_key``) holds, in the
    order the rule chose them (file names without folder and extension); [] when the datalist, or its key, is gone
    (a report from the ledgers alone still works)."""
    from scripts.inference import output_name  # a file's name without folder and extension

    path = os.path.join(dataset_dir, "datalist.json")
    datalist = {}
    if os.path.isfile(path):
        with open(path) as f:
            datalist = json.load(f)
    for record in selected:
        record["chosen"] = [output_name(entry["image"]) for entry in datalist.get(record.get("train_key"), [])]


def example_rows(plan: dict, records: list[dict], exp: str) -> list[dict]:
    """Rows of the example figure, one per |XL| in ``plan["examples"]["num_labelled"]`` and test volume: the random
    initialisation against the best pre-training at that |XL| (highest mean Dice over its runs), both on the same
    labelled subset and seed (the first they share). The test volume is the one with the median Dice of the best
    pre-training's run (not a hand-picked one); the slice is the one with the largest ground-truth foreground.

    Each row: "title", "image" (H, W) and "panels" [(caption, (H, W) label map)]: ground truth, random, best."""
    predictor = _Predictor(plan, exp)
    rows = []
    for size in plan["examples"]["num_labelled"]:
        pair = _example_pair(records, size)
        if pair is None:
            continue
        random_run, best_run = pair
        volumes = sorted(best_run["volumes"], key=lambda v: nanmean(v["dice"]) or 0.0)
        middle = (len(volumes) - 1) // 2
        for volume in volumes[middle : middle + plan["examples"]["volumes"]]:
            row = predictor.row(size, random_run, best_run, os.path.abspath(volume["image"]))
            if row is not None:
                rows.append(row)
    return rows


def _example_pair(records: list[dict], size) -> tuple[dict, dict] | None:
    """(random-initialisation run, best pre-training's run) at |XL| = ``size`` on the first (subset, seed) they
    share, or None when there is no such pair."""
    at_size = [r for r in records if r["num_labelled"] == size and r.get("mean_dice") is not None]
    random_runs = {(r["subset"], r["seed"]): r for r in at_size if r["recipe"]["global"] is None}
    means: dict[str, list[float]] = {}
    for r in at_size:
        if r["recipe"]["global"] is not None:
            means.setdefault(r["label"], []).append(r["mean_dice"])
    if not random_runs or not means:
        return None
    best = max(means, key=lambda k: sum(means[k]) / len(means[k]))
    pairs = sorted((r["subset"], r["seed"]) for r in at_size if r["label"] == best
                   and (r["subset"], r["seed"]) in random_runs)
    if not pairs:
        return None
    best_run = next(r for r in at_size if r["label"] == best and (r["subset"], r["seed"]) == pairs[0])
    return random_runs[pairs[0]], best_run


def _volume_dice(run: dict, image_path: str) -> float | None:
    """The mean Dice over classes of ``run`` on the test volume at ``image_path``."""
    match = next(v for v in run["volumes"] if os.path.abspath(v["image"]) == image_path)
    return nanmean(match["dice"])


class _Predictor:
    """The plan's pre-processing and network (``train.yaml`` with the protocol's common and evaluate overrides, on
    the CPU), and the test volumes' labels from the datalist."""

    def __init__(self, plan: dict, exp: str):
        self.exp = exp
        protocol = plan["protocol"]
        self.parser = read_configs(("train.yaml",), {
            "dataset_dir": plan["dataset"]["dataset_dir"], **protocol["common"], **protocol["evaluate"],
            "device": "$torch.device('cpu')", "use_pretrained": False})   # the data's contract alone
        self.preprocessing = self.parser.get_parsed_content("train#preprocessing")
        with open(os.path.join(plan["dataset"]["dataset_dir"], "datalist.json")) as f:
            datalist = json.load(f)

        def absolute(name: str) -> str:
            return os.path.abspath(os.path.join(plan["dataset"]["dataset_dir"], name))

        self.labels_of = {absolute(c["image"]): absolute(c["label"]) for c in datalist["test"]}   # image -> label

    def predict(self, record: dict, image):
        """The label map (Z, H, W) the run of ``record`` predicts for ``image`` (1, H, W, Z), slice by slice."""
        import torch

        network = self.parser.get_parsed_content("network_def", instantiate=True, lazy=False)
        state = torch.load(os.path.join(self.exp, record["model_dir"], "model.pt"), map_location="cpu",
                           weights_only=True)
        network.load_state_dict(state.get("model", state))
        network.eval()
        with torch.no_grad():
            slices = image[0].permute(2, 0, 1)[:, None]   # (Z, 1, H, W)
            return network(slices).argmax(1).numpy()      # (Z, H, W)

    def row(self, size, random_run: dict, best_run: dict, image_path: str) -> dict | None:
        """The figure row of one test volume (None when it is not in the datalist's test list)."""
        import torch

        if image_path not in self.labels_of:
            return None
        item = self.preprocessing({"image": image_path, "label": self.labels_of[image_path]})
        image, label = torch.as_tensor(item["image"]).float(), torch.as_tensor(item["label"])
        ground_truth = label[0].permute(2, 0, 1).numpy().astype(int)   # (Z, H, W)
        z = int((ground_truth > 0).reshape(len(ground_truth), -1).sum(1).argmax())
        name = os.path.basename(image_path).split(".")[0]
        subset, seed = best_run["subset"], best_run["seed"]
        return {
            "title": f"|XL| = {size}, subset {subset}, seed {seed}: {name}, slice {z}",
            "image": image[0, :, :, z].numpy(),
            "panels": [("ground truth", ground_truth[z]),
                       (f"{random_run['label']} (volume Dice {_volume_dice(random_run, image_path):.3f})",
                        self.predict(random_run, image)[z]),
                       (f"{best_run['label']} (volume Dice {_volume_dice(best_run, image_path):.3f})",
                        self.predict(best_run, image)[z])],
        }
