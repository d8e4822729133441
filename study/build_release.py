"""Build the release from real data in one resumable command: ``make release DATA=<folder>`` (docs/release.md).

Repository tooling, not shipped in the bundle. From the repository root::

    PYTHONPATH=bundle python -m study.build_release --data <ACDC folder>           # the release (hours on a CPU)
    PYTHONPATH=bundle python -m study.build_release --data <ACDC folder> --quick   # the same chain on tiny budgets

The chain is the study plan ``docs/experiments/release.yaml`` run by the study runner (``study.experiments``: its
ledger makes every finished step skip on a rerun, and it prints each step's time and the time left):

1. prepare the data (``PREPARE``, default ``prepare_acdc``): a patient-level split; the images of the training pool
   serve pre-training, their labels only fine-tuning; validation and test patients serve neither;
2. pre-train G^D then L^R, each stage until its plateau rule (``scripts.engines.PlateauStop``) ends it; its report
   ``pretrain_<stage>_stop.json`` must say ``converged: true``, else the release stops here (``--allow_unconverged``
   goes on and the model card says so);
3. fine-tune ``model.pt`` from ``pretrained_local.pt`` on every labelled training volume (``labelled_all``), with model
   selection on the validation patients; the best validation Dice must come before the last quarter of the budget
   (more steps no longer improved it), checked the same way;
4. evaluate ``model.pt`` on the test patients, used for nothing else; that mean Dice goes into the archive's
   ``metadata.json`` (``eval_metrics``) and its model card;
5. pack (``study.release.pack``): the archive, the three weight files and ``large_files.yml`` in ``--dist``, with the
   dataset, its licence, the commands run and each stage's stopping report in the model card.

``--quick`` merges the plan's ``quick`` section over it (tiny budgets, 32 px), names the archive ``..._NOT_FOR_USE.zip``
and marks its model card and metadata as not for use.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

import numpy as np
import yaml

from scripts.files import atomic_copy, atomic_write_text
from study.jobs import Job, build_jobs
from study.ledger import done_records
from study.plan import normalise_plan
from study.release import ROOT, ReleaseError
from study.release import install as install_release
from study.release import pack
from study.scheduler import run as run_study

PLAN = os.path.join(ROOT, "docs", "experiments", "release.yaml")
NOT_FOR_USE = "_NOT_FOR_USE"
# what the model card says about the data of an adapter when DATASET / DATA_LICENCE are not given
KNOWN_DATA = {
    "prepare_acdc": ("ACDC, the Automated Cardiac Diagnosis Challenge (Bernard et al., IEEE TMI 2018, "
                     "https://www.creatis.insa-lyon.fr/Challenge/acdc/)",
                     "CC BY-NC-SA 4.0 (non-commercial scientific research; cite Bernard et al. 2018); weights trained "
                     "on ACDC inherit these terms"),
}


def _merge(base: dict, extra: dict) -> dict:
    """``base`` with ``extra`` merged in, mapping by mapping."""
    merged = dict(base)
    for key, value in extra.items():
        merged[key] = _merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return merged


def release_plan(data: str, prepare: str = "prepare_acdc", quick: bool = False, finetune_epochs: int | None = None,
                 release_dir: str | None = None, prepare_options: dict | None = None, plan_file: str = PLAN) -> dict:
    """The study plan of this release (checked by ``study.plan.normalise_plan``): ``plan_file`` with its ``quick``
    section merged in when ``quick``, the raw data folder, the prepare run id and its extra options, the fine-tuning
    budget in epochs and the experiment folder filled in."""
    with open(plan_file) as f:
        plan = yaml.safe_load(f)
    quick_section = plan.pop("quick", {})
    checks = plan.pop("release_checks")
    if quick:
        plan = _merge(plan, quick_section)
    if not os.path.isdir(data):
        raise ReleaseError(f"DATA={data}: no such folder (give the raw dataset's folder, e.g. the ACDC training set).")
    plan["dataset"].update(raw_dir=os.path.abspath(data), prepare=prepare)
    plan["dataset"]["overrides"] = {**plan["dataset"].get("overrides", {}), **(prepare_options or {})}
    if finetune_epochs is not None:
        plan["protocol"]["finetune"]["max_epochs"] = int(finetune_epochs)
    plan["experiment_dir"] = os.path.abspath(release_dir or os.path.join(ROOT, plan["experiment_dir"]))
    return {**normalise_plan(plan, source=plan_file), "release_checks": checks}


def stage_jobs(plan: dict) -> dict[str, Job]:
    """The plan's jobs by kind: "prepare", "global", "local", "finetune" (one each)."""
    return {job.kind: job for job in build_jobs(plan)}


def stop_reports(plan: dict) -> dict[str, dict]:
    """Each pre-training stage's stopping report (``pretrain_<stage>_stop.json``), by stage."""
    from scripts.report import STOP_FILE

    reports = {}
    for stage, job in stage_jobs(plan).items():
        if stage in ("global", "local"):
            path = os.path.join(job.folder, "eval", STOP_FILE.format(stage=stage))
            if not os.path.isfile(path):
                raise ReleaseError(f"{path} not found: the {stage} pre-training stage did not finish.")
            with open(path) as f:
                reports[stage] = {**json.load(f), "file": path}
    return reports


def trend_check(values, window: float, max_rise: float, min_t: float) -> dict:
    """Whether a fine-tuning's validation Dice has stopped rising, judged on its trend, not on its noisiest point.

    A straight line is fitted by least squares to the last ``window`` fraction of ``values`` (validation Dice per
    epoch, shape (E,), E >= 4). The run is still rising when the slope is significantly positive (its t statistic,
    slope over its standard error, at least ``min_t``) and the line would add at least ``max_rise`` Dice over another
    quarter of the epochs; otherwise it has converged. On two validation volumes the per-epoch Dice swings by several
    hundredths, so the epoch of the single best value says little; the trend says whether more steps would help.

    Returns {"epochs", "best_epoch", "best_dice", "window_epochs", "slope" (Dice per epoch), "t", "rise" (Dice the
    line adds over E / 4 more epochs), "converged", "explanation"}.
    """
    values = np.asarray(values, dtype=np.float64)
    epochs = len(values)
    if epochs < 4:
        raise ReleaseError(f"the fine-tuning validated {epochs} times: at least 4 are needed to judge its trend.")
    n = max(3, int(round(epochs * window)))
    x, y = np.arange(epochs - n, epochs, dtype=np.float64), values[-n:]
    slope, intercept = np.polyfit(x, y, 1)
    residual = y - (slope * x + intercept)
    spread = np.sqrt((residual @ residual) / (n - 2) / ((x - x.mean()) @ (x - x.mean())))
    t = float(slope / spread) if spread > 0 else (float("inf") if slope > 0 else 0.0)
    rise = float(slope * epochs / 4)
    converged = not (t >= min_t and rise >= max_rise)
    explanation = (f"over the last {n} of {epochs} validations the Dice trend is {slope:+.5f} per epoch (t = {t:.2f}; "
                   f"{rise:+.4f} over another {epochs / 4:g} epochs): "
                   + ("no significant rise" if converged else "still rising") +
                   f" (rule: still rising when t >= {min_t:g} and the rise >= {max_rise:g})")
    return {"epochs": epochs, "best_epoch": int(values.argmax()) + 1, "best_dice": float(values.max()),
            "window_epochs": n, "slope": float(slope), "t": t, "rise": rise, "converged": converged,
            "explanation": explanation}


def finetune_report(plan: dict, record: dict) -> dict:
    """``trend_check`` of the shipped model's fine-tuning (its validation Dice per epoch, from its TensorBoard log),
    with the plan's ``release_checks``."""
    from scripts.report import read_scalars
    from study.report import VALIDATION_TAG

    _, values = read_scalars(os.path.join(plan["experiment_dir"], record["output_dir"]), VALIDATION_TAG)
    return trend_check(values, **plan["release_checks"])


def unconverged(reports: dict[str, dict], finetuning: dict | None = None) -> list[str]:
    """One line per step that did not converge: a pre-training stage whose report does not say ``converged: true``
    (it stopped on its budget, or the rule could not judge), the fine-tuning when its validation Dice still rises."""
    lines = [f"pre-training stage {stage} stopped by '{r['reason']}' at iteration {r['iteration']} with converged = "
             f"{r['converged']} ({r['explanation']})" for stage, r in reports.items() if r["converged"] is not True]
    if finetuning is not None and not finetuning["converged"]:
        lines.append(f"fine-tuning: {finetuning['explanation']}")
    return lines


def check_converged(reports: dict[str, dict], finetuning: dict | None, allow: bool) -> list[str]:
    """``unconverged``'s lines; ``ReleaseError`` listing them unless ``allow``."""
    lines = unconverged(reports, finetuning)
    if lines and not allow:
        files = ", ".join(r["file"] for r in reports.values())
        raise ReleaseError("refusing to release weights that did not converge:\n  " + "\n  ".join(lines) + f"\n(the "
                           f"stopping reports: {files}.) Raise "
                           "the budget in docs/experiments/release.yaml (FINETUNE_EPOCHS for fine-tuning) and run "
                           "again in a new RELEASE_DIR, or release them as they are with ALLOW_UNCONVERGED=1 "
                           "(the model card then says so).")
    return lines


def command_lines(plan: dict) -> str:
    """The commands of the release's jobs, as the runner ran them, with ``python`` and repository-relative paths."""
    lines = []
    for job in build_jobs(plan):
        for _, command in job.steps:
            text = shlex.join(["python", *command[1:]])
            lines.append(text.replace(ROOT + os.sep, ""))
    return "\n".join(lines)


def model_card(plan: dict, reports: dict, finetuning: dict, record: dict, lines: list[str], quick: bool) -> str:
    """The model card section of this release: how it was trained, each stage's stopping report, the test Dice."""
    rows = [f"| {stage} | {r['reason']} | {r['iteration']} | {r['loss']:.4f} | {r['converged']} | {r['seconds']} | "
            f"{r['explanation']} |" for stage, r in reports.items()]
    finetune = plan["protocol"]["finetune"]
    classes = ", ".join(f"{name} {dice:.3f}" for name, dice in zip(record["classes"], record["class_dice"]))
    warning = []
    if quick:
        warning = ["**NOT FOR USE: a quick test release** (`make release QUICK=1`): tiny budgets, 32 px slices; its "
                   "weights and figures only show that the release machinery works.", ""]
    if lines:
        warning += ["**Released without convergence** (`ALLOW_UNCONVERGED=1`):", "",
                    *[f"- {line}" for line in lines], ""]
    return "\n".join([
        "", "## How this release was trained and evaluated", "", *warning,
        "Built by `make release` (`python -m study.build_release`; the repository's docs/release.md): the study plan "
        "docs/experiments/release.yaml run by the study runner, then packed.", "",
        "Pre-training stopping reports (`pretrain_<stage>_stop.json`, scripts.engines.PlateauStop):", "",
        "| stage | reason | iterations | last running loss | converged | seconds | explanation |",
        "|---|---|---|---|---|---|---|", *rows, "",
        f"`models/model.pt`: fine-tuned from `pretrained_local.pt` on every labelled training volume "
        f"({record['num_train_volumes']} volumes, datalist key `labelled_all`) for {finetuning['epochs']} epochs of "
        f"{finetune.get('iterations_per_epoch', 50)} steps; the best validation Dice, "
        f"{finetuning['best_dice']:.3f}, came at epoch {finetuning['best_epoch']} and selected the shipped weights.",
        "",
        "How each check decided: each pre-training stage by its plateau rule (the table's `converged` and "
        "explanation); the fine-tuning by the trend of its validation Dice (`release_checks` of "
        f"docs/experiments/release.yaml): {finetuning['explanation']}; "
        + ("converged." if finetuning["converged"] else "not converged."), "",
        f"**Test Dice of the shipped `models/model.pt`**: {record['mean_dice']:.3f} (mean over "
        f"{len(record['volumes'])} held-out test volumes of each volume's mean foreground Dice, 3D, on the native "
        f"grid; per class: {classes}). `configs/metadata.json` holds the same value in `eval_metrics`.", "",
        "What these weights are worth against random initialisation, in-domain and in transfer to another organ: the "
        "repository's docs/release.md.", "",
    ])


def build(data: str, prepare: str = "prepare_acdc", quick: bool = False, allow_unconverged: bool = False,
          finetune_epochs: int | None = None, release_dir: str | None = None, dist: str | None = None,
          url: str | None = None, dataset: str | None = None, data_licence: str | None = None,
          prepare_options: dict | None = None, echo: bool = True, install: bool = False) -> dict:
    """Run the release chain (module docstring); returns ``pack``'s written paths. ``ReleaseError`` on bad input,
    a failed step (its log named) or a step that did not converge (unless ``allow_unconverged``). ``install``: also
    make it the repository's release (``study.release.install``: bundle/models, large_files.yml); refused for
    ``quick``."""
    if install and quick:
        raise ReleaseError("a quick release is not for use: it is never installed into bundle/models (drop INSTALL).")
    if (dataset is None or data_licence is None) and prepare not in KNOWN_DATA:
        raise ReleaseError(f"say what {prepare} prepares and under which licence: DATASET=... DATA_LICENCE=... "
                           "(they go into the model card).")
    plan = release_plan(data, prepare, quick, finetune_epochs, release_dir, prepare_options)
    exp = plan["experiment_dir"]
    os.makedirs(exp, exist_ok=True)
    plan_file = os.path.join(exp, "release_plan.yaml")
    runner_plan = {key: value for key, value in plan.items() if key != "release_checks"}   # the runner's keys only
    atomic_write_text(yaml.safe_dump(runner_plan, sort_keys=False, allow_unicode=True), plan_file)
    if run_study(plan_file, echo=echo, kinds=("prepare", "global", "local")):
        raise ReleaseError(f"pre-training did not finish: see the logs under {exp} and run the same command again.")
    reports = stop_reports(plan)
    check_converged(reports, None, allow_unconverged)   # before hours of fine-tuning on weights that would be refused
    if run_study(plan_file, echo=echo, kinds=("finetune",)):
        raise ReleaseError(f"fine-tuning or evaluation did not finish: see the logs under {exp} and run again.")
    jobs = stage_jobs(plan)
    record = done_records(exp)[jobs["finetune"].id]
    if record["mean_dice"] is None:
        raise ReleaseError(f"the evaluation of {record['model_dir']} gave no Dice: see {record['output_dir']}/test.")
    finetuning = finetune_report(plan, record)
    lines = check_converged(reports, finetuning, allow_unconverged)

    models = os.path.join(exp, "release", "models")   # the three weight files and the commands, as pack reads them
    os.makedirs(models, exist_ok=True)
    for stage in ("global", "local"):
        atomic_copy(os.path.join(exp, jobs[stage].info["checkpoint"]), os.path.join(models, f"pretrained_{stage}.pt"))
    atomic_copy(os.path.join(exp, record["model_dir"], "model.pt"), os.path.join(models, "model.pt"))
    commands = os.path.join(models, "commands.log")
    invoked = shlex.join(["python", "-m", "study.build_release", *sys.argv[1:]]) if sys.argv[1:] else "build()"
    atomic_write_text(f"# make release: {invoked}\n{command_lines(plan)}\n", commands)

    known = KNOWN_DATA.get(prepare, (None, None))
    raw = os.path.basename(os.path.normpath(data))
    dataset = dataset or f"{known[0]}, from the folder `{raw}`: {record['num_train_volumes']} training-pool volumes"
    metric = f"mean_dice_test_{prepare.removeprefix('prepare_')}_all_labelled"
    metadata = {"eval_metrics": {metric: record["mean_dice"]}, "data_source": dataset}
    if quick:
        metadata["intended_use"] = "NOT FOR USE: a quick test release of the release machinery (make release QUICK=1)"
    card = model_card(plan, reports, finetuning, record, lines, quick)
    written = pack(url=url, models_dir=models, dist_dir=dist or os.path.join(exp, "dist"), commands=commands,
                   dataset=dataset, data_licence=data_licence or known[1], card=card, metadata=metadata,
                   tag=NOT_FOR_USE if quick else "")
    if install:
        written["installed"] = install_release(models, dataset, data_licence or known[1], card, metadata)
    print(f"test Dice of the shipped model.pt: {record['mean_dice']:.4f} ({metric})")
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="the raw dataset folder (DATA)")
    parser.add_argument("--prepare", default="prepare_acdc", help="prepare.yaml run id of its layout (PREPARE)")
    parser.add_argument("--prepare_options", default="{}", help="extra prepare overrides, a YAML mapping, e.g. "
                        "\"{decathlon#task: Task04_Hippocampus}\" (PREPARE_OPTIONS)")
    parser.add_argument("--quick", action="store_true", help="tiny budgets; the archive is marked not for use (QUICK)")
    parser.add_argument("--allow_unconverged", action="store_true", help="release a step that did not converge, "
                        "said in the model card (ALLOW_UNCONVERGED)")
    parser.add_argument("--finetune_epochs", type=int, help="fine-tuning budget in epochs of 50 steps "
                        "(FINETUNE_EPOCHS; default: docs/experiments/release.yaml)")
    parser.add_argument("--release_dir", help="the experiment folder (RELEASE_DIR; default runs/release or "
                        "runs/release_quick)")
    parser.add_argument("--dist", help="where the archive and weights go (DIST; default <release_dir>/dist)")
    parser.add_argument("--install", action="store_true", help="also copy the release into bundle/models and write "
                        "bundle/large_files.yml, to be committed (INSTALL)")
    parser.add_argument("--url", help="URL prefix of the weight files (RELEASE_URL)")
    parser.add_argument("--dataset", help="what the data is, for the model card (DATASET)")
    parser.add_argument("--data_licence", help="the data's licence, for the model card (DATA_LICENCE)")
    args = vars(parser.parse_args())
    args["prepare_options"] = yaml.safe_load(args["prepare_options"]) or {}
    try:
        written = build(**args)
    except (ReleaseError, ValueError, FileNotFoundError, RuntimeError) as error:   # RuntimeError: a runner is busy
        print(f"ERROR: {error}", file=sys.stderr)
        sys.exit(2)
    for path in [written["archive"], written["large_files"], *written["weights"], *written.get("installed", [])]:
        print(path)


if __name__ == "__main__":
    main()
