"""The bundle's configs as the study tools see them: where they are, the one way to parse them, and what the runner
takes from them instead of writing it again.

- ``CONFIGS`` (bundle/configs), ``config_files(*names)`` (their paths) and ``read_configs(names, overrides)``: a
  ``monai.bundle.ConfigParser`` holding the configs merged in order, ``overrides`` set, nothing instantiated.
- ``stage_outputs(stage)``: the final checkpoint, TensorBoard folder and tag of a pre-training stage, read from the
  handlers of its block in pretrain.yaml; ``subset_key(size, index)``: the datalist key of a labelled subset
  (train.yaml's ``train_key``); ``all_labelled_key()``: the key of the whole labelled training pool (``scripts.data``'s
  split writes it); ``datalist_keys(dataset_dir)``: the keys of a prepared dataset's datalist.
- ``check_runner_keys(prepare)``: every run id and key the runner runs or sets (``RUN_IDS``, ``RUNNER_KEYS``; a
  plan may set none of ``RESERVED``) is in the configs. ``study.plan.load_plan`` calls it (and the functions above),
  so a key or file name renamed in the configs stops a plan when it is loaded, with one line naming the config and
  what is missing, not hours into the study.
"""

from __future__ import annotations

import functools
import json
import os

from monai.bundle import ConfigParser

__all__ = ["BUNDLE_DIR", "CONFIGS", "RUN_IDS", "RUNNER_KEYS", "RESERVED", "config_files", "read_configs",
           "stage_outputs", "subset_key", "all_labelled_key", "datalist_keys", "reset", "check_runner_keys"]

BUNDLE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bundle")
CONFIGS = os.path.join(BUNDLE_DIR, "configs")

# the run id and the keys the runner (study.jobs) runs and sets for each job, by the configs it runs them with
RUN_IDS = {
    ("train.yaml", "pretrain.yaml"): ("pretrain_global", "pretrain_local"),
    ("train.yaml", "select.yaml"): ("select",),
    ("train.yaml",): ("run",),
    ("train.yaml", "evaluate.yaml"): ("run",),
    ("train.yaml", "self_training.yaml"): ("pseudo_label", "run"),
}
RUNNER_KEYS = {
    ("train.yaml", "prepare.yaml"): ("dataset_dir", "raw_dir", "seed"),
    ("train.yaml", "pretrain.yaml"): ("dataset_dir", "model_dir", "output_dir", "seed", "global#strategy",
                                      "local#strategy", "local#global_checkpoint"),
    ("train.yaml", "select.yaml"): ("dataset_dir", "model_dir", "output_dir", "seed", "num_labelled",
                                    "selection_rule", "selection_key", "selection_pool", "pretrained_checkpoint"),
    ("train.yaml",): ("dataset_dir", "model_dir", "output_dir", "seed", "num_labelled", "subset", "train_key",
                      "use_pretrained", "pretrained_checkpoint", "pretrained_decoder_blocks"),
    ("train.yaml", "evaluate.yaml"): ("dataset_dir", "model_dir", "output_dir", "checkpoint"),   # checkpoint: default
    ("train.yaml", "self_training.yaml"): ("pseudo_round",),
}
PLAN_MAY_SET = ("pretrained_decoder_blocks",)   # a runner key an initialisation's finetune may override
# the keys a plan's protocol may not set: the runner sets them for each job
RESERVED = tuple(sorted({key for keys in RUNNER_KEYS.values() for key in keys} - set(PLAN_MAY_SET)))
_ABSENT = object()


def config_files(*names: str) -> list[str]:
    """The paths of the configs ``names`` (e.g. "train.yaml") in ``CONFIGS``."""
    return [os.path.join(CONFIGS, name) for name in names]


def read_configs(names, overrides: dict | None = None) -> ConfigParser:
    """A ``ConfigParser`` holding the configs ``names`` (merged in order, as ``monai.bundle run`` merges its
    ``--config_file`` list) with ``overrides`` ({id: value}) set; nothing is instantiated."""
    parser = ConfigParser()
    parser.read_config(config_files(*names))
    parser.update(dict(overrides or {}))
    return parser


@functools.lru_cache(maxsize=None)
def _pretrain() -> ConfigParser:
    return read_configs(("train.yaml", "pretrain.yaml"), {"output_dir": "eval"})


@functools.lru_cache(maxsize=None)
def _train() -> ConfigParser:
    return read_configs(("train.yaml",))


def _missing(what: str) -> ValueError:
    return ValueError(f"the bundle's configs have no {what}, which the study runner uses (study/configs.py): "
                      "restore it, or rename it there too.")


def _handler(stage: str, target: str) -> tuple[int, dict]:
    """(index, raw config) of the one handler of pretrain.yaml's ``<stage>#handlers`` whose ``_target_`` ends with
    ``target``."""
    handlers = _pretrain().get(f"{stage}#handlers")
    found = [(i, h) for i, h in enumerate(handlers or []) if isinstance(h, dict)
             and str(h.get("_target_", "")).split(".")[-1] == target]
    if len(found) != 1:
        raise _missing(f"single {target} in pretrain.yaml's {stage}#handlers")
    return found[0]


@functools.lru_cache(maxsize=None)
def stage_outputs(stage: str) -> dict:
    """What the pre-training stage ``stage`` ("global" or "local") writes that the runner reads back, as paths
    relative to the run's folder (whose ``model_dir`` is ``models``, ``output_dir`` ``eval``): {"checkpoint":
    "models/pretrained_<stage>.pt", "log_dir": "eval/pretrain_<stage>", "tag": TensorBoard tag of the loss}."""
    _, saver = _handler(stage, "CheckpointSaver")
    if not saver.get("final_filename"):
        raise _missing(f"final_filename of the CheckpointSaver in pretrain.yaml's {stage}#handlers")
    index, board = _handler(stage, "TensorBoardStatsHandler")
    if not board.get("tag_name"):
        raise _missing(f"tag_name of the TensorBoardStatsHandler in pretrain.yaml's {stage}#handlers")
    log_dir = _pretrain().get_parsed_content(f"{stage}#handlers#{index}#log_dir")
    return {"checkpoint": os.path.join("models", saver["final_filename"]), "log_dir": os.path.normpath(log_dir),
            "tag": str(board.get("tag_name"))}


def subset_key(size: int, index: int) -> str:
    """The datalist key train.yaml's ``train_key`` gives labelled subset ``index`` of |XL| = ``size``."""
    parser = _train()
    parser.update({"num_labelled": int(size), "subset": int(index)})
    return str(parser.get_parsed_content("train_key"))


def all_labelled_key() -> str:
    """The datalist key of the whole labelled training pool, as the split writes it (``scripts.data.ALL_LABELLED``):
    the benchmark fine-tunes on it and a selection study chooses among it."""
    from scripts.data import ALL_LABELLED

    return ALL_LABELLED


def datalist_keys(dataset_dir: str) -> set | None:
    """The keys of the datalist train.yaml reads for the dataset in ``dataset_dir`` (its ``datalist_file``), or None
    when that file does not exist yet (a plan that prepares its dataset)."""
    path = read_configs(("train.yaml",), {"dataset_dir": dataset_dir}).get_parsed_content("datalist_file")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return set(json.load(f))


def reset() -> None:
    """Forget what was read from the configs (after ``CONFIGS`` changed, e.g. in a test)."""
    for cached in (_pretrain, _train, stage_outputs):
        cached.cache_clear()


def check_runner_keys(prepare: str | None = None) -> None:
    """Raise a one-line ValueError naming the first run id or key of ``RUN_IDS`` and ``RUNNER_KEYS`` (and the run id
    ``prepare``, when given) that the configs lack; also reads every name above once, so that they fail here."""
    checks = {names: RUN_IDS.get(names, ()) + keys for names, keys in RUNNER_KEYS.items()}
    if prepare:
        checks[("train.yaml", "prepare.yaml")] = (*checks[("train.yaml", "prepare.yaml")], prepare)
    for names, keys in checks.items():
        parser = read_configs(names)
        for key in keys:
            if parser.get(key, default=_ABSENT) is _ABSENT:
                raise _missing(f"'{key}' in {' + '.join(names)}")
    for stage in ("global", "local"):
        stage_outputs(stage)
    subset_key(1, 0)
    all_labelled_key()
