"""The docs state each fact once, quote reports faithfully, and follow the bundle's version.

- README fits a screenful of reading (at most 100 lines of at most 120 characters) and the model card 200 lines, in
  the model zoo's section order;
- the version rule: ``metadata.json``'s version is the newest entry of its changelog (the one changelog), and the
  defaults of the configs equal the snapshot recorded for that version below: changing a default without
  ``make version`` fails here;
- a figure quoted next to a generated report (``docs/study/<name>/results.md``) in README, the model card or
  docs/*.md must occur in that report;
- named quantities (venv sizes, test counts, versions of the bundle, MONAI, MONAI Label, torch) have one value
  across README, docs/*.md and the model card.
Each checker is also fed a wrong text, so that a checker that finds nothing cannot pass silently.
"""

from __future__ import annotations

import glob
import json
import os
import re

import pytest
from monai.bundle import ConfigParser

from conftest import BUNDLE, ROOT

CARD = "bundle/docs/README.md"
USER_DOCS = ["README.md", *sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md"))),
             CARD]   # docs/study/ is history: its pages keep the versions and figures of their time
ZOO_SECTIONS = ["Model Overview", "Data", "Training configuration", "Input / Output", "Performance",
                "MONAI Bundle Commands", "Limitations", "References", "License"]   # the model zoo's card order

# The defaults of this version. A change of any of them is a new version: `make version VERSION=minor CHANGE="..."`,
# then record the new values here under the new version number.
DEFAULTS_VERSION = "0.12.0"
DEFAULTS = {
    "image_size": 64, "spacing": 3.0, "slice_axis": "auto", "placeholder_spacing": 1.5,
    "split#num_validation": 2, "split#num_test": 20, "split#subset_sizes": [1, 2, 8], "split#num_subsets": [5, 5, 3],
    "folder#split#num_validation": 1, "folder#split#num_test": 0, "folder#split#subset_sizes": [],
    "folder#split#keep_roles": True, "folder#allow_unlabelled": True,
    "seed": 0, "num_partitions": 4, "num_views": 2, "pretrain_epoch_length": 100,
    "global#strategy": "domain", "global#temperature": 0.2, "global#hidden_features": 1024,
    "global#embedding_features": 128, "global#head_norm": "none", "global#head_init": "he_normal",
    "global#volumes_per_batch": 4, "global#max_iterations": 2000, "global#stop_on_plateau": True,
    "global#min_iterations": 300, "global#patience": 300, "global#min_delta": 0.02, "global#learning_rate": 0.003,
    "global#warmup_iterations": 200, "global#lr_decay": "none", "global#crop_area": 0.27,
    "global#crop_area_start": 1.0, "global#crop_ramp_iterations": 400,
    "local#strategy": "random", "local#temperature": 0.1, "local#region_size": 3, "local#region_mode": "dense",
    "local#num_regions": 13, "local#volumes_per_batch": 3, "local#max_iterations": 400, "local#stop_on_plateau": True,
    "local#min_iterations": 100, "local#patience": 100, "local#min_delta": 0.02, "local#learning_rate": 0.001,
    "encoder_channels": [16, 32, 64, 128, 128, 128], "decoder_channels": [128, 128, 64, 32, 16],
    "num_labelled": 2, "subset": 0, "pretrained_decoder_blocks": 3, "learning_rate": 0.001, "batch_size": 10,
    "iterations_per_epoch": 50, "max_epochs": 12, "val_interval": 1, "dice_weight": 1.0, "ce_weight": 1.0,
    "elastic_magnitude": [0.0, 2.0], "num_workers": 0, "amp": False, "lr_decay_power": 0.0, "ema_decay": 0.0,
    "selection_rule": "kcenter", "selection_pool": "unlabelled", "selection_partitions": 4,
}
CONFIGS = ["train.yaml", "prepare.yaml", "pretrain.yaml", "select.yaml"]


def read(doc: str) -> str:
    return open(os.path.join(ROOT, doc), encoding="utf-8").read()


def metadata() -> dict:
    return json.load(open(os.path.join(BUNDLE, "configs", "metadata.json"), encoding="utf-8"))


def without_code(text: str) -> str:
    """The text with fenced code blocks blanked (line numbers kept)."""
    return re.sub(r"```.*?```", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.S)


# ---------------------------------------------------------------- size and order
def test_readme_is_short_and_narrow():
    lines = read("README.md").splitlines()
    assert len(lines) <= 100, f"README.md: {len(lines)} lines, at most 100"
    wide = [(n, len(line)) for n, line in enumerate(lines, 1) if len(line) > 120]
    assert not wide, f"README.md: lines over 120 characters (line, length): {wide}"


def test_model_card_is_short_and_in_the_zoo_order():
    text = read(CARD)
    assert len(text.splitlines()) <= 200, f"{CARD}: {len(text.splitlines())} lines, at most 200"
    sections = re.findall(r"^## (.+?)\s*$", without_code(text), flags=re.M)
    assert sections == ZOO_SECTIONS, f"{CARD}: sections {sections}, the zoo's order is {ZOO_SECTIONS}"


# ---------------------------------------------------------------- the version rule
def version_problems(meta: dict) -> list[str]:
    """What breaks the version rule in ``meta`` (metadata.json's content); empty: nothing."""
    version, changelog = meta.get("version"), meta.get("changelog") or {}
    keys = list(changelog)
    problems = [] if version in changelog else [f"version {version} has no changelog entry"]
    if keys and keys[0] != version:
        problems.append(f"the newest changelog entry is {keys[0]}, not the version {version}")
    numbers = [tuple(map(int, k.split("."))) for k in keys]
    if numbers != sorted(numbers, reverse=True) or len(set(numbers)) != len(numbers):
        problems.append(f"changelog versions are not strictly newest first: {keys}")
    return problems


def test_the_version_has_its_changelog_entry():
    assert not version_problems(metadata())


def test_the_version_check_catches_a_missing_entry():
    meta = {"version": "0.9.0", "changelog": {"0.8.0": "x", "0.9.0": "y"}}
    assert version_problems(meta)
    assert version_problems({"version": "1.0.0", "changelog": {"0.9.0": "y"}})
    assert not version_problems({"version": "0.9.0", "changelog": {"0.9.0": "y", "0.8.0": "x"}})


def current_defaults() -> dict:
    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / name) for name in CONFIGS])
    return {key: parser.get_parsed_content(key) for key in DEFAULTS}


def test_defaults_change_only_with_the_version():
    """A default changed without a new version (and a new snapshot above) fails, naming what moved."""
    version = metadata()["version"]
    assert version == DEFAULTS_VERSION, (
        f"metadata.json is at {version} but this test's DEFAULTS snapshot belongs to {DEFAULTS_VERSION}: record the "
        "defaults of the new version in DEFAULTS and DEFAULTS_VERSION")
    current = current_defaults()
    moved = {k: (DEFAULTS[k], current[k]) for k in DEFAULTS if current[k] != DEFAULTS[k]}
    assert not moved, (f"defaults changed without a new version (snapshot, now): {moved}; run `make version "
                       "VERSION=minor CHANGE=\"...\"` and record the new defaults in DEFAULTS")


# ---------------------------------------------------------------- figures quoted from reports
REPORT = re.compile(r"(?:docs/)?study/(\w+)/results\.md")
FIGURE = re.compile(r"(?<![\w.])([+\-−]?\d+\.\d{3})(?![\d.])")


def _figures(text: str) -> set[str]:
    found = set()
    for figure in FIGURE.findall(text):
        figure = figure.replace("−", "-")
        found |= {figure, figure.lstrip("+-")} if figure[0] in "+-" else {figure}
    return found


def _references(text: str, labels: dict[str, str]) -> set[str]:
    names = set(REPORT.findall(text))
    for label in re.findall(r"\]\[([^\]]+)\]", text):
        names |= set(REPORT.findall(labels.get(label, "")))
    return names


def quoted_figures(text: str) -> list[tuple[int, str, set[str]]]:
    """(line, figure, reports named) for every 3-decimal figure of a paragraph or table row that names a report.
    A table without report names takes those of a caption right below it that starts with "Report"."""
    text = without_code(text)
    labels = dict(re.findall(r"^\[([^\]]+)\]:\s*(\S+)", text, flags=re.M))
    lines = text.splitlines()
    blocks, start = [], 0
    for number, line in enumerate(lines + [""]):
        if not line.strip():
            if number > start:
                blocks.append((start, lines[start:number]))
            start = number + 1
    quoted = []
    for index, (first, block) in enumerate(blocks):
        names = _references("\n".join(block), labels)
        caption = blocks[index + 1][1] if index + 1 < len(blocks) else []
        if not names and caption and caption[0].startswith("Report"):
            names = _references("\n".join(caption), labels)
        units = [(first + i, [row]) for i, row in enumerate(block)] if block[0].startswith("|") else [(first, block)]
        for line, unit in units:
            own = _references("\n".join(unit), labels) or names
            if own:
                quoted += [(line + 1, f, own) for f in FIGURE.findall("\n".join(unit))]
    return quoted


def figure_problems(doc: str, text: str) -> list[str]:
    problems = []
    for line, figure, names in quoted_figures(text):
        reports = [os.path.join(ROOT, "docs", "study", name, "results.md") for name in sorted(names)]
        missing = [r for r in reports if not os.path.isfile(r)]
        if missing:
            problems.append(f"{doc}:{line}: no report {missing}")
            continue
        if figure.replace("−", "-") not in set().union(*(_figures(read(r)) for r in reports)):
            problems.append(f"{doc}:{line}: {figure} is not in {sorted(names)}'s report")
    return problems


@pytest.mark.parametrize("doc", USER_DOCS)
def test_figures_quoted_from_a_report_equal_it(doc):
    assert not figure_problems(doc, read(doc))


def test_the_figure_check_catches_a_wrong_figure():
    assert quoted_figures(read("README.md")), "README.md quotes no report: the check would pass on nothing"
    good = "| 1 | +0.179 ± 0.043 (5/5) | [report](study/selection_acdc/results.md) |\n"
    assert not figure_problems("x", good)
    assert figure_problems("x", good.replace("+0.179", "+0.237"))
    table = "| a | 0.578 |\n|---|---|\n| b | 0.999 |\n\nReport: docs/study/selection_acdc/results.md.\n"
    assert figure_problems("x", table) == ["x:3: 0.999 is not in ['selection_acdc']'s report"]


# ---------------------------------------------------------------- one value per named quantity
def _makefile_torch() -> str:
    return re.search(r"ML_TORCH\s*:=\s*torch==(\S+)", read("Makefile")).group(1)


def quantities() -> dict[str, tuple[list[re.Pattern], object]]:
    """name -> (patterns whose first group is the value, the value it must have or None: all equal)."""
    meta = metadata()
    return {
        ".venv-monailabel size": ([re.compile(r"\.venv-monailabel`?[^\n.]{0,30}?(\d+(?:\.\d+)?) ?GB"),
                                   re.compile(r"(\d+(?:\.\d+)?) ?GB (?:venv|of the venv)")], None),
        ".venv size": ([re.compile(r"`\.venv`:? (\d+(?:\.\d+)?) ?GB")], None),
        "test count": ([re.compile(r"\b(\d+) (?:tests|passed)\b")], None),
        "bundle version": ([re.compile(r"\b(?:bundle|version) v?(\d+\.\d+\.\d+)"),
                            re.compile(r"[_/]v(\d+\.\d+\.\d+)")], meta["version"]),
        "MONAI version": ([re.compile(r"\b(?:monai|MONAI)(?:==| )(\d+\.\d+\.\d+)")], meta["monai_version"]),
        "MONAI Label version": ([re.compile(r"\bmonailabel(?:==| )(\d+\.\d+\.\d+)")],
                                meta["supported_apps"]["monai-label"]),
        "torch version (.venv)": ([re.compile(r"\btorch(?:==| )(\d+\.\d+\.\d+)")], meta["pytorch_version"]),
        "torch version (.venv-monailabel)": ([re.compile(r"\btorch(?:==| )(\d+\.\d+\.\d+)")], _makefile_torch()),
    }


def stated_values(texts: dict[str, str]) -> dict[str, dict[str, set[str]]]:
    """quantity -> {value: docs stating it}; torch's two venvs are told apart by the doc (monailabel.md: its own)."""
    found: dict[str, dict[str, set[str]]] = {}
    for name, (patterns, _) in quantities().items():
        for doc, text in texts.items():
            if name.startswith("torch") and ("monailabel" in doc) != name.endswith("(.venv-monailabel)"):
                continue
            for pattern in patterns:
                for value in pattern.findall(text):
                    found.setdefault(name, {}).setdefault(value, set()).add(doc)
    return found


def quantity_problems(texts: dict[str, str]) -> list[str]:
    problems = []
    for name, values in stated_values(texts).items():
        expected = quantities()[name][1]
        if expected is not None and set(values) - {expected}:
            problems.append(f"{name}: {expected} expected, the docs also say {values}")
        elif expected is None and len(values) > 1:
            problems.append(f"{name}: the docs disagree: {values}")
    return problems


def test_named_quantities_have_one_value_across_the_docs():
    texts = {doc: read(doc) for doc in USER_DOCS}
    assert not quantity_problems(texts)
    stated = stated_values(texts)
    assert {".venv-monailabel size", "MONAI version", "MONAI Label version"} <= set(stated), stated


def test_the_quantity_check_catches_disagreements():
    """The contradictions the docs once held: two venv sizes, a stale test count, example versions."""
    version = metadata()["version"]
    assert quantity_problems({"README.md": "`.venv-monailabel` 8.2 GB", "docs/monailabel.md": "the 5.8 GB venv"})
    assert quantity_problems({"a.md": "266 tests in 698 s", "b.md": "4 passed in 276 s"})
    assert quantity_problems({"a.md": "(e.g. `0.1.0`)", "b.md": "releases/download/v0.2.0"}) == [
        f"bundle version: {version} expected, the docs also say {{'0.2.0': {{'b.md'}}}}"]
    assert quantity_problems({"docs/monailabel.md": "torch==2.13.0"})
    assert not quantity_problems({"README.md": f"bundle {version}, torch 2.13.0", "docs/monailabel.md": "torch 2.14.1"})


def test_the_model_cards_metadata_check_runs_offline():
    """The card's verify_metadata names a local schema file (MONAI downloads the schema only when it is missing)."""
    commands = re.findall(r"verify_metadata[^\n]*", read(CARD).replace("\\\n", " "))
    assert commands, f"{CARD}: no verify_metadata command"
    for command in commands:
        schema = re.search(r"--filepath\s+(\S+)", command)
        assert schema and os.path.isfile(os.path.join(BUNDLE, schema.group(1))), (
            f"{CARD}: {command!r} must name the local schema copy, relative to the bundle folder")


def test_metadata_has_no_key_monai_renames():
    """MONAI 1.6 reads `optional_packages_version` as a deprecated name of `required_packages_version` and replaces
    the latter with it (monai.bundle.utils.DEPRECATED_ID_MAPPING): such a key would silently drop the requirements."""
    from monai.bundle.utils import DEPRECATED_ID_MAPPING

    assert not set(DEPRECATED_ID_MAPPING) & set(metadata())
