"""The study runner (study.experiments: study.plan, study.jobs, study.ledger, study.scheduler) and its report
(study.report, study.folder_report).

Fast checks expand the shipped plans into jobs and commands without running them. The end-to-end checks run the
smoke plan (docs/experiments/smoke.yaml: synthetic data, a tiny U-Net, two initialisations, one subset) once through
the command line: start, kill the runner with SIGKILL as soon as its first result line appears, restart until the
plan is finished, restart once more, then write the report (about a minute on 2 cores)."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import fire.parser
import pytest
import yaml

from conftest import ROOT
from study import folder_report, report
from study.configs import CONFIGS
from study.jobs import build_jobs, format_value
from study.ledger import append_ledger, check_unchanged, jsonable, read_ledger
from study.plan import load_plan, normalise_plan
from study.results import check_datalist

PLANS = os.path.join(ROOT, "docs", "experiments")
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.join(ROOT, "bundle"), str(ROOT)])}


def plan_jobs(name, tmp_path):
    plan = load_plan(os.path.join(PLANS, name), experiment_dir=str(tmp_path / "exp"))
    return plan, {j.id: j for j in build_jobs(plan)}


def option(command, key):
    """The value given to --key in a command list (None when absent)."""
    flag = f"--{key}"
    return command[command.index(flag) + 1] if flag in command else None


# ---------------------------------------------------------------- plans -> jobs -> commands (no subprocess)
@pytest.mark.parametrize("name, inits, stages, subsets, benchmark",
                         [("acdc_cpu.yaml", 8, 5, 7, 2), ("acdc_paper.yaml", 7, 4, 13, 3)])
def test_shipped_plans_expand_into_the_study(tmp_path, name, inits, stages, subsets, benchmark):
    plan, jobs = plan_jobs(name, tmp_path)
    kinds = [j.kind for j in jobs.values()]
    assert kinds.count("prepare") == 1
    # one global stage per strategy (and per recipe with its own pre-training overrides), shared
    assert kinds.count("global") == stages and kinds.count("local") == 2
    assert kinds.count("finetune") == inits * subsets + benchmark
    assert len({j.folder for j in jobs.values()}) == len(jobs)        # every job writes into its own folder
    order = list(jobs)
    last_pretraining = max(i for i, j in enumerate(jobs.values()) if j.kind in ("global", "local"))
    assert all(jobs[k].kind == "finetune" for k in order[last_pretraining + 1 :])
    for job in jobs.values():
        assert all(n in order[: order.index(job.id)] for n in job.needs)   # dependencies come first

    random_run = jobs["random-xl1-subset0-seed0"].steps[0][1]
    assert option(random_run, "use_pretrained") == "False" and option(random_run, "pretrained_checkpoint") is None
    gd = jobs["GD-xl2-subset1-seed0"].steps[0][1]
    assert option(gd, "pretrained_decoder_blocks") == "0"
    assert option(gd, "pretrained_checkpoint").endswith("global-domain-seed0/models/pretrained_global.pt")
    assert (option(gd, "num_labelled"), option(gd, "subset")) == ("2", "1")
    for local in ("random", "domain"):
        name_ = {"random": "GD_LR", "domain": "GD_LD"}[local]
        run = jobs[f"{name_}-xl8-subset0-seed0"].steps[0][1]
        local_checkpoint = f"global-domain-local-{local}-seed0/models/pretrained_local.pt"
        assert option(run, "pretrained_checkpoint").endswith(local_checkpoint)
        assert option(run, "pretrained_decoder_blocks") is None   # the config's l = 3
        stage = jobs[f"global-domain-local-{local}-seed0"]
        global_checkpoint = "global-domain-seed0/models/pretrained_global.pt"
        assert option(stage.steps[0][1], "local#global_checkpoint").endswith(global_checkpoint)
        assert stage.needs[-1] == "global-domain-seed0"
    bench = jobs["random-xlall-seed1"]
    assert option(bench.steps[0][1], "train_key") == "labelled_all" and option(bench.steps[0][1], "seed") == "1"
    evaluation = bench.steps[1][1]
    files = [os.path.join(CONFIGS, n) for n in ("train.yaml", "evaluate.yaml")]
    assert fire.parser.DefaultParseValue(option(evaluation, "config_file")) == files
    assert option(bench.steps[0][1], "config_file") == files[0]
    models = os.path.join(bench.folder, "models")
    assert option(evaluation, "model_dir") == option(bench.steps[0][1], "model_dir") == models
    size = plan["protocol"]["common"]["image_size"]
    assert all(option(j.steps[0][1], "image_size") == str(size) for j in jobs.values())


def test_values_survive_the_command_line():
    """What format_value writes, python-fire (monai.bundle run's parser) reads back as the same value."""
    for value in (64, 1.36719, True, False, None, [4, 8, 8], [0.0, 5.0], "domain_minus", {"a": [1, 2]}, ["x", None]):
        assert fire.parser.DefaultParseValue(format_value(value)) == value


@pytest.mark.parametrize("change, message", [
    ({"initialisations": [{"name": "x", "global": "simclr"}]}, "global must be one of"),
    ({"initialisations": [{"name": "x", "local": "random"}]}, "needs a global stage"),
    ({"initialisations": [{"name": "a b"}]}, "must be unique"),
    ({"protocol": {"finetune": {"model_dir": "/tmp"}}}, "the runner sets"),
    ({"protocol": {"train": {}}}, "unknown stage"),
    ({"labelled": {}, "benchmark": None}, "nothing to fine-tune"),
    ({"benchmark": {"initialisations": ["nope"]}}, "unknown initialisation"),
    ({"benchmark": {"finetune": {"train_key": "x"}}}, "the runner sets"),
])
def test_bad_plans_are_refused(tmp_path, change, message):
    with open(os.path.join(PLANS, "smoke.yaml")) as f:
        plan = {**yaml.safe_load(f), **change}
    with pytest.raises(ValueError, match=message):
        normalise_plan(plan, experiment_dir=str(tmp_path))


@pytest.fixture
def renamed_configs(tmp_path, monkeypatch):
    """A function (config, old text, new text) that rewrites a copy of bundle/configs, which study.configs reads from
    then on (and forgets again after the test)."""
    import study.configs

    copy = tmp_path / "configs"
    shutil.copytree(CONFIGS, copy)
    monkeypatch.setattr(study.configs, "CONFIGS", str(copy))

    def rename(name, old, new):
        text = (copy / name).read_text()
        assert old in text
        (copy / name).write_text(text.replace(old, new))
        study.configs.reset()

    yield rename
    monkeypatch.undo()
    study.configs.reset()


@pytest.mark.parametrize("name, old, new, missing", [
    ("train.yaml", "\ntrain_key:", "\ntraining_key:", "'train_key' in train.yaml"),   # the datalist key of a subset
    ("select.yaml", "\nselection_pool:", "\npool:", "'selection_pool' in train.yaml + select.yaml"),   # the pool
    ("pretrain.yaml", "final_filename: pretrained_local.pt", "filename: pretrained_local.pt",
     "final_filename of the CheckpointSaver in pretrain.yaml's local#handlers"),      # the local checkpoint's name
    ("pretrain.yaml", "tag_name: global_loss", "tag: global_loss",
     "tag_name of the TensorBoardStatsHandler in pretrain.yaml's global#handlers"),   # the loss curves' tag
])
def test_a_config_key_the_runner_uses_renamed_stops_the_plan_at_load(tmp_path, renamed_configs, name, old, new,
                                                                     missing):
    """Renaming a config key the runner reads or sets stops the plan when it is loaded, in one line naming it."""
    renamed_configs(name, old, new)
    with pytest.raises(ValueError, match=re.escape(missing)) as error:
        plan_jobs("smoke.yaml", tmp_path)
    assert "\n" not in str(error.value) and "smoke.yaml" in str(error.value)


def test_the_runner_follows_the_names_the_configs_give(tmp_path, renamed_configs):
    """The checkpoint, TensorBoard folder and datalist keys the runner uses are read from the configs: renamed
    there, the plan's jobs use the new names (nothing in the study to change)."""
    renamed_configs("pretrain.yaml", "final_filename: pretrained_global.pt", "final_filename: encoder.pt")
    renamed_configs("pretrain.yaml", "'/pretrain_local'", "'/local_logs'")
    renamed_configs("train.yaml", "'labelled_%d_%d'", "'subset_%d_%d'")
    plan, jobs = plan_jobs("smoke.yaml", tmp_path)
    stage = next(j for j in jobs.values() if j.kind == "global")
    assert stage.info["checkpoint"].endswith(os.path.join("models", "encoder.pt"))
    local = next(j for j in jobs.values() if j.kind == "local")
    assert option(local.steps[0][1], "local#global_checkpoint").endswith("encoder.pt")
    assert local.info["log_dir"].endswith(os.path.join("eval", "local_logs"))
    subset = next(j for j in jobs.values() if j.kind == "finetune" and "subset" in j.id)
    assert subset.info["train_key"].startswith("subset_")


@pytest.mark.parametrize("name", ["acdc_cpu.yaml", "selection_acdc.yaml"])
def test_every_key_the_runner_sets_is_one_it_checks(tmp_path, name):
    """What the jobs' commands set beyond the plan's own overrides is in study.configs.RUNNER_KEYS (the keys checked
    against the configs at load), and each command's run id in RUN_IDS: the check covers what the runner uses."""
    from study.configs import RUN_IDS, RUNNER_KEYS

    plan, jobs = plan_jobs(name, tmp_path)
    given = set(plan["dataset"]["overrides"]) | {k for section in plan["protocol"].values() for k in section}
    given |= {k for init in plan["initialisations"] for k in (*init["pretrain"], *init["finetune"])}
    given |= set((plan["benchmark"] or {}).get("finetune", {}))
    for job in jobs.values():
        for _, command in job.steps:
            files = option(command, "config_file")
            names = tuple(os.path.basename(f) for f in (json.loads(files) if files.startswith("[") else [files]))
            run_id = command[command.index("run") + 1]
            assert run_id in RUN_IDS.get(names, ()) or run_id == plan["dataset"]["prepare"], (job.id, run_id)
            flags = {word[2:] for word in command if word.startswith("--")} - {"config_file"} - given
            assert flags <= set(RUNNER_KEYS[names]), (job.id, sorted(flags - set(RUNNER_KEYS[names])))


def test_a_prepared_dataset_without_the_planned_subsets_is_refused_at_load(tmp_path):
    with open(os.path.join(PLANS, "smoke.yaml")) as f:
        plan = yaml.safe_load(f)
    data = tmp_path / "data"
    data.mkdir()
    (data / "datalist.json").write_text(json.dumps({"pretrain": [], "labelled_1_0": [], "validation": []}))
    plan["dataset"] = {"prepare": None, "dataset_dir": str(data)}
    plan["labelled"], plan["benchmark"] = {1: [0, 1]}, None
    with pytest.raises(ValueError, match=re.escape("has no ['labelled_1_1']")):
        normalise_plan(plan, experiment_dir=str(tmp_path / "exp"))


def test_the_benchmark_may_have_its_own_budget(tmp_path):
    """benchmark.finetune overrides protocol.finetune for the all-labels runs only."""
    with open(os.path.join(PLANS, "smoke.yaml")) as f:
        plan = yaml.safe_load(f)
    plan["benchmark"] = {"initialisations": ["random"], "finetune": {"max_epochs": 7}}
    jobs = {j.id: j for j in build_jobs(normalise_plan(plan, experiment_dir=str(tmp_path)))}
    subset_epochs = option(jobs["random-xl1-subset0-seed0"].steps[0][1], "max_epochs")
    assert option(jobs["random-xlall-seed0"].steps[0][1], "max_epochs") == "7" != subset_epochs
    assert jobs["random-xlall-seed0"].config["finetune"]["max_epochs"] == 7


def test_an_initialisation_may_have_its_own_fine_tuning_overrides(tmp_path):
    """initialisations[i].finetune reaches that initialisation's fine-tunings only, over what the runner derives."""
    with open(os.path.join(PLANS, "smoke.yaml")) as f:
        plan = yaml.safe_load(f)
    plan["initialisations"] = [{"name": "random"},
                               {"name": "encoder", "checkpoint": "a.pt", "finetune": {"pretrained_decoder_blocks": 0}}]
    jobs = {j.id: j for j in build_jobs(normalise_plan(plan, experiment_dir=str(tmp_path)))}
    encoder = jobs["encoder-xl1-subset0-seed0"]
    assert option(encoder.steps[0][1], "pretrained_decoder_blocks") == "0"
    assert encoder.config["finetune"]["pretrained_decoder_blocks"] == 0
    assert option(jobs["random-xl1-subset0-seed0"].steps[0][1], "pretrained_decoder_blocks") is None
    plan["initialisations"][1]["finetune"] = {"pretrained_checkpoint": "b.pt"}
    with pytest.raises(ValueError, match="which the runner sets"):
        normalise_plan(plan, experiment_dir=str(tmp_path))


def test_fine_tuning_methods_and_their_own_subsets_become_job_steps(tmp_path):
    """An initialisation's ``configs`` follow train.yaml in its fine-tuning and evaluation; ``self_training_rounds``
    adds, per round, a pseudo_label run and a fine-tuning on self_training.yaml with ``--pseudo_round``, and evaluates
    the last round; ``labelled`` replaces the plan's subsets for that initialisation only."""
    plan, jobs = plan_jobs("semi_supervised.yaml", tmp_path)
    files = lambda *names: [os.path.join(CONFIGS, n) for n in names]   # noqa: E731
    consistency = jobs["release-consistency-xl2-subset0-seed0"]
    assert [name for name, _ in consistency.steps] == ["finetune", "evaluate"]
    assert fire.parser.DefaultParseValue(option(consistency.steps[0][1], "config_file")) == files(
        "train.yaml", "consistency.yaml")
    assert consistency.config["init"]["configs"] == ["consistency.yaml"]
    mixup = jobs["release-mixup-xl2-subset1-seed0"]
    assert option(mixup.steps[0][1], "mixup_alpha") == "0.1" and "configs" not in mixup.config["init"]
    self_training = jobs["release-selftraining-xl2-subset0-seed0"]
    names = [name for name, _ in self_training.steps]
    assert names == ["finetune", "pseudo_label_round1", "finetune_round1", "evaluate"]
    first, label, second, evaluate = (command for _, command in self_training.steps)
    eval_dir = os.path.join(self_training.folder, "eval")
    assert option(first, "output_dir") == os.path.join(eval_dir, "round_0") and option(second, "output_dir") == eval_dir
    assert label[label.index("run") + 1] == "pseudo_label"
    assert option(label, "pseudo_round") == option(second, "pseudo_round") == option(evaluate, "pseudo_round") == "1"
    assert fire.parser.DefaultParseValue(option(evaluate, "config_file")) == files(
        "train.yaml", "self_training.yaml", "evaluate.yaml")
    plan["labelled"] = {1: [0, 1], 2: [0, 1, 2]}
    by_name = {init["name"]: init for init in plan["initialisations"]}
    assert by_name["release"]["labelled"] is None   # the plan's subsets
    by_name["release-mixup"]["labelled"] = {2: [4]}
    ids = [j.id for j in build_jobs(plan)]
    assert [i for i in ids if i.startswith("release-mixup-")] == ["release-mixup-xl2-subset4-seed0"]
    assert "release-xl1-subset1-seed0" in ids
    refusals = [({"configs": ["self_training.yaml"]}, "self_training_rounds"),
                ({"configs": ["nope.yaml"]}, "not overlays"), ({"self_training_rounds": -1}, ">= 0")]
    for change, message in refusals:
        bad = yaml.safe_load(open(os.path.join(PLANS, "semi_supervised.yaml")))
        bad["initialisations"][1].update(change)
        with pytest.raises(ValueError, match=message):
            normalise_plan(bad, experiment_dir=str(tmp_path))


def test_the_report_compares_the_pairs_a_plan_names():
    records = fake_records()
    text = report.study_markdown(records, title="fake", comparisons=[("G^D", "G^D + L^R"), ("random", "G^D")])
    assert ("| G^D + L^R | G^D | +0.050 ± 0.000 (2/2) | +0.050 ± 0.000 (2/2) | +0.050 ± 0.000 (2/2) "
            "| +0.050 ± 0.000 (2/2) |") in text
    assert "| random | 4 | 110 s |" in text   # the benchmark runs are left out of the time per job
    with pytest.raises(ValueError, match="two initialisation names"):
        normalise_plan({**yaml.safe_load(open(os.path.join(PLANS, "smoke.yaml"))), "comparisons": [["random", "x"]]},
                       experiment_dir="/tmp/x")


def test_a_changed_protocol_is_not_resumed(tmp_path):
    plan, jobs = plan_jobs("smoke.yaml", tmp_path)
    job = jobs["random-xl1-subset0-seed0"]
    done = {job.id: {"id": job.id, "config": jsonable(job.config)}}
    check_unchanged(list(jobs.values()), done)   # same configuration: fine
    plan["protocol"]["finetune"]["max_epochs"] = 3
    with pytest.raises(ValueError, match="another configuration"):
        check_unchanged(build_jobs(plan), done)


def test_ledger_lines_are_appended_whole(tmp_path):
    path = str(tmp_path / "results.jsonl")
    append_ledger(path, {"id": "a"})
    append_ledger(path, {"id": "b", "dice": [0.5, None]})
    assert [r["id"] for r in read_ledger(path)] == ["a", "b"]
    assert os.listdir(tmp_path) == ["results.jsonl"]   # no temporary file left behind


def fake_records():
    """Results of five initialisations at |XL| 1 and 2 (two subsets) and the benchmark; G^D best at every size."""
    recipes = {"random": (None, None), "G^R": ("random", None), "G^D−": ("domain_minus", None),
               "G^D": ("domain", None), "G^D + L^R": ("domain", "random")}
    records = []
    for k, (label, (g, loc)) in enumerate(recipes.items()):
        for size in (1, 2):
            for subset in (0, 1):
                mean = 0.4 + 0.05 * k + 0.1 * size + 0.01 * subset
                volumes = [{"image": f"/v{i}.nii.gz", "dice": [mean - 0.02, mean, mean + 0.02]} for i in range(3)]
                records.append({"label": label, "recipe": {"global": g, "local": loc}, "num_labelled": size,
                                "subset": subset, "seed": 0, "volumes": volumes, "classes": ["RV", "Myo", "LV"],
                                "class_dice": [mean - 0.02, mean, mean + 0.02], "mean_dice": mean,
                                "val_dice": mean + 0.1 * subset, "wall_time_s": {"finetune": 100.0, "evaluate": 10.0}})
    for seed in (0, 1):
        records.append({"label": "random", "recipe": {"global": None, "local": None}, "num_labelled": "all",
                        "subset": None, "seed": seed, "volumes": [{"image": "/v0.nii.gz", "dice": [0.9, 0.9, 0.9]}],
                        "classes": ["RV", "Myo", "LV"], "class_dice": [0.9] * 3, "mean_dice": 0.9,
                        "wall_time_s": {"finetune": 100.0, "evaluate": 10.0}})
    return records


def test_report_tables_and_claims_from_records(tmp_path):
    records = fake_records()
    text = report.study_markdown(records, order=["random", "G^R", "G^D−", "G^D", "G^D + L^R"], title="fake")
    assert "| initialisation | \\|XL\\| = 1 | \\|XL\\| = 2 | all labelled |" in text
    assert "| G^D | 0.655 ± 0.007 | 0.755 ± 0.007 | – |" in text           # mean ± std over the two subsets
    assert "| G^R | +0.050 ± 0.000 (2/2) | +0.050 ± 0.000 (2/2) | – |" in text   # paired gain over random
    ordering = "|XL| = 1: random (0.505) < G^R (0.555) < G^D− (0.605) < G^D (0.655) — the paper's ordering holds."
    assert ordering in text
    assert "G^D + L^R vs G^D: +0.050, better in 2/2 paired subsets — the local stage helps" in text
    assert "is 10.6% below the benchmark (0.900) — the paper's 'within 8%' does not hold" in text
    # model selection: best validation Dice per |XL| (subsets 0 and 1: +0.0 and +0.11) and over every subset run
    assert "| G^D | 0.705 ± 0.078 | 0.805 ± 0.078 | 0.755 ± 0.086 |" in text
    assert "| random | 0.555 ± 0.078 | 0.655 ± 0.078 | 0.605 ± 0.086 |" in text   # the benchmark runs are left out
    png = report.plot_dice_vs_labelled(records, str(tmp_path / "dice.png"))
    assert open(png, "rb").read(4) == b"\x89PNG"


def test_wall_time_spans_jobs_that_ran_side_by_side():
    jobs = [{"finished": "2026-01-01T10:00:00+00:00", "wall_time_s": {"finetune": 90.0, "evaluate": 10.0}},
            {"finished": "2026-01-01T10:01:00+00:00", "wall_time_s": {"pretrain_global": 50.0}},
            {"id": "no times"}]
    assert report._elapsed(jobs) == 160.0   # 09:58:20 (first start) to 10:01:00 (last end), not 100 + 50 s
    assert report._elapsed([{"id": "no times"}]) is None


# ---------------------------------------------------------------- the smoke plan, end to end through the command line
def runner(*args):
    return [sys.executable, "-m", "study.experiments", *args]


def lines(path):
    return open(path).read().splitlines() if os.path.isfile(path) else []


def processes_mentioning(text):
    """Ids of live processes whose command line contains ``text`` (Linux /proc)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if text.encode() in f.read():
                    found.append(int(pid))
        except OSError:
            pass
    return found


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    exp = tmp_path_factory.mktemp("smoke") / "exp"
    plan = os.path.join(PLANS, "smoke.yaml")
    args = [plan, "--experiment_dir", str(exp)]
    results, commands = exp / "results.jsonl", exp / "commands.log"
    state = {"exp": exp}

    # 1. first start; SIGKILL the runner as soon as the first result line is there
    first = subprocess.Popen(runner("run", *args), cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 400
    while len(lines(results)) < 1 and first.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    first.send_signal(signal.SIGKILL)
    first.wait()
    state["after_kill"] = {"results": lines(results), "commands": lines(commands), "first_output": first.stdout.read()}
    deadline = time.time() + 20
    while processes_mentioning(str(exp)) and time.time() < deadline:
        time.sleep(0.2)
    state["orphans"] = processes_mentioning(str(exp))

    # 2. restart: finishes the plan
    second = subprocess.run(runner("run", *args), cwd=ROOT, env=ENV, capture_output=True, text=True)
    state["second"] = second
    state["after_restart"] = {"results": lines(results), "commands": lines(commands)}

    # 3. restart a finished plan: nothing runs
    state["third"] = subprocess.run(runner("run", *args), cwd=ROOT, env=ENV, capture_output=True, text=True)
    state["after_third"] = {"results": lines(results), "commands": lines(commands)}

    # 4. the report
    state["report"] = subprocess.run(runner("report", plan, "--experiment_dir", str(exp), "--output",
                                            str(exp / "report")), cwd=ROOT, env=ENV, capture_output=True, text=True)
    return state


def started(commands, job_id):
    """How many times a job was started, from commands.log ('# <time> <job id>' before each command)."""
    return sum(1 for line in commands if line.startswith("# ") and line.split()[-1] == job_id)


def test_a_finished_run_appends_its_result_line(smoke):
    assert len(smoke["after_kill"]["results"]) == 1, smoke["after_kill"]["first_output"].decode()[-3000:]
    record = json.loads(smoke["after_kill"]["results"][0])
    assert record["id"] == "random-xl1-subset0-seed0" and record["recipe"] == {"global": None, "local": None}
    assert (record["num_labelled"], record["subset"], record["seed"], record["train_key"]) == (1, 0, 0, "labelled_1_0")
    assert record["classes"] == ["right ventricle", "myocardium", "left ventricle"]
    assert len(record["volumes"]) == 1 and len(record["volumes"][0]["dice"]) == 3   # one test volume, 3 classes
    assert set(record["wall_time_s"]) == {"finetune", "evaluate"}
    assert 0 <= record["val_dice"] <= 1   # the best val_mean_dice the fine-tuning logged
    assert record["config"]["finetune"]["max_epochs"] == 2 and record["config"]["start"] == {"use_pretrained": False}
    assert os.path.isfile(smoke["exp"] / record["model_dir"] / "model.pt")


def test_killing_the_runner_stops_its_stage_and_a_restart_finishes_the_plan(smoke):
    assert smoke["orphans"] == []   # the stage subprocess died with the runner
    second = smoke["second"]
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "5 jobs, 4 done, 1 to run" in second.stdout
    results = [json.loads(line) for line in smoke["after_restart"]["results"]]
    assert [r["id"] for r in results] == ["random-xl1-subset0-seed0", "GD_LR-xl1-subset0-seed0"]
    assert results[1]["pretraining"] == "global-domain-local-random-seed0"
    commands = smoke["after_restart"]["commands"]
    for job in ("prepare", "global-domain-seed0", "global-domain-local-random-seed0", "random-xl1-subset0-seed0"):
        assert started(commands, job) == (2 if job == "random-xl1-subset0-seed0" else 1), job  # fine-tune + evaluate
    # killed during its fine-tuning (1 command) or evaluation (2), then both again; 2 if it had not started yet
    assert started(commands, "GD_LR-xl1-subset0-seed0") in (2, 3, 4)
    stages = read_ledger(str(smoke["exp"] / "stages.jsonl"))
    assert [s["id"] for s in stages] == ["prepare", "global-domain-seed0", "global-domain-local-random-seed0"]


def test_a_restart_skips_finished_runs(smoke):
    third = smoke["third"]
    assert third.returncode == 0 and "5 jobs, 5 done, 0 to run" in third.stdout
    assert smoke["after_third"] == smoke["after_restart"]   # no new command, no new result line


def test_report_writes_tables_and_figures(smoke):
    result = smoke["report"]
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    folder = smoke["exp"] / "report"
    text = (folder / "results.md").read_text()
    assert "| random |" in text and "| G^D + L^R |" in text and "global-domain-seed0" in text
    for name in ("dice_vs_labelled.png", "pretraining_losses.png", "examples.png"):
        assert (folder / name).read_bytes()[:4] == b"\x89PNG", name


def test_two_workers_run_independent_jobs_side_by_side(tmp_path):
    """--workers 2: the random-init fine-tuning needs only the data, so it starts beside the global stage, before the
    local stage (which waits for the global one); the plan finishes with the same results."""
    exp = tmp_path / "exp"
    result = subprocess.run(runner("run", os.path.join(PLANS, "smoke.yaml"), "--experiment_dir", str(exp),
                                   "--workers", "2"), cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "2 at a time" in result.stdout
    started_ids = [line.split()[-1] for line in lines(exp / "commands.log") if line.startswith("# ")]
    assert started_ids.index("random-xl1-subset0-seed0") < started_ids.index("global-domain-local-random-seed0")
    assert started_ids.index("global-domain-seed0") < started_ids.index("global-domain-local-random-seed0")
    results = read_ledger(str(exp / "results.jsonl"))
    assert sorted(r["id"] for r in results) == ["GD_LR-xl1-subset0-seed0", "random-xl1-subset0-seed0"]
    assert all(len(r["volumes"][0]["dice"]) == 3 for r in results)


# ---------------------------------------------------------------- which volumes to label first (selection plans)
@pytest.mark.parametrize("name", ["selection_acdc.yaml", "selection_hippocampus.yaml"])
def test_selection_plans_expand_into_selections_and_their_fine_tunings(tmp_path, name):
    plan, jobs = plan_jobs(name, tmp_path)
    kinds = [j.kind for j in jobs.values()]
    assert kinds.count("select") == 9 and kinds.count("finetune") == 2 * 15 + 2 * 9   # random subsets + selections
    order = list(jobs)
    for job in jobs.values():
        assert all(n in order[: order.index(job.id)] for n in job.needs)
    select = jobs["select-kcenter-xl2-seed0"]
    command = select.steps[0][1]
    assert command[4] == "select" and option(command, "num_labelled") == "2"
    assert option(command, "selection_rule") == "kcenter"
    assert option(command, "selection_key") == "selected_kcenter_2_seed0"
    encoder = jobs[select.needs[-1]]   # the default initialisation's local stage
    assert encoder.kind == "local" and option(command, "pretrained_checkpoint").endswith(encoder.info["checkpoint"])
    for init in ("default", "random"):
        run = jobs[f"{init}-xl2-kcenter-seed0"]
        assert option(run.steps[0][1], "train_key") == "selected_kcenter_2_seed0" and select.id in run.needs
        assert run.info["selection"] == "kcenter" and run.info["num_labelled"] == 2
    assert option(jobs["random-xl2-kcenter-seed0"].steps[0][1], "use_pretrained") == "False"
    # the prepared datalist needs the pool and the random subsets, not the keys the selections write later
    data = plan["dataset"]["dataset_dir"]
    os.makedirs(data)
    keys = ["pretrain", "labelled_all", "validation", "test"]
    keys += [f"labelled_{n}_{i}" for n in (1, 2, 8) for i in range(5)]
    with open(os.path.join(data, "datalist.json"), "w") as f:
        json.dump({k: [{"image": "x.nii.gz"}] for k in keys}, f)
    check_datalist(plan, list(jobs.values()))


@pytest.mark.parametrize("change, message", [
    ({"selection": {"pretraining": "random", "num_labelled": [1]}}, "with a global stage"),
    ({"selection": {"pretraining": "GD_LR", "rules": ["densest"], "num_labelled": [1]}}, "rules among"),
    ({"selection": {"pretraining": "GD_LR", "num_labelled": [1], "initialisations": ["x"]}}, "unknown initialisation"),
])
def test_bad_selection_sections_are_refused(tmp_path, change, message):
    with open(os.path.join(PLANS, "smoke.yaml")) as f:
        plan = {**yaml.safe_load(f), **change}
    with pytest.raises(ValueError, match=message):
        normalise_plan(plan, experiment_dir=str(tmp_path))


def test_a_selection_without_rules_measures_the_bundles_default_rule(tmp_path):
    with open(os.path.join(PLANS, "smoke.yaml")) as f:
        plan = {**yaml.safe_load(f), "selection": {"pretraining": "GD_LR", "num_labelled": [1]}}
    with open(os.path.join(CONFIGS, "select.yaml")) as f:
        bundle_default = yaml.safe_load(f)["selection_rule"]
    assert normalise_plan(plan, experiment_dir=str(tmp_path))["selection"]["rules"] == [bundle_default]


def test_selection_table_ranks_each_selection_among_the_random_subsets():
    records = fake_records()   # G^D at |XL| = 1: test Dice 0.650, 0.660; validation 0.650, 0.760 (subsets 0, 1)
    chosen = {**[r for r in records if r["label"] == "G^D" and r["num_labelled"] == 1][0], "subset": "kmedoids",
              "selection": "kmedoids", "mean_dice": 0.655, "val_dice": 0.9, "chosen": ["patient073", "patient039"]}
    text = report.study_markdown(records, title="fake", selected=[chosen])
    assert "## Which volumes to label first" in text
    assert ("| G^D | \\|XL\\| = 1 | kmedoids | 0.655 | 0.655 [0.650, 0.660] (2) | 2 of 3 | 0.900 | "
            "0.705 [0.650, 0.760] (2) | 1 of 3 |") in text
    assert "- kmedoids, \\|XL\\| = 1, seed 0: patient073, patient039" in text
    # the fine-tuning on selected volumes counts in the wall time beside the 22 on random subsets and all labels
    assert f"over {len(records) + 1} jobs" in text and f"| finetune | {len(records) + 1} |" in text


def test_the_report_names_the_volumes_each_selection_chose(tmp_path):
    with open(tmp_path / "datalist.json", "w") as f:
        json.dump({"selected_kcenter_2_seed0": [{"image": "imagesTr/patient073_frame01.nii.gz"},
                                                {"image": "imagesTr/patient094_frame01.nii.gz"}]}, f)
    selected = [{"train_key": "selected_kcenter_2_seed0"}, {"train_key": "selected_typical_2_seed0"}]
    folder_report._add_chosen_volumes(selected, str(tmp_path))
    assert selected[0]["chosen"] == ["patient073_frame01", "patient094_frame01"] and selected[1]["chosen"] == []
    folder_report._add_chosen_volumes(selected, str(tmp_path / "deleted"))   # no data folder: no names, no error
    assert selected[0]["chosen"] == [] and selected[1]["chosen"] == []
