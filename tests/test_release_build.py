"""``make release`` (study/build_release.py, docs/release.md): the convergence gate, the release plan and the study
plans of docs/release.md on their own; then ``make release DATA=../shared/data/acdc QUICK=1`` end to end on the
shared ACDC copy (marked ``realdata``, skipped when absent), everything written under a temporary folder."""

import json
import os
import re
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import yaml

from conftest import ROOT
from study import build_release, release
from study.jobs import build_jobs
from study.plan import load_plan, normalise_plan
from study.report import read_dice_rows

SHARED_ACDC = os.path.join(ROOT, "..", "shared", "data", "acdc")
NAME, VERSION = release.NAME, release.read_metadata()["version"]


def make(*args):
    """``make <args>`` from the repository root with this Python; the environment is not rebuilt (-o)."""
    return subprocess.run(["make", "--no-print-directory", "-o", ".venv/.installed", *args, f"PY={sys.executable}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})


# ---------------------------------------------------------------- the gate, the plan (no data needed)
def report(stage, converged, reason="budget"):
    return {"stage": stage, "reason": reason, "iteration": 2000, "converged": converged, "explanation": "why",
            "file": f"/x/pretrain_{stage}_stop.json"}


def test_a_stage_that_did_not_converge_is_refused_unless_allowed():
    converged = {"global": report("global", True, "plateau"), "local": report("local", True, "plateau")}
    assert build_release.check_converged(converged, {"converged": True}, allow=False) == []
    for value in (False, None):   # stopped on its budget, or the rule could not judge
        reports = {**converged, "local": report("local", value)}
        with pytest.raises(release.ReleaseError, match=r"(?s)stage local stopped by 'budget'.*ALLOW_UNCONVERGED=1"):
            build_release.check_converged(reports, None, allow=False)
        assert len(build_release.check_converged(reports, None, allow=True)) == 1
    rising = build_release.trend_check(np.linspace(0.5, 0.8, 60), window=0.5, min_t=2.0, max_rise=0.01)
    assert not rising["converged"] and rising["best_epoch"] == 60
    with pytest.raises(release.ReleaseError, match=r"fine-tuning: over the last 30 of 60 validations .* still rising"):
        build_release.check_converged(converged, rising, allow=False)


def test_the_fine_tuning_check_judges_the_trend_not_the_noisiest_epoch():
    """Two validation volumes: Dice swings 0.78-0.88 around a plateau, its best value falling on the last epoch,
    which the old rule (best epoch in the last quarter) refused; the trend rule passes it, and refuses a slow rise
    hidden under the same noise."""
    noise = np.random.default_rng(0).uniform(-0.05, 0.05, 60)
    plateau = 0.83 + noise
    plateau[-1] = 0.885
    flat = build_release.trend_check(plateau, window=0.5, min_t=2.0, max_rise=0.01)
    assert flat["converged"] and flat["best_epoch"] == 60 and "no significant rise" in flat["explanation"]
    slow_rise = 0.6 + np.linspace(0, 0.25, 60) + noise
    assert not build_release.trend_check(slow_rise, window=0.5, min_t=2.0, max_rise=0.01)["converged"]
    with pytest.raises(release.ReleaseError, match="at least 4"):
        build_release.trend_check([0.5, 0.6, 0.7], window=0.5, min_t=2.0, max_rise=0.01)


def test_release_plan_quick_budgets_and_its_commands(tmp_path):
    full = build_release.release_plan(str(tmp_path), release_dir=str(tmp_path / "rel"))
    quick = build_release.release_plan(str(tmp_path), quick=True, finetune_epochs=3, release_dir=str(tmp_path / "q"),
                                       prepare="prepare_decathlon", prepare_options={"decathlon#task": "Task04"})
    budget = "global#max_iterations"
    assert full["protocol"]["pretrain"][budget] > quick["protocol"]["pretrain"][budget]
    assert quick["protocol"]["finetune"]["max_epochs"] == 3 and quick["dataset"]["overrides"]["image_size"] == 32
    assert quick["dataset"]["overrides"]["decathlon#task"] == "Task04"
    assert quick["dataset"]["prepare"] == "prepare_decathlon"
    assert [j.kind for j in build_jobs(full)] == ["prepare", "global", "local", "finetune"]
    commands = build_release.command_lines(full).splitlines()
    assert commands[0].startswith("python -m monai.bundle run prepare_acdc")
    assert "--train_key labelled_all" in commands[3]
    with pytest.raises(release.ReleaseError, match="no such folder"):
        build_release.release_plan(str(tmp_path / "absent"))
    with pytest.raises(release.ReleaseError, match="DATASET=... DATA_LICENCE=..."):
        build_release.build(str(tmp_path), prepare="prepare_folder")


def test_make_release_without_data_says_what_to_give():
    result = make("release")
    assert result.returncode != 0 and "ERROR: give the raw data folder: make release DATA=<folder>" in result.stdout


@pytest.mark.parametrize("plan", ["release_in_domain.yaml", "release_transfer.yaml", "release_transfer_1mm.yaml"])
def test_the_planned_tables_are_valid_study_plans(plan, tmp_path):
    """docs/release.md's tables 3(a) and 3(b): plans the runner accepts, with at least 3 subsets per |XL|."""
    config = load_plan(os.path.join(ROOT, "docs", "experiments", plan), str(tmp_path))
    assert all(len(subsets) >= 3 for subsets in config["labelled"].values()) and set(config["labelled"]) == {1, 2, 8}
    names = {i["name"] for i in config["initialisations"]}
    both = {**config, "initialisations": [{"name": "x", "global": "domain", "checkpoint": "a.pt"}]}
    with pytest.raises(ValueError, match="a checkpoint or a global strategy, not both"):
        normalise_plan(both)
    assert {"random", "release"} <= names
    jobs = build_jobs(config)
    from_release = [j for j in jobs if j.kind == "finetune" and j.info["init"] == "release"]
    assert from_release and all("pretrained_local.pt" in " ".join(j.steps[0][1]) for j in from_release)


# ---------------------------------------------------------------- the quick release on the shared ACDC copy
@pytest.fixture(scope="module")
def quick_release(tmp_path_factory):
    if not os.path.isdir(SHARED_ACDC):
        pytest.skip(f"the shared ACDC data is not at {SHARED_ACDC} (the test needs ../shared/data/acdc)")
    work = tmp_path_factory.mktemp("quick_release")
    args = ["release", f"DATA={SHARED_ACDC}", "QUICK=1", f"RELEASE_DIR={work / 'release'}", f"DIST={work / 'dist'}"]
    refused = make(*args)   # tiny budgets: both stages stop on their budget
    allowed = make(*args, "ALLOW_UNCONVERGED=1")   # resumes: only the fine-tuning and the packing run
    assert allowed.returncode == 0, allowed.stdout[-3000:] + allowed.stderr[-3000:]
    archive = zipfile.ZipFile(work / "dist" / f"{NAME}_v{VERSION}{build_release.NOT_FOR_USE}.zip")
    return {"work": work, "refused": refused, "allowed": allowed, "archive": archive,
            "card": archive.read(f"{NAME}/docs/README.md").decode(),
            "metadata": json.loads(archive.read(f"{NAME}/configs/metadata.json"))}


@pytest.mark.realdata
def test_quick_release_refuses_unconverged_stages_then_resumes(quick_release):
    refused, allowed, work = quick_release["refused"], quick_release["allowed"], quick_release["work"]
    assert refused.returncode == 2 and "refusing to release weights that did not converge" in refused.stderr
    assert "pre-training stage global stopped by 'budget'" in refused.stderr
    # refused before any fine-tuning: the runner ran the preparation and the two stages only
    assert "3 jobs, 0 done, 3 to run" in refused.stdout and "fine-tune + evaluate" not in refused.stdout
    assert "3 jobs, 3 done, 0 to run" in allowed.stdout   # prepare and both stages are not run again
    assert "1 jobs, 0 done, 1 to run" in allowed.stdout
    assert (work / "release" / "results.jsonl").is_file()


@pytest.mark.realdata
def test_quick_release_model_card_names_data_commands_and_stop_reports(quick_release):
    card, work = quick_release["card"], quick_release["work"]
    assert "NOT FOR USE" in card and "Released without convergence" in card
    data = card.split("**Data**")[1].split("\n")[0]
    assert "ACDC" in data and "CC BY-NC-SA 4.0" in card.split("**Data licence**")[1].split("\n")[0]
    for command in ("run prepare_acdc", "run pretrain_global", "run pretrain_local", "--train_key labelled_all",
                    "evaluate.yaml"):
        assert command in card, command
    for stage, job in (("global", "global-domain-seed0"), ("local", "global-domain-local-random-seed0")):
        stop = json.load(open(work / "release" / "pretraining" / job / "eval" / f"pretrain_{stage}_stop.json"))
        row = f"| {stage} | {stop['reason']} | {stop['iteration']} | {stop['loss']:.4f} | {stop['converged']} |"
        assert row in card
    assert "docs/release.md" in card
    assert quick_release["metadata"]["intended_use"].startswith("NOT FOR USE")


@pytest.mark.realdata
def test_quick_release_eval_metrics_is_the_shipped_models_test_dice(quick_release):
    work, metadata = quick_release["work"], quick_release["metadata"]
    (metric, value), = metadata["eval_metrics"].items()
    assert metric == "mean_dice_test_acdc_all_labelled"
    assert f"**Test Dice of the shipped `models/model.pt`**: {value:.3f}" in quick_release["card"]
    # the shipped file is the one the evaluation loaded (evaluate.yaml: <model_dir>/model.pt), and its per-volume
    # Dice on the 20 test patients averages to eval_metrics
    run = work / "release" / "runs" / "release-xlall-seed0"
    assert release.sha256(str(work / "dist" / "model.pt")) == release.sha256(str(run / "models" / "model.pt"))
    names, dice = read_dice_rows(str(run / "eval" / "test"))
    per_volume = [sum(v for v in row if v == v) / len([v for v in row if v == v]) for row in dice]
    datalist = json.load(open(work / "release" / "data" / "datalist.json"))
    assert len(names) == len(datalist["test"]) == 20 and abs(sum(per_volume) / len(per_volume) - value) < 1e-9


@pytest.mark.realdata
def test_quick_release_lists_the_three_weight_files_with_sha256(quick_release):
    work, archive = quick_release["work"], quick_release["archive"]
    listed = yaml.safe_load(archive.read(f"{NAME}/large_files.yml"))["large_files"]
    weights = ["models/pretrained_global.pt", "models/pretrained_local.pt", "models/model.pt"]
    assert [e["path"] for e in listed] == weights
    for entry in listed:
        assert entry["hash_type"] == "sha256" and re.fullmatch(r"[0-9a-f]{64}", entry["hash_val"])
        assert release.sha256(str(work / "dist" / os.path.basename(entry["path"]))) == entry["hash_val"]
    assert yaml.safe_load(open(work / "dist" / "large_files.yml"))["large_files"] == listed
