"""Resumable runner of the label-efficiency study: a YAML plan -> every stage as ``python -m monai.bundle run`` ->
one results file, then a report (tables, plots, example segmentations).

Repository tooling (not shipped in the bundle). From the repository root::

    PYTHONPATH=bundle python -m study.experiments run    docs/experiments/acdc_cpu.yaml
    PYTHONPATH=bundle python -m study.experiments status docs/experiments/acdc_cpu.yaml   # what is done, what is left
    PYTHONPATH=bundle python -m study.experiments report docs/experiments/acdc_cpu.yaml --output docs/study/acdc_cpu

A plan (docs/experiments.md describes every key) names a dataset (a prepare run id of ``prepare.yaml``, or an already
prepared ``dataset_dir``), the protocol (config overrides per stage), the initialisations (each a pre-training recipe:
a global strategy, optionally followed by a local strategy), the seeds, the labelled subsets per |XL| and the
benchmark on all labelled training volumes. It becomes a list of jobs:

- ``prepare``: the plan's prepare run id (once per experiment folder).
- ``global-<strategy>-seed<s>``: ``pretrain_global``; shared by every initialisation with that global strategy and seed
  (G^D, G^D + L^R and G^D + L^D start from the same encoder).
- ``global-<g>-local-<l>-seed<s>``: ``pretrain_local`` from that global checkpoint (the encoder stays frozen).
- ``<init>-xl<n>-subset<i>-seed<s>`` and ``<init>-xlall-seed<s>`` (the benchmark, ``--train_key labelled_all``):
  fine-tuning (``train.yaml``; model selection on the validation volumes) then evaluation (``evaluate.yaml``) on the
  test volumes.
- with a ``selection`` section: ``select-<rule>-xl<n>-seed<s>`` (``select.yaml``: the pool embedded by the encoder of
  the named initialisation's pre-training, n volumes chosen by the rule, written as the datalist key
  ``selected_<rule>_<n>_seed<s>``), then ``<init>-xl<n>-<rule>-seed<s>``: fine-tuning + evaluation on those volumes.

Pre-trainings come first; fine-tunings then go round by round (subset i of every |XL| for every initialisation), so an
interrupted study has the same subsets for every initialisation. ``--workers N`` runs N jobs at a time, each as soon as
the jobs it needs are done (on 2 cores, two single-threaded jobs do more per hour than one job on two threads).

Experiment folder::

    plan.yaml          the plan of the last start, read by the report (a changed protocol is refused: check_unchanged)
    results.jsonl      one line per finished fine-tuning + evaluation: the results file
    stages.jsonl       one line per finished preparation or pre-training stage
    commands.log       every command started, with the time (shell-quoted: copy, paste, run)
    pretraining/<id>/  models/pretrained_*.pt, eval/ (TensorBoard loss logs), <run id>.log
    runs/<id>/         models/model.pt, eval/ (TensorBoard), eval/test/test_mean_dice_raw.csv,
                       finetune.log, evaluate.log

Resuming: a job is done when its line exists (results.jsonl or stages.jsonl); lines are written by replacing the
whole file atomically once the job's last subprocess has succeeded. A job that did not finish has no line: its folder
is deleted and it runs again from scratch on the next start. The stage subprocesses die with the runner (Linux:
``PR_SET_PDEATHSIG``; SIGTERM and Ctrl-C stop them explicitly), so a killed runner leaves no process writing behind
it. One runner at a time per folder (a lock file).
"""

from __future__ import annotations

import ctypes
import datetime
import fcntl
import hashlib
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import yaml

BUNDLE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bundle")
CONFIGS = os.path.join(BUNDLE_DIR, "configs")
GLOBAL_STRATEGIES = ("random", "domain_minus", "domain", "positional")
LOCAL_STRATEGIES = ("random", "domain")
STAGES = ("common", "prepare", "pretrain", "select", "finetune", "evaluate")
SELECTION_RULES = ("kmedoids", "kcenter", "typical", "random")   # scripts.selection.RULES (the bundle is not imported)
# set by the runner for each job: a plan's protocol may not set them
RESERVED = ("dataset_dir", "model_dir", "output_dir", "raw_dir", "seed", "num_labelled", "subset", "train_key",
            "use_pretrained", "pretrained_checkpoint", "global#strategy", "local#strategy", "local#global_checkpoint",
            "checkpoint", "selection_rule", "selection_key")
DEFAULT_ESTIMATE = {"prepare": 20, "global": 240, "local": 60, "select": 30, "finetune": 120, "evaluate": 15}
RESULTS, STAGES_FILE, COMMANDS, PLAN_COPY, LOCK = "results.jsonl", "stages.jsonl", "commands.log", "plan.yaml", ".lock"


# ---------------------------------------------------------------- the plan
def load_plan(path: str, experiment_dir: str | None = None) -> dict:
    """Read and check the plan at ``path``; relative paths become absolute (against the working directory).

    ``experiment_dir`` replaces the plan's own. Returns the plan with every optional key filled in. Raises ValueError
    naming the first bad key.
    """
    with open(path) as f:
        plan = yaml.safe_load(f)
    if not isinstance(plan, dict):
        raise ValueError(f"{path}: a plan is a YAML mapping, got {type(plan).__name__}.")
    return normalise_plan(plan, experiment_dir=experiment_dir, source=path)


def normalise_plan(plan: dict, experiment_dir: str | None = None, source: str = "plan") -> dict:
    """Check ``plan`` and fill in its defaults (see ``load_plan``)."""
    plan = json.loads(json.dumps(plan))  # a deep copy with string keys throughout
    known = {"name", "description", "experiment_dir", "dataset", "protocol", "env", "seeds", "initialisations",
             "labelled", "benchmark", "examples", "estimate", "selection"}
    unknown = sorted(set(plan) - known)
    if unknown:
        raise ValueError(f"{source}: unknown key(s) {unknown}; expected some of {sorted(known)}.")
    plan["name"] = str(plan.get("name") or os.path.splitext(os.path.basename(source))[0])
    experiment_dir = experiment_dir or plan.get("experiment_dir")
    if not experiment_dir:
        raise ValueError(f"{source}: experiment_dir is missing (give it in the plan or with --experiment_dir).")
    plan["experiment_dir"] = os.path.abspath(experiment_dir)

    dataset = dict(plan.get("dataset") or {})
    dataset.setdefault("prepare", None)
    dataset.setdefault("raw_dir", None)
    dataset.setdefault("seed", 0)
    dataset.setdefault("overrides", {})
    dataset["dataset_dir"] = os.path.abspath(dataset.get("dataset_dir") or os.path.join(plan["experiment_dir"], "data"))
    if dataset["raw_dir"]:
        dataset["raw_dir"] = os.path.abspath(dataset["raw_dir"])
    if dataset["prepare"] is not None and not str(dataset["prepare"]).startswith("prepare_"):
        raise ValueError(f"{source}: dataset.prepare must be a prepare.yaml run id (prepare_acdc, ...) or null, "
                         f"got {dataset['prepare']!r}.")
    if dataset["prepare"] not in (None, "prepare_synthetic") and not dataset["raw_dir"]:
        raise ValueError(f"{source}: dataset.raw_dir is needed by {dataset['prepare']}.")
    plan["dataset"] = dataset

    protocol = dict(plan.get("protocol") or {})
    bad = sorted(set(protocol) - set(STAGES))
    if bad:
        raise ValueError(f"{source}: protocol has unknown stage(s) {bad}; expected some of {list(STAGES)}.")
    for stage in STAGES:
        protocol[stage] = dict(protocol.get(stage) or {})
        reserved = sorted(set(protocol[stage]) & set(RESERVED))
        if reserved:
            raise ValueError(f"{source}: protocol.{stage} sets {reserved}, which the runner sets for each job.")
    plan["protocol"] = protocol
    plan["env"] = {str(k): str(v) for k, v in (plan.get("env") or {}).items()}

    plan["seeds"] = [int(s) for s in plan.get("seeds", [0])]
    if not plan["seeds"]:
        raise ValueError(f"{source}: seeds is empty.")
    inits = plan.get("initialisations") or []
    if not inits:
        raise ValueError(f"{source}: initialisations is empty.")
    names = set()
    for init in inits:
        name = str(init.get("name", ""))
        if not name or not all(c.isalnum() or c in "_.+-" for c in name) or name in names:
            raise ValueError(f"{source}: initialisation name {name!r} must be unique and made of letters, digits, _.+-")
        names.add(name)
        init["name"] = name
        init.setdefault("label", name)
        init.setdefault("global", None)
        init.setdefault("local", None)
        init.setdefault("checkpoint", None)
        init["pretrain"] = dict(init.get("pretrain") or {})
        if init["checkpoint"] is not None:   # fine-tune from weights trained elsewhere (e.g. a release's)
            if init["global"] is not None:
                raise ValueError(f"{source}: initialisation {name}: give a checkpoint or a global strategy, not both.")
            init["checkpoint"] = os.path.abspath(str(init["checkpoint"]))
        if init["global"] is not None and init["global"] not in GLOBAL_STRATEGIES:
            raise ValueError(f"{source}: initialisation {name}: global must be one of {GLOBAL_STRATEGIES} or null, "
                             f"got {init['global']!r}.")
        if init["local"] is not None and init["local"] not in LOCAL_STRATEGIES:
            raise ValueError(f"{source}: initialisation {name}: local must be one of {LOCAL_STRATEGIES} or null, "
                             f"got {init['local']!r}.")
        if init["local"] is not None and init["global"] is None:
            raise ValueError(f"{source}: initialisation {name}: a local stage needs a global stage first.")
        unknown = sorted(set(init) - {"name", "label", "global", "local", "pretrain", "checkpoint"})
        if unknown:
            raise ValueError(f"{source}: initialisation {name}: unknown key(s) {unknown}.")
    plan["initialisations"] = inits

    labelled = {}
    for size, subsets in (plan.get("labelled") or {}).items():
        if int(size) < 1 or not subsets:
            raise ValueError(f"{source}: labelled: |XL| = {size} needs a size >= 1 and a list of subset indices.")
        labelled[int(size)] = [int(i) for i in subsets]
    plan["labelled"] = dict(sorted(labelled.items()))
    benchmark = plan.get("benchmark")
    if benchmark:
        benchmark = dict(benchmark)
        benchmark["initialisations"] = [str(n) for n in benchmark.get("initialisations", ["random"])]
        benchmark["seeds"] = [int(s) for s in benchmark.get("seeds", plan["seeds"])]
        missing = sorted(set(benchmark["initialisations"]) - names)
        if missing:
            raise ValueError(f"{source}: benchmark names unknown initialisation(s) {missing}.")
    plan["benchmark"] = benchmark or None
    plan["selection"] = _normalise_selection(plan.get("selection"), {i["name"]: i for i in inits}, source)
    if not plan["labelled"] and not plan["benchmark"]:
        raise ValueError(f"{source}: nothing to fine-tune: give labelled subsets or a benchmark.")
    examples = dict(plan.get("examples") or {})
    examples["num_labelled"] = [int(n) for n in examples.get("num_labelled", [n for n in (1, 2) if n in labelled])]
    examples["volumes"] = int(examples.get("volumes", 1))
    plan["examples"] = examples
    plan["estimate"] = {**DEFAULT_ESTIMATE, **{k: float(v) for k, v in (plan.get("estimate") or {}).items()}}
    return plan


def _normalise_selection(selection: dict | None, inits: dict, source: str) -> dict | None:
    """The plan's ``selection`` section checked: ``pretraining`` (the initialisation whose pre-trained encoder embeds
    the pool; it needs a global stage), ``rules``, ``num_labelled`` (|XL| values) and ``initialisations`` (fine-tuned
    on each selection; default: every one)."""
    if not selection:
        return None
    selection = dict(selection)
    unknown = sorted(set(selection) - {"pretraining", "rules", "num_labelled", "initialisations"})
    if unknown:
        raise ValueError(f"{source}: selection: unknown key(s) {unknown}.")
    encoder = inits.get(str(selection.get("pretraining")))
    if encoder is None or encoder["global"] is None:
        raise ValueError(f"{source}: selection.pretraining must name an initialisation with a global stage, got "
                         f"{selection.get('pretraining')!r}.")
    selection["pretraining"] = encoder["name"]
    selection["rules"] = [str(r) for r in selection.get("rules", ["kmedoids"])]
    bad = sorted(set(selection["rules"]) - set(SELECTION_RULES))
    selection["num_labelled"] = [int(n) for n in selection.get("num_labelled", [])]
    if bad or not selection["rules"] or not selection["num_labelled"] or min(selection["num_labelled"]) < 1:
        raise ValueError(f"{source}: selection needs rules among {SELECTION_RULES} and num_labelled sizes >= 1.")
    selection["initialisations"] = [str(n) for n in selection.get("initialisations", list(inits))]
    missing = sorted(set(selection["initialisations"]) - set(inits))
    if missing:
        raise ValueError(f"{source}: selection names unknown initialisation(s) {missing}.")
    return selection


# ---------------------------------------------------------------- jobs
@dataclass
class Job:
    """One unit of work: its subprocesses run in order in ``folder``; done when its ledger holds a line with ``id``."""

    id: str
    kind: str                 # prepare | global | local | select | finetune
    folder: str               # deleted and recreated before the job runs
    steps: list               # [(step name, command list)], run in order, each logged to <folder>/<step name>.log
    config: dict              # what defines the job's outcome (compared on restart); no paths
    info: dict = field(default_factory=dict)   # copied into the ledger line
    needs: tuple = ()         # ids of jobs that must be done first

    @property
    def ledger(self) -> str:
        return RESULTS if self.kind == "finetune" else STAGES_FILE


def format_value(value) -> str:
    """A config value as one command-line word that ``monai.bundle run`` (python-fire) parses back to the value."""
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{_literal(k)}:{_literal(v)}" for k, v in value.items()) + "}"
    return _literal(value) if not isinstance(value, str) else value


def _literal(value) -> str:
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, (list, tuple, dict)):
        return format_value(value)
    return repr(value)


def bundle_command(run_id: str, configs: list[str], overrides: dict) -> list[str]:
    """``python -m monai.bundle run <run_id> --config_file [...] --key value ...``."""
    files = [os.path.join(CONFIGS, c) for c in configs]   # several files: a list, merged in order by MONAI
    command = [sys.executable, "-m", "monai.bundle", "run", run_id,
               "--config_file", files[0] if len(files) == 1 else json.dumps(files, separators=(",", ":"))]
    for key, value in overrides.items():
        command += [f"--{key}", format_value(value)]
    return command


def _tag(overrides: dict) -> str:
    """A short hash of extra overrides, so recipes that differ only in them get different job ids."""
    if not overrides:
        return ""
    return "-" + hashlib.sha256(json.dumps(overrides, sort_keys=True).encode()).hexdigest()[:8]


def recipe(init: dict) -> dict:
    """An initialisation's recipe in the results: the global and local strategies (null: none), or for weights
    trained elsewhere {"global": "checkpoint", "local": null, "checkpoint": path} (never taken for random init)."""
    if init["checkpoint"] is not None:
        return {"global": "checkpoint", "local": None, "checkpoint": init["checkpoint"]}
    return {"global": init["global"], "local": init["local"]}


def build_jobs(plan: dict) -> list[Job]:
    """The plan as an ordered list of jobs: preparation, pre-trainings, then fine-tunings round by round."""
    exp, data = plan["experiment_dir"], plan["dataset"]
    protocol = plan["protocol"]
    paths = {"dataset_dir": data["dataset_dir"]}
    jobs: list[Job] = []
    if data["prepare"]:
        overrides = {**protocol["common"], **protocol["prepare"], **data["overrides"], "seed": data["seed"]}
        if data["raw_dir"]:
            overrides["raw_dir"] = data["raw_dir"]
        folder = os.path.join(exp, "prepare")
        jobs.append(Job("prepare", "prepare", folder,
                        [(data["prepare"], bundle_command(data["prepare"], ["train.yaml", "prepare.yaml"],
                                                          {**paths, **overrides}))],
                        config={"run_id": data["prepare"], "raw_dir": data["raw_dir"], "overrides": overrides}))
    prepare = ("prepare",) if data["prepare"] else ()

    pretrain = {**protocol["common"], **protocol["pretrain"]}
    pretraining: dict[tuple, Job] = {}

    def pretraining_job(init: dict, seed: int) -> Job | None:
        if init["global"] is None:
            return None
        extra = init["pretrain"]
        gid = f"global-{init['global']}{_tag(extra)}-seed{seed}"
        if gid not in pretraining:
            folder = os.path.join(exp, "pretraining", gid)
            overrides = {**paths, **pretrain, **extra, "model_dir": os.path.join(folder, "models"),
                         "output_dir": os.path.join(folder, "eval"), "seed": seed, "global#strategy": init["global"]}
            pretraining[gid] = Job(
                gid, "global", folder,
                [("pretrain_global", bundle_command("pretrain_global", ["train.yaml", "pretrain.yaml"], overrides))],
                config={"strategy": init["global"], "seed": seed, "overrides": {**pretrain, **extra}},
                info={"strategy": init["global"], "seed": seed,
                      "checkpoint": os.path.join("pretraining", gid, "models", "pretrained_global.pt"),
                      "log_dir": os.path.join("pretraining", gid, "eval", "pretrain_global"), "tag": "global_loss"},
                needs=prepare)
        if init["local"] is None:
            return pretraining[gid]
        lid = f"global-{init['global']}-local-{init['local']}{_tag(extra)}-seed{seed}"
        if lid not in pretraining:
            folder = os.path.join(exp, "pretraining", lid)
            global_checkpoint = os.path.join(exp, pretraining[gid].info["checkpoint"])
            overrides = {**paths, **pretrain, **extra, "model_dir": os.path.join(folder, "models"),
                         "output_dir": os.path.join(folder, "eval"), "seed": seed, "local#strategy": init["local"],
                         "local#global_checkpoint": global_checkpoint}
            pretraining[lid] = Job(
                lid, "local", folder,
                [("pretrain_local", bundle_command("pretrain_local", ["train.yaml", "pretrain.yaml"], overrides))],
                config={"global": gid, "strategy": init["local"], "seed": seed, "overrides": {**pretrain, **extra}},
                info={"strategy": init["local"], "global": gid, "seed": seed,
                      "checkpoint": os.path.join("pretraining", lid, "models", "pretrained_local.pt"),
                      "log_dir": os.path.join("pretraining", lid, "eval", "pretrain_local"), "tag": "local_loss"},
                needs=prepare + (gid,))
        return pretraining[lid]

    finetune = {**protocol["common"], **protocol["finetune"]}
    evaluate = {**protocol["common"], **protocol["evaluate"]}

    def finetune_job(init: dict, seed: int, size: int | None, subset: int | None, chosen: Job | None = None) -> Job:
        source = pretraining_job(init, seed)
        if chosen is not None:   # the volumes a select job chose
            rule = chosen.info["selection"]
            jid, selection = f"{init['name']}-xl{size}-{rule}-seed{seed}", {"train_key": chosen.info["key"]}
        elif size is None:
            jid, selection = f"{init['name']}-xlall-seed{seed}", {"train_key": "labelled_all"}
        else:
            jid = f"{init['name']}-xl{size}-subset{subset}-seed{seed}"
            selection = {"num_labelled": size, "subset": subset}
        folder = os.path.join(exp, "runs", jid)
        run_paths = {**paths, "model_dir": os.path.join(folder, "models"), "output_dir": os.path.join(folder, "eval")}
        if init["checkpoint"] is not None:   # encoder + decoder blocks 1..l of the given checkpoint
            start = {"pretrained_checkpoint": init["checkpoint"]}
        elif source is None:
            start = {"use_pretrained": False}
        elif source.kind == "global":   # encoder only: the decoder starts from random initialisation
            start = {"pretrained_checkpoint": os.path.join(exp, source.info["checkpoint"]),
                     "pretrained_decoder_blocks": 0}
        else:
            start = {"pretrained_checkpoint": os.path.join(exp, source.info["checkpoint"])}
        train_overrides = {**run_paths, **finetune, "seed": seed, **selection, **start}
        init_config = {k: init[k] for k in ("global", "local", "pretrain")}
        if init["checkpoint"] is not None:   # only then: the configurations of earlier studies stay the same
            init_config["checkpoint"] = init["checkpoint"]
        steps = [("finetune", bundle_command("run", ["train.yaml"], train_overrides)),
                 ("evaluate", bundle_command("run", ["train.yaml", "evaluate.yaml"], {**run_paths, **evaluate}))]
        return Job(
            jid, "finetune", folder, steps,
            config={"init": init_config, "seed": seed, **selection,
                    "finetune": finetune, "evaluate": evaluate,
                    "start": {k: v for k, v in start.items() if k != "pretrained_checkpoint"},
                    "pretraining": source.id if source else None},
            info={"init": init["name"], "label": init["label"], "recipe": recipe(init),
                  "seed": seed, "num_labelled": size if size is not None else "all",
                  "subset": chosen.info["selection"] if chosen else subset,
                  "train_key": selection.get("train_key", f"labelled_{size}_{subset}"),
                  "pretraining": source.id if source else None,
                  "model_dir": os.path.join("runs", jid, "models"), "output_dir": os.path.join("runs", jid, "eval"),
                  **({"selection": chosen.info["selection"]} if chosen else {})},
            needs=prepare + ((source.id,) if source else ()) + ((chosen.id,) if chosen else ()))

    def select_job(rule: str, size: int, seed: int) -> Job:
        encoder = pretraining_job(by_name[plan["selection"]["pretraining"]], seed)
        jid, key = f"select-{rule}-xl{size}-seed{seed}", f"selected_{rule}_{size}_seed{seed}"
        folder = os.path.join(exp, "selection", jid)
        overrides = {**paths, **protocol["common"], **protocol["select"], "model_dir": os.path.join(folder, "models"),
                     "output_dir": os.path.join(folder, "eval"), "seed": seed, "num_labelled": size,
                     "selection_rule": rule, "selection_key": key,
                     "pretrained_checkpoint": os.path.join(exp, encoder.info["checkpoint"])}
        return Job(jid, "select", folder,
                   [("select", bundle_command("select", ["train.yaml", "select.yaml"], overrides))],
                   config={"rule": rule, "num_labelled": size, "seed": seed, "pretraining": encoder.id,
                           "overrides": {**protocol["common"], **protocol["select"]}},
                   info={"selection": rule, "num_labelled": size, "seed": seed, "key": key,
                         "csv": os.path.join("selection", jid, "eval", f"{key}.csv")},
                   needs=prepare + (encoder.id,))

    inits = plan["initialisations"]
    by_name = {init["name"]: init for init in inits}
    for seed in plan["seeds"]:
        for init in inits:
            pretraining_job(init, seed)
    if plan["benchmark"]:
        for seed in plan["benchmark"]["seeds"]:
            for init in inits:
                if init["name"] in plan["benchmark"]["initialisations"]:
                    pretraining_job(init, seed)
    ordered = sorted(pretraining.values(), key=lambda j: j.kind == "local")  # all global stages, then local ones
    jobs += ordered
    rounds = max((len(s) for s in plan["labelled"].values()), default=0)
    for seed in plan["seeds"]:
        for r in range(rounds):
            for size, subsets in plan["labelled"].items():
                if r < len(subsets):
                    jobs += [finetune_job(init, seed, size, subsets[r]) for init in inits]
    if plan["selection"]:   # after the random subsets: the selections are compared with them
        selection = plan["selection"]
        for seed in plan["seeds"]:
            for size in selection["num_labelled"]:
                for rule in selection["rules"]:
                    chosen = select_job(rule, size, seed)
                    jobs.append(chosen)
                    jobs += [finetune_job(by_name[name], seed, size, None, chosen)
                             for name in selection["initialisations"]]
    if plan["benchmark"]:
        for seed in plan["benchmark"]["seeds"]:
            jobs += [finetune_job(init, seed, None, None) for init in inits
                     if init["name"] in plan["benchmark"]["initialisations"]]
    ids = [j.id for j in jobs]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ValueError(f"the plan gives the same job twice: {duplicates} (a repeated subset or seed?).")
    return jobs


# ---------------------------------------------------------------- ledgers (results.jsonl, stages.jsonl)
def read_ledger(path: str) -> list[dict]:
    """The lines of a ledger (JSON objects), in order; [] when the file does not exist."""
    if not os.path.isfile(path):
        return []
    records = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{number}: not a JSON line ({e}).") from None
    return records


def append_ledger(path: str, record: dict) -> None:
    """Append ``record`` as one JSON line by writing the whole file anew and renaming it over the old one: a reader
    (or a restart after a kill) sees the file with or without the line, never half of it."""
    old = ""
    if os.path.isfile(path):
        with open(path) as f:
            old = f.read()
    if old and not old.endswith("\n"):
        old += "\n"
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".ledger-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(old + json.dumps(record, sort_keys=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def done_records(experiment_dir: str) -> dict[str, dict]:
    """Finished jobs of an experiment folder: id -> ledger line (results and stages)."""
    records = {}
    for name in (STAGES_FILE, RESULTS):
        for record in read_ledger(os.path.join(experiment_dir, name)):
            records[record["id"]] = record
    return records


def check_unchanged(jobs: list[Job], done: dict[str, dict]) -> None:
    """Refuse to resume when a finished job was made with another configuration than the plan now asks for."""
    changed = [j.id for j in jobs if j.id in done and done[j.id].get("config") != _jsonable(j.config)]
    if changed:
        raise ValueError(
            f"{len(changed)} finished job(s) were run with another configuration than the plan now gives "
            f"(e.g. {changed[:3]}): start a new experiment folder (--experiment_dir), or delete their lines from "
            f"{RESULTS} / {STAGES_FILE} to have them run again."
        )


def _jsonable(value):
    return json.loads(json.dumps(value))


# ---------------------------------------------------------------- running
def _die_with_parent(parent: int):
    """preexec_fn: the stage subprocess gets SIGKILL when the runner dies, however it dies (Linux)."""

    def setup():
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
        if os.getppid() != parent:   # the runner died before prctl took effect
            os._exit(1)

    return setup


_LIVE: set = set()              # the stage subprocesses running now, from every worker thread
_LIVE_LOCK = threading.Lock()


def run_command(command: list[str], log_file: str, env: dict, echo: bool = False) -> int:
    """Run ``command`` with stdout + stderr to ``log_file`` (and to the console with ``echo``); returns its exit
    status. An exception in the calling thread stops the subprocess before propagating; ``stop_commands`` stops
    the subprocesses of every thread (the runner's main thread calls it on SIGTERM or Ctrl-C)."""
    with open(log_file, "w") as log:
        log.write("$ " + shlex.join(command) + "\n\n")
        log.flush()
        process = subprocess.Popen(command, stdout=subprocess.PIPE if echo else log, stderr=subprocess.STDOUT,
                                   env=env, preexec_fn=_die_with_parent(os.getpid()),
                                   text=echo, bufsize=1 if echo else -1)
        with _LIVE_LOCK:
            _LIVE.add(process)
        try:
            if echo:
                for line in process.stdout:
                    log.write(line)
                    sys.stdout.write(line)
            return process.wait()
        except BaseException:
            _stop([process])
            raise
        finally:
            with _LIVE_LOCK:
                _LIVE.discard(process)


def stop_commands() -> None:
    """Stop every stage subprocess still running (SIGTERM, then SIGKILL after 30 s)."""
    with _LIVE_LOCK:
        processes = list(_LIVE)
    _stop(processes)


def _stop(processes: list) -> None:
    for process in processes:
        process.terminate()
    for process in processes:
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


def _raise_on_sigterm(signum, frame):
    print("\nterminated: an unfinished job has no result line and runs again on the next start", flush=True)
    raise SystemExit(128 + signum)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def _describe(job: Job) -> str:
    if job.kind == "prepare":
        return f"prepare data ({job.steps[0][0]})"
    if job.kind == "global":
        return f"pre-train global {job.info['strategy']} (seed {job.info['seed']}; {job.id})"
    if job.kind == "local":
        return f"pre-train local {job.info['strategy']} after {job.info['global']}"
    if job.kind == "select":
        return f"select {job.info['num_labelled']} volume(s) by {job.info['selection']} (seed {job.info['seed']})"
    size = job.info["num_labelled"]
    where = "all labelled volumes" if size == "all" else f"|XL|={size} subset {job.info['subset']}"
    return f"fine-tune + evaluate {job.info['label']}, {where}, seed {job.info['seed']}"


class Estimator:
    """Seconds a job takes: the mean measured so far for its kind, else the plan's ``estimate`` section."""

    def __init__(self, plan_estimate: dict, done: dict[str, dict]):
        self.plan = plan_estimate
        self.measured: dict[str, list[float]] = {}
        for record in done.values():
            self.add(record)

    def add(self, record: dict) -> None:
        times = record.get("wall_time_s", {})
        for step, seconds in times.items():
            self.measured.setdefault(_kind_of_step(step), []).append(float(seconds))

    def seconds(self, job: Job) -> float:
        kinds = ["finetune", "evaluate"] if job.kind == "finetune" else [job.kind]
        total = 0.0
        for kind in kinds:
            measured = self.measured.get(kind)
            total += sum(measured) / len(measured) if measured else self.plan.get(kind, 0.0)
        return total


def _kind_of_step(step: str) -> str:
    fallback = "prepare" if step.startswith("prepare") else step
    return {"pretrain_global": "global", "pretrain_local": "local"}.get(step, fallback)


def _machine() -> dict:
    return {"node": platform.node(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "python": platform.python_version()}


def _check_datalist(plan: dict, jobs: list[Job]) -> tuple[list, dict]:
    """The datalist must hold every list the jobs read; returns its class names (the data contract's, background
    first, or []) and the
    number of volumes of each list."""
    path = os.path.join(plan["dataset"]["dataset_dir"], "datalist.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: give dataset.prepare in the plan, or prepare the dataset first.")
    with open(path) as f:
        datalist = json.load(f)
    needed = {"validation", "test"}
    needed |= {"pretrain" for j in jobs if j.kind in ("global", "local")}
    needed |= {"labelled_all" for j in jobs if j.kind == "select"}   # the pool the selections choose from
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


def _result(job: Job, experiment_dir: str, class_names: list, sizes: dict) -> dict:
    """The results line of a finished fine-tuning job: per-volume Dice per class from the evaluation CSV, and the best
    validation Dice of the fine-tuning ("val_dice", the model-selection score; None when it was never validated)."""
    from study.report import best_validation_dice, read_dice_rows

    output_dir = os.path.join(experiment_dir, job.info["output_dir"])
    names, dice = read_dice_rows(os.path.join(output_dir, "test"))
    per_volume = [_nanmean(row) for row in dice]
    classes = _class_names(class_names, len(dice[0]) if dice else 0)
    return {
        **job.info,
        "num_train_volumes": sizes.get(job.info["train_key"], job.info["num_labelled"]),   # selections: written later
        "classes": classes,
        "volumes": [{"image": n, "dice": [None if v != v else v for v in row]} for n, row in zip(names, dice)],
        "class_dice": [_nanmean([row[c] for row in dice]) for c in range(len(classes))],
        "mean_dice": _nanmean(per_volume),
        "val_dice": best_validation_dice(output_dir),
    }


def _nanmean(values) -> float | None:
    values = [v for v in values if v is not None and v == v]
    return sum(values) / len(values) if values else None


def run(plan: str, experiment_dir: str | None = None, echo: bool = False, keep_going: bool = False,
        workers: int = 1, kinds: tuple | list | None = None) -> int:
    """Run every job of ``plan`` that is not done yet; returns the number of jobs that failed.

    Args:
        plan: the plan's YAML file.
        experiment_dir: replaces the plan's ``experiment_dir``.
        echo: also stream each subprocess's output to the console (it always goes to the job's log files).
        keep_going: on a failed job, go on with the jobs that do not depend on it (default: stop).
        workers: jobs run at the same time, each as soon as the jobs it needs are done, in plan order. With more
            than one, each job gets ``OMP_NUM_THREADS`` = CPU cores / workers unless the plan's ``env`` sets it.
        kinds: run only the jobs of these kinds (prepare, global, local, finetune); default: every job (a release
            runs the pre-training first and checks its stopping reports before it fine-tunes).
    """
    if int(workers) < 1:
        raise ValueError(f"workers must be at least 1, not {workers}.")
    config = load_plan(plan, experiment_dir)
    exp = config["experiment_dir"]
    os.makedirs(exp, exist_ok=True)
    lock = open(os.path.join(exp, LOCK), "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise RuntimeError(f"another runner is working in {exp}.") from None
    previous = signal.signal(signal.SIGTERM, _raise_on_sigterm)
    try:
        return _run(config, echo, keep_going, int(workers), kinds)
    finally:
        signal.signal(signal.SIGTERM, previous)
        lock.close()


def _run(plan: dict, echo: bool, keep_going: bool, workers: int = 1, kinds: tuple | list | None = None) -> int:
    exp = plan["experiment_dir"]
    jobs = build_jobs(plan)
    done = done_records(exp)
    check_unchanged(jobs, done)
    if kinds is not None:
        unknown = sorted(set(kinds) - {"prepare", "global", "local", "finetune"})
        if unknown:
            raise ValueError(f"kinds {unknown} unknown; expected some of prepare, global, local, finetune.")
        jobs = [j for j in jobs if j.kind in kinds]
    _write_text(os.path.join(exp, PLAN_COPY), yaml.safe_dump(plan, sort_keys=False, allow_unicode=True))
    for job in jobs:   # a stage whose outputs were deleted runs again (and so do the jobs waiting for it)
        if job.kind in ("global", "local") and job.id in done:
            if not os.path.isfile(os.path.join(exp, job.info["checkpoint"])):
                print(f"{job.id}: done, but {job.info['checkpoint']} is missing: it runs again")
                del done[job.id]
    estimator = Estimator(plan["estimate"], done)
    pending = [j for j in jobs if j.id not in done]
    print(f"experiment {exp}: {len(jobs)} jobs, {len(jobs) - len(pending)} done, {len(pending)} to run "
          f"(about {_duration(sum(estimator.seconds(j) for j in pending) / workers)}"
          + (f", {workers} at a time" if workers > 1 else "") + ")", flush=True)
    if not pending:
        return 0
    class_names, sizes = [], {}
    if not plan["dataset"]["prepare"] or "prepare" in done:
        class_names, sizes = _check_datalist(plan, jobs)
    env = {**os.environ, **plan["env"], "PYTHONUNBUFFERED": "1"}
    if workers > 1 and "OMP_NUM_THREADS" not in plan["env"]:   # share the cores instead of oversubscribing them
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // workers))
    position = {job.id: f"[{len(jobs) - len(pending) + n}/{len(jobs)}]" for n, job in enumerate(pending, 1)}
    failed: set[str] = set()
    waiting, running = list(pending), {}
    stopping = False
    started = time.time()
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        while waiting or running:
            for job in list(waiting):   # start what can start, in plan order
                if any(n in failed for n in job.needs):
                    print(f"{position[job.id]} {_describe(job)}: skipped, "
                          f"{next(n for n in job.needs if n in failed)} did not finish", flush=True)
                    failed.add(job.id)
                    waiting.remove(job)
                elif not stopping and len(running) < workers and all(n in done for n in job.needs):
                    print(f"{position[job.id]} {_describe(job)} ...", flush=True)
                    waiting.remove(job)
                    running[pool.submit(_execute, job, exp, env, echo)] = job
            if not running:
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                job = running.pop(future)
                times, failure = future.result()
                if failure:
                    print(f"    FAILED: {job.id}: {failure}", flush=True)
                    failed.add(job.id)
                    stopping = stopping or not keep_going
                    continue
                record = {"id": job.id, "kind": job.kind, **job.info}
                if job.kind == "prepare":
                    class_names, sizes = _check_datalist(plan, jobs)
                if job.kind == "finetune":
                    record = {"id": job.id, **_result(job, exp, class_names, sizes)}
                record.update(config=_jsonable(job.config), wall_time_s=times, finished=_now(), machine=_machine())
                append_ledger(os.path.join(exp, job.ledger), record)
                done[job.id] = record
                estimator.add(record)
                left = sum(estimator.seconds(j) for j in waiting + list(running.values())) / workers
                score = f", test Dice {record['mean_dice']:.3f}" if record.get("mean_dice") is not None else ""
                where = f"{job.id} " if workers > 1 else ""
                print(f"    {where}done in {_duration(sum(times.values()))}{score}; about {_duration(left)} left",
                      flush=True)
    except BaseException:   # SIGTERM or Ctrl-C: no job that is still running gets a line
        stop_commands()
        raise
    finally:
        pool.shutdown(wait=True)
    if stopping:
        print("stopped; fix the cause and run again (finished jobs are kept).", flush=True)
        return len(failed)
    for job in waiting:   # needs that are not in the plan: cannot happen with build_jobs, said rather than hidden
        print(f"{position[job.id]} {_describe(job)}: skipped, its needs never finished", flush=True)
        failed.add(job.id)
    print(f"finished {len(pending) - len(failed)} job(s) in {_duration(time.time() - started)}"
          + (f", {len(failed)} failed or skipped" if failed else "") + f"; results: {os.path.join(exp, RESULTS)}",
          flush=True)
    return len(failed)


def _execute(job: Job, exp: str, env: dict, echo: bool) -> tuple[dict, str | None]:
    """Run a job's steps in order in a fresh folder (a worker thread); returns the seconds per step and, when a
    step failed, what to print about it (else None)."""
    shutil.rmtree(job.folder, ignore_errors=True)   # partial outputs of a killed attempt
    os.makedirs(job.folder)
    times = {}
    for step, command in job.steps:
        _log_command(exp, job.id, command)
        log_file = os.path.join(job.folder, f"{step}.log")
        t0 = time.time()
        status = run_command(command, log_file, env, echo=echo)
        times[step] = round(time.time() - t0, 1)
        if status != 0:
            return times, f"{step} exited with status {status}; the last lines of {log_file}:\n{_tail(log_file)}"
    return times, None


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def _log_command(exp: str, job_id: str, command: list[str]) -> None:
    with _LIVE_LOCK, open(os.path.join(exp, COMMANDS), "a") as f:   # one writer at a time (worker threads)
        f.write(f"# {_now()} {job_id}\n{shlex.join(command)}\n")


def _tail(path: str, lines: int = 30) -> str:
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-lines:])


def status(plan: str, experiment_dir: str | None = None) -> None:
    """Print the plan's jobs by kind (done / to run) and the estimated time left, without running anything."""
    config = load_plan(plan, experiment_dir)
    jobs = build_jobs(config)
    done = done_records(config["experiment_dir"])
    estimator = Estimator(config["estimate"], done)
    print(f"experiment {config['experiment_dir']}")
    print(f"{'kind':<10}{'jobs':>6}{'done':>6}{'to run':>8}{'s per job':>11}{'time left':>16}")
    total = 0.0
    for kind in ("prepare", "global", "local", "select", "finetune"):
        of_kind = [j for j in jobs if j.kind == kind]
        if not of_kind:
            continue
        pending = [j for j in of_kind if j.id not in done]
        each = estimator.seconds(of_kind[0])
        total += each * len(pending)
        print(f"{kind:<10}{len(of_kind):>6}{len(of_kind) - len(pending):>6}{len(pending):>8}{each:>11.0f}"
              f"{_duration(each * len(pending)):>16}")
    print(f"time left: about {_duration(total)} (finetune = fine-tune + evaluation)")


def report(target: str, output: str, examples: bool = True, experiment_dir: str | None = None) -> list[str]:
    """Tables (markdown), Dice against |XL| (PNG), pre-training loss curves (PNG) and example test slices (PNG) from
    an experiment folder's results; ``target`` is the plan file or the experiment folder. Returns the files written.

    The example slices are predicted here, in-process: each chosen run's ``models/model.pt`` is loaded into the
    config's ``network_def`` and run on the test volume pre-processed by the config's ``train#preprocessing``
    (``train.yaml`` with the plan's overrides), so the slices are shown on the network's input grid.
    """
    from scripts.report import STOP_FILE
    from study import report as tables

    if os.path.isfile(target):
        exp = load_plan(target, experiment_dir)["experiment_dir"]
    else:
        exp = os.path.abspath(experiment_dir or target)
    copy = os.path.join(exp, PLAN_COPY)
    if not os.path.isfile(copy):
        raise FileNotFoundError(f"{copy} not found: {exp} is not an experiment folder written by this runner.")
    with open(copy) as f:
        plan = normalise_plan(yaml.safe_load(f), source=copy)
    records = read_ledger(os.path.join(exp, RESULTS))
    selected = [r for r in records if r.get("selection")]   # fine-tunings on selected volumes: their own table
    records = [r for r in records if not r.get("selection")]
    if not records:
        raise ValueError(f"{os.path.join(exp, RESULTS)} holds no result on labelled subsets yet.")
    stages = read_ledger(os.path.join(exp, STAGES_FILE))
    order = [i["label"] for i in plan["initialisations"]]
    os.makedirs(output, exist_ok=True)
    written = []

    curves = {}
    for record in stages:
        if record["kind"] in ("global", "local"):
            panel = "global stage" if record["kind"] == "global" else "local stage (encoder frozen)"
            curves.setdefault(panel, []).append((record["id"], os.path.join(exp, record["log_dir"]), record["tag"]))
            stop = os.path.join(exp, os.path.dirname(record["log_dir"]), STOP_FILE.format(stage=record["kind"]))
            if os.path.isfile(stop):  # the stopping rule's report (scripts.engines.PlateauStop): why the stage ended
                with open(stop) as f:
                    record["stop"] = json.load(f)
    losses = tables.loss_summary(curves)
    text = tables.study_markdown(records, stages, order, losses=losses, title=plan.get("description") or plan["name"],
                                 protocol=plan["protocol"], selected=selected)
    written.append(_write_text(os.path.join(output, "results.md"), text))
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


def _write_text(path: str, text: str) -> str:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    return path


def example_rows(plan: dict, records: list[dict], exp: str) -> list[dict]:
    """Rows of the example figure, one per |XL| in ``plan["examples"]["num_labelled"]`` and test volume: the random
    initialisation against the best pre-training at that |XL| (highest mean Dice over its runs), both on the same
    labelled subset and seed (the first they share). The test volume is the one with the median Dice of the best
    pre-training's run (not a hand-picked one); the slice is the one with the largest ground-truth foreground."""
    import torch
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(os.path.join(CONFIGS, "train.yaml"))
    protocol = plan["protocol"]
    parser.update({"dataset_dir": plan["dataset"]["dataset_dir"], **protocol["common"], **protocol["evaluate"],
                   "device": "$torch.device('cpu')", "use_pretrained": False})   # the data's contract alone
    preprocessing = parser.get_parsed_content("train#preprocessing")
    with open(os.path.join(plan["dataset"]["dataset_dir"], "datalist.json")) as f:
        datalist = json.load(f)
    base = plan["dataset"]["dataset_dir"]
    labels_of = {os.path.abspath(os.path.join(base, c["image"])): os.path.abspath(os.path.join(base, c["label"]))
                 for c in datalist["test"]}

    def predict(record, image):
        network = parser.get_parsed_content("network_def", instantiate=True, lazy=False)
        state = torch.load(os.path.join(exp, record["model_dir"], "model.pt"), map_location="cpu", weights_only=True)
        network.load_state_dict(state.get("model", state))
        network.eval()
        with torch.no_grad():
            slices = image[0].permute(2, 0, 1)[:, None]   # (Z, 1, H, W)
            return network(slices).argmax(1).numpy()      # (Z, H, W)

    rows = []
    for size in plan["examples"]["num_labelled"]:
        at_size = [r for r in records if r["num_labelled"] == size and r.get("mean_dice") is not None]
        random_runs = {(r["subset"], r["seed"]): r for r in at_size if r["recipe"]["global"] is None}
        means: dict[str, list[float]] = {}
        for r in at_size:
            if r["recipe"]["global"] is not None:
                means.setdefault(r["label"], []).append(r["mean_dice"])
        if not random_runs or not means:
            continue
        best = max(means, key=lambda k: sum(means[k]) / len(means[k]))
        pairs = sorted((r["subset"], r["seed"]) for r in at_size if r["label"] == best
                       and (r["subset"], r["seed"]) in random_runs)
        if not pairs:
            continue
        best_run = next(r for r in at_size if r["label"] == best and (r["subset"], r["seed"]) == pairs[0])
        random_run = random_runs[pairs[0]]
        volumes = sorted(best_run["volumes"], key=lambda v: _nanmean(v["dice"]) or 0.0)
        middle = (len(volumes) - 1) // 2
        for volume in volumes[middle : middle + plan["examples"]["volumes"]]:
            image_path = os.path.abspath(volume["image"])
            if image_path not in labels_of:
                continue
            item = preprocessing({"image": image_path, "label": labels_of[image_path]})
            image, label = torch.as_tensor(item["image"]).float(), torch.as_tensor(item["label"])
            ground_truth = label[0].permute(2, 0, 1).numpy().astype(int)   # (Z, H, W)
            z = int((ground_truth > 0).reshape(len(ground_truth), -1).sum(1).argmax())
            name = os.path.basename(image_path).split(".")[0]

            def dice_of(run):
                match = next(v for v in run["volumes"] if os.path.abspath(v["image"]) == image_path)
                return _nanmean(match["dice"])

            rows.append({
                "title": f"|XL| = {size}, subset {pairs[0][0]}, seed {pairs[0][1]}: {name}, slice {z}",
                "image": image[0, :, :, z].numpy(),
                "panels": [("ground truth", ground_truth[z]),
                           (f"{random_run['label']} (volume Dice {dice_of(random_run):.3f})",
                            predict(random_run, image)[z]),
                           (f"{best} (volume Dice {dice_of(best_run):.3f})", predict(best_run, image)[z])],
            })
    return rows


def _run_and_exit(*args, **kwargs) -> None:
    try:
        failed = run(*args, **kwargs)
    except KeyboardInterrupt:
        print("\ninterrupted: an unfinished job has no result line and runs again on the next start", flush=True)
        sys.exit(130)
    except (ValueError, RuntimeError, FileNotFoundError) as error:   # a bad plan, a busy folder, no dataset
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
    sys.exit(1 if failed else 0)


def _report_quietly(*args, **kwargs) -> None:
    report(*args, **kwargs)   # the files are printed; fire would print the returned list again


def main() -> None:
    import functools

    import fire

    command_line_run = functools.wraps(run)(_run_and_exit)   # fire shows run's arguments and docstring
    command_line_report = functools.wraps(report)(_report_quietly)
    fire.Fire({"run": command_line_run, "status": status, "report": command_line_report})


if __name__ == "__main__":
    main()
