"""A study plan (YAML, docs/experiments.md describes every key): read, checked, and its optional keys filled in.

``load_plan`` reads a file, ``normalise_plan`` checks a mapping; both return the plan with every key present, paths
absolute. The keys are filled in a fixed order: the runner writes the result to ``plan.yaml`` in the experiment
folder, and the report reads it back. The strategies and selection rules are the bundle's own (``scripts.losses``,
``scripts.selection``); the keys the runner sets, and the names it reads back, are checked against the configs when
a plan is loaded (``study.configs``).
"""

from __future__ import annotations

import json
import os

import yaml

from scripts.losses import GLOBAL_STRATEGIES, LOCAL_STRATEGIES
from scripts.selection import RULES as SELECTION_RULES
from study.configs import (
    RESERVED,
    all_labelled_key,
    check_runner_keys,
    config_files,
    datalist_keys,
    read_configs,
    subset_key,
)

STAGES = ("common", "prepare", "pretrain", "select", "finetune", "evaluate")
DEFAULT_ESTIMATE = {"prepare": 20, "global": 240, "local": 60, "select": 30, "finetune": 120, "evaluate": 15}
PLAN_KEYS = {"name", "description", "experiment_dir", "dataset", "protocol", "env", "seeds", "initialisations",
             "labelled", "benchmark", "examples", "estimate", "selection", "comparisons"}
INIT_KEYS = {"name", "label", "global", "local", "pretrain", "checkpoint", "finetune", "configs",
             "self_training_rounds", "labelled"}


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
    unknown = sorted(set(plan) - PLAN_KEYS)
    if unknown:
        raise ValueError(f"{source}: unknown key(s) {unknown}; expected some of {sorted(PLAN_KEYS)}.")
    plan["name"] = str(plan.get("name") or os.path.splitext(os.path.basename(source))[0])
    experiment_dir = experiment_dir or plan.get("experiment_dir")
    if not experiment_dir:
        raise ValueError(f"{source}: experiment_dir is missing (give it in the plan or with --experiment_dir).")
    plan["experiment_dir"] = os.path.abspath(experiment_dir)
    plan["dataset"] = _normalise_dataset(plan.get("dataset"), plan["experiment_dir"], source)
    plan["protocol"] = _normalise_protocol(plan.get("protocol"), source)
    plan["env"] = {str(k): str(v) for k, v in (plan.get("env") or {}).items()}
    plan["seeds"] = [int(s) for s in plan.get("seeds", [0])]
    if not plan["seeds"]:
        raise ValueError(f"{source}: seeds is empty.")
    inits = plan.get("initialisations") or []
    if not inits:
        raise ValueError(f"{source}: initialisations is empty.")
    plan["initialisations"] = _normalise_initialisations(inits, source)
    names = {init["name"] for init in inits}
    plan["labelled"] = _normalise_labelled(plan.get("labelled"), source)
    plan["benchmark"] = _normalise_benchmark(plan.get("benchmark"), names, plan["seeds"], source)
    plan["selection"] = _normalise_selection(plan.get("selection"), {i["name"]: i for i in inits}, source)
    plan["comparisons"] = [[str(n) for n in pair] for pair in plan.get("comparisons") or []]
    bad = [pair for pair in plan["comparisons"] if len(pair) != 2 or not set(pair) <= names]
    if bad:
        raise ValueError(f"{source}: comparisons {bad}: each is [base, other], two initialisation names.")
    if not plan["labelled"] and not plan["benchmark"]:
        raise ValueError(f"{source}: nothing to fine-tune: give labelled subsets or a benchmark.")
    examples = dict(plan.get("examples") or {})
    default_sizes = [n for n in (1, 2) if n in plan["labelled"]]
    examples["num_labelled"] = [int(n) for n in examples.get("num_labelled", default_sizes)]
    examples["volumes"] = int(examples.get("volumes", 1))
    plan["examples"] = examples
    plan["estimate"] = {**DEFAULT_ESTIMATE, **{k: float(v) for k, v in (plan.get("estimate") or {}).items()}}
    try:   # every key and file name the runner takes from the bundle's configs is there (study.configs)
        check_runner_keys(plan["dataset"]["prepare"])
    except ValueError as error:
        raise ValueError(f"{source}: {error}") from None
    _check_datalist(plan, source)
    return plan


def _check_datalist(plan: dict, source: str) -> None:
    """Raise ValueError naming the datalist keys the plan's fine-tunings train on (its labelled subsets, the whole
    labelled pool for a benchmark) that an already prepared dataset lacks; a dataset the plan prepares is skipped."""
    if plan["dataset"]["prepare"]:
        return
    found = datalist_keys(plan["dataset"]["dataset_dir"])
    if found is None:
        return
    labelled = [plan["labelled"]] + [i["labelled"] for i in plan["initialisations"] if i["labelled"]]
    needed = [subset_key(size, index) for each in labelled for size, subsets in each.items() for index in subsets]
    needed += [all_labelled_key()] if plan["benchmark"] else []
    missing = sorted(set(needed) - found)
    if missing:
        raise ValueError(f"{source}: the datalist of {plan['dataset']['dataset_dir']} has no {missing}, which the "
                         "plan fine-tunes on: prepare the dataset with these subsets, or change labelled.")


def _normalise_dataset(dataset: dict | None, experiment_dir: str, source: str) -> dict:
    """The ``dataset`` section: ``prepare`` (a prepare.yaml run id or null), ``raw_dir``, ``seed``, ``overrides``
    and ``dataset_dir`` (default ``<experiment_dir>/data``), paths absolute."""
    dataset = dict(dataset or {})
    dataset.setdefault("prepare", None)
    dataset.setdefault("raw_dir", None)
    dataset.setdefault("seed", 0)
    dataset.setdefault("overrides", {})
    dataset["dataset_dir"] = os.path.abspath(dataset.get("dataset_dir") or os.path.join(experiment_dir, "data"))
    if dataset["raw_dir"]:
        dataset["raw_dir"] = os.path.abspath(dataset["raw_dir"])
    if dataset["prepare"] is not None and not str(dataset["prepare"]).startswith("prepare_"):
        raise ValueError(f"{source}: dataset.prepare must be a prepare.yaml run id (prepare_acdc, ...) or null, "
                         f"got {dataset['prepare']!r}.")
    if dataset["prepare"] not in (None, "prepare_synthetic") and not dataset["raw_dir"]:
        raise ValueError(f"{source}: dataset.raw_dir is needed by {dataset['prepare']}.")
    return dataset


def _normalise_protocol(protocol: dict | None, source: str) -> dict:
    """The ``protocol`` section: {stage of ``STAGES``: config overrides}, every stage present, none of ``RESERVED``."""
    protocol = dict(protocol or {})
    bad = sorted(set(protocol) - set(STAGES))
    if bad:
        raise ValueError(f"{source}: protocol has unknown stage(s) {bad}; expected some of {list(STAGES)}.")
    for stage in STAGES:
        protocol[stage] = dict(protocol.get(stage) or {})
        _refuse_reserved(protocol[stage], f"protocol.{stage}", source)
    return protocol


def _refuse_reserved(overrides: dict, where: str, source: str) -> None:
    """Raises ValueError when ``overrides`` (the plan's section ``where``) sets a key the runner sets per job."""
    reserved = sorted(set(overrides) & set(RESERVED))
    if reserved:
        raise ValueError(f"{source}: {where} sets {reserved}, which the runner sets for each job.")


def _normalise_initialisations(inits: list, source: str) -> list:
    """The ``initialisations`` list, each entry checked and completed in place (``_normalise_initialisation``);
    names must be unique."""
    names: set[str] = set()
    for init in inits:
        _normalise_initialisation(init, names, source)
        names.add(init["name"])
    return inits


def _normalise_initialisation(init: dict, names: set, source: str) -> None:
    """One initialisation, completed in place: ``name`` (not among ``names``), ``label``, ``global`` / ``local``
    strategies (null: none), ``checkpoint`` (weights trained elsewhere, absolute), ``pretrain`` overrides and
    ``finetune`` overrides (train.yaml, for this initialisation's fine-tunings, e.g. ``pretrained_decoder_blocks``
    or ``mixup_alpha``), ``configs`` (overlays after train.yaml for its fine-tunings, e.g. consistency.yaml) and
    ``self_training_rounds`` (0: none; ``study.jobs``) and ``labelled`` (its own labelled subsets instead of the
    plan's, e.g. for a screening; null: the plan's)."""
    name = str(init.get("name", ""))
    if not name or not all(c.isalnum() or c in "_.+-" for c in name) or name in names:
        raise ValueError(f"{source}: initialisation name {name!r} must be unique and made of letters, digits, _.+-")
    init["name"] = name
    init.setdefault("label", name)
    init.setdefault("global", None)
    init.setdefault("local", None)
    init.setdefault("checkpoint", None)
    init["pretrain"] = dict(init.get("pretrain") or {})
    init["finetune"] = dict(init.get("finetune") or {})
    _refuse_reserved(init["finetune"], f"initialisation {name}: finetune", source)
    init["configs"] = [str(c) for c in init.get("configs") or []]
    missing = [c for c in init["configs"] if not os.path.isfile(config_files(c)[0]) or c == "self_training.yaml"]
    if missing:
        raise ValueError(f"{source}: initialisation {name}: configs {missing} are not overlays in bundle/configs "
                         "(self-training is self_training_rounds).")
    init["labelled"] = None if init.get("labelled") is None else _normalise_labelled(init["labelled"], source)
    init["self_training_rounds"] = int(init.get("self_training_rounds") or 0)
    if init["self_training_rounds"] < 0:
        raise ValueError(f"{source}: initialisation {name}: self_training_rounds must be >= 0.")
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
    unknown = sorted(set(init) - INIT_KEYS)
    if unknown:
        raise ValueError(f"{source}: initialisation {name}: unknown key(s) {unknown}.")


def _normalise_labelled(labelled: dict | None, source: str) -> dict:
    """The ``labelled`` section: {|XL| (int >= 1): [subset indices]}, sorted by |XL|."""
    checked = {}
    for size, subsets in (labelled or {}).items():
        if int(size) < 1 or not subsets:
            raise ValueError(f"{source}: labelled: |XL| = {size} needs a size >= 1 and a list of subset indices.")
        checked[int(size)] = [int(i) for i in subsets]
    return dict(sorted(checked.items()))


def _normalise_benchmark(benchmark: dict | None, names: set, seeds: list, source: str) -> dict | None:
    """The ``benchmark`` section (fine-tuning on every labelled volume) or None: ``initialisations`` (default
    ["random"]; each among ``names``), ``seeds`` (default: the plan's) and ``finetune`` (train.yaml overrides merged
    over ``protocol.finetune`` for these runs only, e.g. a longer budget; default none)."""
    if not benchmark:
        return None
    benchmark = dict(benchmark)
    benchmark["initialisations"] = [str(n) for n in benchmark.get("initialisations", ["random"])]
    benchmark["seeds"] = [int(s) for s in benchmark.get("seeds", seeds)]
    benchmark["finetune"] = dict(benchmark.get("finetune") or {})
    _refuse_reserved(benchmark["finetune"], "benchmark.finetune", source)
    missing = sorted(set(benchmark["initialisations"]) - names)
    if missing:
        raise ValueError(f"{source}: benchmark names unknown initialisation(s) {missing}.")
    return benchmark or None


def default_selection_rule() -> str:
    """select.yaml's ``selection_rule``: the rule a plan's ``selection`` measures when it names none."""
    return str(read_configs(("train.yaml", "select.yaml")).get("selection_rule"))


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
    selection["rules"] = [str(r) for r in selection.get("rules", [default_selection_rule()])]
    bad = sorted(set(selection["rules"]) - set(SELECTION_RULES))
    selection["num_labelled"] = [int(n) for n in selection.get("num_labelled", [])]
    if bad or not selection["rules"] or not selection["num_labelled"] or min(selection["num_labelled"]) < 1:
        raise ValueError(f"{source}: selection needs rules among {SELECTION_RULES} and num_labelled sizes >= 1.")
    selection["initialisations"] = [str(n) for n in selection.get("initialisations", list(inits))]
    missing = sorted(set(selection["initialisations"]) - set(inits))
    if missing:
        raise ValueError(f"{source}: selection names unknown initialisation(s) {missing}.")
    return selection
