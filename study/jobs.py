"""A checked plan (``study.plan``) as the ordered list of jobs the runner runs, each a list of
``python -m monai.bundle run`` commands.

Job ids and kinds (the ``kind`` names the ledger a job's line goes to, ``study.ledger``):

- ``prepare``: the plan's prepare run id (once per experiment folder).
- ``global-<strategy>-seed<s>``: ``pretrain_global``, shared by every initialisation with that global strategy and
  seed; ``global-<g>-local-<l>-seed<s>``: ``pretrain_local`` from that global checkpoint. Initialisations with their
  own ``pretrain`` overrides get a short hash of them before ``-seed``.
- ``select-<rule>-xl<n>-seed<s>``: ``select`` (n volumes chosen by the rule, written as a datalist key).
- ``<init>-xl<n>-subset<i>-seed<s>``, ``<init>-xl<n>-<rule>-seed<s>`` and ``<init>-xlall-seed<s>``: fine-tuning
  then evaluation (kind ``finetune``).

The order: preparation, every global stage, every local stage, fine-tunings round by round (subset i of every |XL|
for every initialisation), the selections each followed by its fine-tunings, then the benchmark.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass, field

from study.configs import all_labelled_key, config_files, stage_outputs, subset_key
from study.ledger import RESULTS, STAGES_FILE


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
    files = config_files(*configs)   # several files: a list, merged in order by MONAI
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


def _outputs(stage: str, jid: str) -> dict:
    """The files of pre-training job ``jid`` of ``stage`` that the runner and the report read, relative to the
    experiment folder: "checkpoint", "log_dir" and the TensorBoard "tag" (``study.configs.stage_outputs``: the job's
    ``model_dir`` and ``output_dir`` are its folder's ``models`` and ``eval``)."""
    outputs = stage_outputs(stage)
    return {"checkpoint": os.path.join("pretraining", jid, outputs["checkpoint"]),
            "log_dir": os.path.join("pretraining", jid, outputs["log_dir"]), "tag": outputs["tag"]}


def recipe(init: dict) -> dict:
    """An initialisation's recipe in the results: the global and local strategies (null: none), or for weights
    trained elsewhere {"global": "checkpoint", "local": null, "checkpoint": path} (never taken for random init)."""
    if init["checkpoint"] is not None:
        return {"global": "checkpoint", "local": None, "checkpoint": init["checkpoint"]}
    return {"global": init["global"], "local": init["local"]}


def build_jobs(plan: dict) -> list[Job]:
    """The plan as an ordered list of jobs: preparation, pre-trainings, then fine-tunings round by round.

    Raises ValueError when two jobs would get the same id (a repeated subset or seed)."""
    builder = _JobBuilder(plan)
    inits = plan["initialisations"]
    for seed in plan["seeds"]:
        for init in inits:
            builder.pretraining(init, seed)
    if plan["benchmark"]:
        for seed in plan["benchmark"]["seeds"]:
            for init in inits:
                if init["name"] in plan["benchmark"]["initialisations"]:
                    builder.pretraining(init, seed)
    jobs = builder.prepare()
    jobs += sorted(builder.pretrainings.values(), key=lambda j: j.kind == "local")  # all global stages, then local
    labelled = {init["name"]: plan["labelled"] if init["labelled"] is None else init["labelled"] for init in inits}
    rounds = max((len(s) for per_init in labelled.values() for s in per_init.values()), default=0)
    sizes = sorted({size for per_init in labelled.values() for size in per_init})
    for seed in plan["seeds"]:
        for r in range(rounds):
            for size in sizes:
                jobs += [builder.finetune(init, seed, size, labelled[init["name"]][size][r]) for init in inits
                         if r < len(labelled[init["name"]].get(size, ()))]
    if plan["selection"]:   # after the random subsets: the selections are compared with them
        selection = plan["selection"]
        for seed in plan["seeds"]:
            for size in selection["num_labelled"]:
                for rule in selection["rules"]:
                    chosen = builder.select(rule, size, seed)
                    jobs.append(chosen)
                    jobs += [builder.finetune(builder.by_name[name], seed, size, None, chosen)
                             for name in selection["initialisations"]]
    if plan["benchmark"]:
        for seed in plan["benchmark"]["seeds"]:
            jobs += [builder.finetune(init, seed, None, None) for init in inits
                     if init["name"] in plan["benchmark"]["initialisations"]]
    ids = [j.id for j in jobs]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ValueError(f"the plan gives the same job twice: {duplicates} (a repeated subset or seed?).")
    return jobs


def _method_steps(init: dict, train: dict, evaluate: dict, output_dir: str) -> list:
    """The steps of one fine-tuning job of ``init``: fine-tune with the initialisation's overlay ``configs`` (e.g.
    consistency.yaml) after train.yaml, then for each self-training round r = 1..R (``self_training_rounds``) label
    the unlabelled pool with the last model (run id ``pseudo_label``) and fine-tune again on labelled +
    pseudo-labelled volumes (self_training.yaml, ``--pseudo_round r``), then evaluate the last model on the test
    split. Every fine-tuning but the last logs its validations under ``<output_dir>/round_<r>``, so that
    ``<output_dir>`` holds the validations of the model that is evaluated."""
    configs, rounds = ["train.yaml", *init["configs"]], init["self_training_rounds"]
    if not rounds:
        return [("finetune", bundle_command("run", configs, train)),
                ("evaluate", bundle_command("run", [*configs, "evaluate.yaml"], evaluate))]
    steps = [("finetune", bundle_command("run", configs, {**train, "output_dir": os.path.join(output_dir, "round_0")}))]
    self_training = [*configs, "self_training.yaml"]
    for r in range(1, rounds + 1):
        last = {} if r == rounds else {"output_dir": os.path.join(output_dir, f"round_{r}")}
        label = bundle_command("pseudo_label", self_training, {**train, "pseudo_round": r})
        steps += [(f"pseudo_label_round{r}", label),
                  (f"finetune_round{r}", bundle_command("run", self_training, {**train, "pseudo_round": r, **last}))]
    steps.append(("evaluate", bundle_command("run", [*self_training, "evaluate.yaml"],
                                             {**evaluate, "pseudo_round": rounds})))
    return steps


class _JobBuilder:
    """Makes the jobs of one plan; pre-training jobs are made once per id and shared (``pretrainings``)."""

    def __init__(self, plan: dict):
        self.plan = plan
        self.exp, self.data, self.protocol = plan["experiment_dir"], plan["dataset"], plan["protocol"]
        self.paths = {"dataset_dir": self.data["dataset_dir"]}
        self.needs_prepare = ("prepare",) if self.data["prepare"] else ()
        self.pretrainings: dict[str, Job] = {}
        self.by_name = {init["name"]: init for init in plan["initialisations"]}
        protocol = self.protocol
        self.pretrain = {**protocol["common"], **protocol["pretrain"]}
        self.finetune_overrides = {**protocol["common"], **protocol["finetune"]}
        self.evaluate_overrides = {**protocol["common"], **protocol["evaluate"]}

    def prepare(self) -> list[Job]:
        """[the preparation job], or [] when the plan names an already prepared dataset."""
        data, protocol = self.data, self.protocol
        if not data["prepare"]:
            return []
        overrides = {**protocol["common"], **protocol["prepare"], **data["overrides"], "seed": data["seed"]}
        if data["raw_dir"]:
            overrides["raw_dir"] = data["raw_dir"]
        folder = os.path.join(self.exp, "prepare")
        return [Job("prepare", "prepare", folder,
                    [(data["prepare"], bundle_command(data["prepare"], ["train.yaml", "prepare.yaml"],
                                                      {**self.paths, **overrides}))],
                    config={"run_id": data["prepare"], "raw_dir": data["raw_dir"], "overrides": overrides})]

    def pretraining(self, init: dict, seed: int) -> Job | None:
        """The last pre-training job of ``init`` at ``seed`` (its local stage, else its global one; made on first
        use), or None for an initialisation without pre-training."""
        if init["global"] is None:
            return None
        gid = f"global-{init['global']}{_tag(init['pretrain'])}-seed{seed}"
        if gid not in self.pretrainings:
            self.pretrainings[gid] = self._global_job(gid, init, seed)
        if init["local"] is None:
            return self.pretrainings[gid]
        lid = f"global-{init['global']}-local-{init['local']}{_tag(init['pretrain'])}-seed{seed}"
        if lid not in self.pretrainings:
            self.pretrainings[lid] = self._local_job(lid, self.pretrainings[gid], init, seed)
        return self.pretrainings[lid]

    def _global_job(self, gid: str, init: dict, seed: int) -> Job:
        extra, pretrain = init["pretrain"], self.pretrain
        folder = os.path.join(self.exp, "pretraining", gid)
        overrides = {**self.paths, **pretrain, **extra, "model_dir": os.path.join(folder, "models"),
                     "output_dir": os.path.join(folder, "eval"), "seed": seed, "global#strategy": init["global"]}
        return Job(
            gid, "global", folder,
            [("pretrain_global", bundle_command("pretrain_global", ["train.yaml", "pretrain.yaml"], overrides))],
            config={"strategy": init["global"], "seed": seed, "overrides": {**pretrain, **extra}},
            info={"strategy": init["global"], "seed": seed, **_outputs("global", gid)},
            needs=self.needs_prepare)

    def _local_job(self, lid: str, global_job: Job, init: dict, seed: int) -> Job:
        extra, pretrain, gid = init["pretrain"], self.pretrain, global_job.id
        folder = os.path.join(self.exp, "pretraining", lid)
        global_checkpoint = os.path.join(self.exp, global_job.info["checkpoint"])
        overrides = {**self.paths, **pretrain, **extra, "model_dir": os.path.join(folder, "models"),
                     "output_dir": os.path.join(folder, "eval"), "seed": seed, "local#strategy": init["local"],
                     "local#global_checkpoint": global_checkpoint}
        return Job(
            lid, "local", folder,
            [("pretrain_local", bundle_command("pretrain_local", ["train.yaml", "pretrain.yaml"], overrides))],
            config={"global": gid, "strategy": init["local"], "seed": seed, "overrides": {**pretrain, **extra}},
            info={"strategy": init["local"], "global": gid, "seed": seed, **_outputs("local", lid)},
            needs=self.needs_prepare + (gid,))

    def _start(self, init: dict, source: Job | None) -> dict:
        """The overrides that set where a fine-tuning's weights start from."""
        if init["checkpoint"] is not None:   # encoder + decoder blocks 1..l of the given checkpoint
            return {"pretrained_checkpoint": init["checkpoint"]}
        if source is None:
            return {"use_pretrained": False}
        if source.kind == "global":   # encoder only: the decoder starts from random initialisation
            return {"pretrained_checkpoint": os.path.join(self.exp, source.info["checkpoint"]),
                    "pretrained_decoder_blocks": 0}
        return {"pretrained_checkpoint": os.path.join(self.exp, source.info["checkpoint"])}

    def finetune(self, init: dict, seed: int, size: int | None, subset: int | None,
                 chosen: Job | None = None) -> Job:
        """Fine-tuning + evaluation of ``init`` at ``seed`` on the volumes a select job ``chosen`` chose, on
        labelled subset ``subset`` of |XL| = ``size``, or (both None) on every labelled volume."""
        source = self.pretraining(init, seed)
        if chosen is not None:   # the volumes a select job chose
            rule = chosen.info["selection"]
            jid, selection = f"{init['name']}-xl{size}-{rule}-seed{seed}", {"train_key": chosen.info["key"]}
        elif size is None:
            jid, selection = f"{init['name']}-xlall-seed{seed}", {"train_key": all_labelled_key()}
        else:
            jid = f"{init['name']}-xl{size}-subset{subset}-seed{seed}"
            selection = {"num_labelled": size, "subset": subset}
        folder = os.path.join(self.exp, "runs", jid)
        run_paths = {**self.paths, "model_dir": os.path.join(folder, "models"),
                     "output_dir": os.path.join(folder, "eval")}
        start = self._start(init, source)
        finetune, evaluate = self.finetune_overrides, self.evaluate_overrides
        if size is None and chosen is None:   # the all-labels benchmark: its own budget, when the plan gives one
            finetune = {**finetune, **self.plan["benchmark"]["finetune"]}
        finetune = {**finetune, **init["finetune"]}   # this initialisation's own overrides (usually none), recorded
        # in the job's config; given again after ``start`` so that they also win over what the runner derives there
        train_overrides = {**run_paths, **finetune, "seed": seed, **selection, **start, **init["finetune"]}
        init_config = {k: init[k] for k in ("global", "local", "pretrain")}
        if init["configs"] or init["self_training_rounds"]:   # only then: earlier studies' configurations unchanged
            init_config.update(configs=init["configs"], self_training_rounds=init["self_training_rounds"])
        if init["checkpoint"] is not None:   # only then: the configurations of earlier studies stay the same
            init_config["checkpoint"] = init["checkpoint"]
        steps = _method_steps(init, train_overrides, {**run_paths, **evaluate}, run_paths["output_dir"])
        return Job(
            jid, "finetune", folder, steps,
            config={"init": init_config, "seed": seed, **selection,
                    "finetune": finetune, "evaluate": evaluate,
                    "start": {k: v for k, v in start.items() if k != "pretrained_checkpoint"},
                    "pretraining": source.id if source else None},
            info={"init": init["name"], "label": init["label"], "recipe": recipe(init),
                  "seed": seed, "num_labelled": size if size is not None else "all",
                  "subset": chosen.info["selection"] if chosen else subset,
                  "train_key": selection.get("train_key") or subset_key(size, subset),
                  "pretraining": source.id if source else None,
                  "model_dir": os.path.join("runs", jid, "models"), "output_dir": os.path.join("runs", jid, "eval"),
                  **({"selection": chosen.info["selection"]} if chosen else {})},
            needs=self.needs_prepare + ((source.id,) if source else ()) + ((chosen.id,) if chosen else ()))

    def select(self, rule: str, size: int, seed: int) -> Job:
        """The job choosing ``size`` volumes by ``rule`` with the encoder of the plan's ``selection.pretraining``."""
        protocol = self.protocol
        encoder = self.pretraining(self.by_name[self.plan["selection"]["pretraining"]], seed)
        jid, key = f"select-{rule}-xl{size}-seed{seed}", f"selected_{rule}_{size}_seed{seed}"
        folder = os.path.join(self.exp, "selection", jid)
        overrides = {**self.paths, **protocol["common"], **protocol["select"],
                     "model_dir": os.path.join(folder, "models"), "output_dir": os.path.join(folder, "eval"),
                     "seed": seed, "num_labelled": size, "selection_rule": rule, "selection_key": key,
                     "selection_pool": all_labelled_key(),   # a study fine-tunes on what it chose: labelled volumes
                     "pretrained_checkpoint": os.path.join(self.exp, encoder.info["checkpoint"])}
        return Job(jid, "select", folder,
                   [("select", bundle_command("select", ["train.yaml", "select.yaml"], overrides))],
                   config={"rule": rule, "num_labelled": size, "seed": seed, "pretraining": encoder.id,
                           "overrides": {**protocol["common"], **protocol["select"]}},
                   info={"selection": rule, "num_labelled": size, "seed": seed, "key": key,
                         "csv": os.path.join("selection", jid, "eval", f"{key}.csv")},
                   needs=self.needs_prepare + (encoder.id,))
