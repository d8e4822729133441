"""The documented commands and snippets, checked as a stranger would copy them.

Every shell command in README.md, docs/*.md, docs/study/*.md and the model card (bundle/docs/README.md) that runs
``monai.bundle`` or ``make`` is found in fenced blocks and in inline code spans, parsed, and checked without running the
workflow:

- ``monai.bundle <verb>``: the verb exists; each config / metadata file it names exists (paths are tried from the
  repository root, then from the bundle folder, as the docs say); the run id is a key of the merged configs; each
  ``--key`` is either an argument of the verb or a key of the merged configs (``NEW_KEYS``: added on purpose);
- ``make``: each target is one of the Makefile's, each ``VAR=value`` a Makefile variable; ``make version`` is run
  against a copy of metadata.json (so a version the bundle would refuse is caught).

Each Python snippet is executed in a scratch folder holding a bundle copy with a small checkpoint written by the test;
a snippet that loads weights (``model_file=...``) must return the checkpoint's tensors, all of them.
One parametrised case per command or snippet: a broken one names its file and line.
"""

from __future__ import annotations

import glob
import inspect
import json
import os
import re
import shlex
import shutil
from dataclasses import dataclass

import pytest
import torch
from monai.bundle import ConfigParser
from monai.bundle import scripts as bundle_verbs

from conftest import BUNDLE, ROOT
from scripts.networks import UNet2D

DOCS = ["README.md", *sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md"))),
        *sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "study", "*.md"))),
        "bundle/docs/README.md"]   # docs/study/*.md: the hand-written study pages (the reports are in subfolders)
SHELL_VARIABLES = {"$C": "bundle/configs"}   # set by the docs before their commands (`C=bundle/configs`)
# overrides that name a key the configs do not define, on purpose (none so far: add "key": "why" here)
NEW_KEYS: dict[str, str] = {}
FILE_ARGUMENTS = ("config_file", "meta_file", "logging_file", "args_file")


@dataclass
class Snippet:
    doc: str
    line: int
    text: str

    @property
    def name(self) -> str:
        return f"{self.doc}:{self.line}"


def _fenced_blocks(doc: str):
    """(language, first line number, text) of each fenced block of ``doc``."""
    lines = open(os.path.join(ROOT, doc), encoding="utf-8").read().splitlines()
    block, language, start = None, "", 0
    for number, line in enumerate(lines, 1):
        fence = re.match(r"^\s*```(\w*)", line)
        if fence and block is None:
            block, language, start = [], fence.group(1), number + 1
        elif fence:
            yield language, start, "\n".join(block)
            block = None
        elif block is not None:
            block.append(line)


def _is_command(text: str) -> bool:
    return bool(re.search(r"-m monai\.bundle\b", text)) or bool(re.match(r"^(\w+=\S+\s+)*make(\s|$)", text))


def shell_commands() -> list[Snippet]:
    """Every ``monai.bundle`` / ``make`` command of the docs, continuation lines joined, comments dropped."""
    found = []
    for doc in DOCS:
        for language, start, text in _fenced_blocks(doc):
            if language not in ("bash", "sh", "shell", ""):
                continue
            joined, first = "", start
            for offset, line in enumerate(text.split("\n")):
                if not joined:
                    first = start + offset
                joined += line.rstrip("\\").rstrip() + " " if line.rstrip().endswith("\\") else line
                if line.rstrip().endswith("\\"):
                    continue
                command = joined.strip()
                joined = ""
                if command.startswith("#") or not _is_command(command):
                    continue
                found.extend(Snippet(doc, first, part.strip()) for part in re.split(r"\s&&\s", command)
                             if _is_command(part.strip()))
        text = open(os.path.join(ROOT, doc), encoding="utf-8").read()
        prose = re.sub(r"```.*?```", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.S)
        for match in re.finditer(r"`([^`\n]+)`", prose):
            if re.match(r"^(\w+=\S+\s+)*(make\s|\S*python\S* -m monai\.bundle|torchrun)", match.group(1)) \
                    and _is_command(match.group(1)):
                found.append(Snippet(doc, prose.count("\n", 0, match.start()) + 1, match.group(1)))
    return found


def python_snippets() -> list[Snippet]:
    return [Snippet(doc, start, text) for doc in DOCS for language, start, text in _fenced_blocks(doc)
            if language == "python"]


def _tokens(command: str) -> list[str]:
    for name, value in SHELL_VARIABLES.items():
        command = command.replace(name, value)
    tokens = shlex.split(command)   # not comments=True: it would cut `--global#strategy` at its '#'
    comment = next((i for i, t in enumerate(tokens) if t.startswith("#")), len(tokens))
    return tokens[:comment]


def _find_file(path: str) -> str | None:
    """The documented path from the repository root, else from the bundle folder (the model card's commands)."""
    for base in (ROOT, BUNDLE):
        candidate = os.path.normpath(os.path.join(base, path))
        if os.path.exists(candidate):
            return candidate
    return None


def _is_placeholder(value: str) -> bool:
    return "<" in value or "..." in value or "/data/" in value or value.startswith("zoo/")


def _config_files(value: str) -> list[str]:
    value = value.strip()
    return [str(v) for v in eval(value, {})] if value.startswith("[") else [value]  # noqa: S307 (the docs' own list)


def _options(tokens: list[str]) -> tuple[list[str], dict[str, str]]:
    """Positional arguments and ``--key value`` / ``--key=value`` options of a fire command line."""
    positional, options, i = [], {}, 0
    while i < len(tokens):
        token = tokens[i]
        if token.startswith("--"):
            key, _, value = token[2:].partition("=")
            if not _:
                value, i = (tokens[i + 1] if i + 1 < len(tokens) else ""), i + 1
            options[key] = value
        else:
            positional.append(token)
        i += 1
    return positional, options


def check_monai_bundle(tokens: list[str]) -> list[str]:
    """The problems of one ``... -m monai.bundle <verb> ...`` command line (empty: none)."""
    tokens = tokens[tokens.index("monai.bundle") + 1:]
    positional, options = _options(tokens)
    verb, positional = positional[0], positional[1:]
    if _is_placeholder(verb):   # prose such as `python -m monai.bundle ...`
        return []
    function = getattr(bundle_verbs, verb, None)
    if function is None:
        return [f"monai.bundle has no command {verb!r}"]
    parameters = inspect.signature(function).parameters
    takes_overrides = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    problems, configs = [], []
    for key in FILE_ARGUMENTS:
        if key not in options or _is_placeholder(options[key]):
            continue
        for path in _config_files(options[key]):
            if _is_placeholder(path):
                continue
            found = _find_file(path)
            if found is None:
                problems.append(f"--{key}: {path} not found (from the repository root or the bundle folder)")
            elif key == "config_file":
                configs.append(found)
    parser = ConfigParser()
    if configs:
        parser.read_config(configs)
    first = next(iter(parameters))   # run_id / net_id: the first positional argument
    ids = positional[:1] or ([options[first]] if first in options else [])
    if verb == "run" and not ids:
        ids = ["run"]
    if first in ("run_id", "net_id") and configs:
        problems += [f"{first} {i!r} is not a key of {[os.path.basename(c) for c in configs]}" for i in ids
                     if i not in parser]
    for key in options:
        if key in parameters and parameters[key].kind != inspect.Parameter.VAR_KEYWORD:
            continue
        if not takes_overrides:
            problems.append(f"--{key} is not an argument of monai.bundle {verb}")
        elif configs and key not in parser and key not in NEW_KEYS:
            problems.append(f"--{key} is not a key of {[os.path.basename(c) for c in configs]} (a typo, or a new key:"
                            " declare it in NEW_KEYS)")
    return problems


def _makefile() -> tuple[set[str], set[str]]:
    text = open(os.path.join(ROOT, "Makefile"), encoding="utf-8").read()
    targets = set(re.findall(r"^([\w-]+)\s*:(?!=)", text, flags=re.M))
    variables = set(re.findall(r"^(\w+)\s*[?:]?=", text, flags=re.M)) | set(re.findall(r"\$[({](\w+)[)}]", text))
    return targets, variables


def check_make(tokens: list[str], tmp_path) -> list[str]:
    """The problems of one ``make ...`` command line; ``make version`` runs on a copy of metadata.json."""
    from study.release import ReleaseError, set_version

    targets, variables = _makefile()
    tokens = tokens[tokens.index("make") + 1:]
    assignments = dict(t.split("=", 1) for t in tokens if "=" in t and not t.startswith("-"))
    goals = [t for t in tokens if "=" not in t and not t.startswith("-")] or ["venv"]
    problems = [f"no Makefile target {g!r}" for g in goals if g not in targets]
    problems += [f"{v} is not a Makefile variable" for v in assignments if v not in variables]
    if "version" in goals:
        copy = tmp_path / "bundle"
        os.makedirs(copy / "configs")
        shutil.copy(os.path.join(BUNDLE, "configs", "metadata.json"), copy / "configs")
        try:
            set_version(assignments.get("VERSION", ""), assignments.get("CHANGE", ""), bundle_dir=str(copy))
        except ReleaseError as error:
            problems.append(f"make version refuses it: {error}")
    return problems


COMMANDS = shell_commands()
SNIPPETS = python_snippets()


def test_the_docs_have_commands_and_snippets():
    docs = {c.doc for c in COMMANDS}
    assert {"README.md", "bundle/docs/README.md", "docs/use_pretrained.md", "docs/monailabel.md"} <= docs, docs
    assert any("monai.bundle.load" in s.text or "import load" in s.text for s in SNIPPETS)
    assert any(s.doc == "bundle/docs/README.md" for s in SNIPPETS), "the model card's load example is not a snippet"


@pytest.mark.parametrize("command", COMMANDS, ids=[c.name for c in COMMANDS])
def test_documented_command(command, tmp_path):
    tokens = _tokens(command.text)
    problems = check_make(tokens, tmp_path) if "make" in tokens[:3] else check_monai_bundle(tokens)
    assert not problems, f"{command.name}: {command.text}\n  " + "\n  ".join(problems)


@pytest.fixture
def zoo(tmp_path):
    """A scratch folder with ``zoo/<name>`` bundle copies (configs, scripts, docs) holding small checkpoints of the
    reference U-Net (1 -> 4 classes) with distinctive weights; returns (folder, {file name: state_dict})."""
    torch.manual_seed(1234)
    weights = {}
    for stage in ("pretrained_global", "pretrained_local", "model"):
        net = UNet2D(1, 4)
        weights[stage] = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in net.state_dict().items()}
    contract = json.load(open(os.path.join(BUNDLE, "configs", "metadata.json")))["data_contract"]
    for name in ("NAME", "cardiac_mri_contrastive_segmentation"):
        folder = tmp_path / "zoo" / name
        for part in ("configs", "scripts", "docs"):
            shutil.copytree(os.path.join(BUNDLE, part), folder / part, ignore=shutil.ignore_patterns("__pycache__"))
        os.makedirs(folder / "models")
        for stage, state in weights.items():
            torch.save({"model": state, "contract": contract}, folder / "models" / f"{stage}.pt")
    return tmp_path, weights


@pytest.mark.parametrize("snippet", SNIPPETS, ids=[s.name for s in SNIPPETS])
def test_documented_python_snippet(snippet, zoo, monkeypatch):
    folder, weights = zoo
    monkeypatch.chdir(folder)
    monkeypatch.setattr("sys.path", list(__import__("sys").path))
    namespace: dict = {}
    exec(compile(snippet.text, snippet.name, "exec"), namespace)  # noqa: S102 (our own docs)
    loaded = re.search(r"model_file=\"models/(\w+)\.pt\"", snippet.text)
    if loaded:
        expected = weights[loaded.group(1)]
        networks = [v for v in namespace.values() if isinstance(v, torch.nn.Module)]
        assert networks, f"{snippet.name}: no network left by the snippet"
        same = max(sum(torch.equal(net.state_dict()[k].cpu(), t) for k, t in expected.items()) for net in networks)
        assert same == len(expected), (f"{snippet.name}: {same} of the checkpoint's {len(expected)} tensors loaded "
                                       "(key_in_ckpt=\"model\" missing?)")


def test_the_checks_catch_broken_commands(tmp_path):
    """The checker itself: a good command passes, each kind of mistake is named."""
    good = 'python -m monai.bundle run pretrain --config_file "[\'$C/train.yaml\',\'$C/pretrain.yaml\']" --resume True'
    assert check_monai_bundle(_tokens(good)) == []
    assert check_monai_bundle(_tokens(good.replace("pretrain --", "pretrainn --")))   # run id
    assert check_monai_bundle(_tokens(good + " --global#strategyy random"))           # override typo
    assert check_monai_bundle(_tokens(good.replace("pretrain.yaml", "no_such_overlay.yaml")))   # missing config
    assert check_monai_bundle(_tokens("python -m monai.bundle verify_metadatum --meta_file configs/metadata.json"))
    assert check_make(_tokens("make demo"), tmp_path) == []
    assert check_make(_tokens("make dem"), tmp_path)
    assert check_make(_tokens("make bench ARG=--paper"), tmp_path)
    assert check_make(_tokens('make version VERSION=minor CHANGE="x"'), tmp_path / "a") == []
    assert check_make(_tokens('make version VERSION=0.0.1 CHANGE="x"'), tmp_path / "b")   # not above the current


def test_one_version_number(tmp_path):
    """The package's version (setup.py) is metadata.json's; `make version VERSION=minor` bumps the minor number."""
    import subprocess
    import sys

    from study.release import read_metadata, set_version

    current = read_metadata()["version"]
    printed = subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, capture_output=True, text=True)
    assert printed.stdout.strip().splitlines()[-1] == current, printed.stderr[-2000:]
    assert "version" not in open(os.path.join(ROOT, "setup.cfg")).read().split("[options]")[0].split("\n", 2)[2]
    os.makedirs(tmp_path / "configs")
    shutil.copy(os.path.join(BUNDLE, "configs", "metadata.json"), tmp_path / "configs")
    set_version("minor", "next", bundle_dir=str(tmp_path))
    major, minor, _ = map(int, current.split("."))
    assert read_metadata(str(tmp_path))["version"] == f"{major}.{minor + 1}.0"


def test_supported_apps_names_the_monailabel_the_docs_install():
    """metadata.json's supported_apps gives the MONAI Label release that docs/monailabel.md installs and the Makefile
    tests (`make test-monailabel`)."""
    version = json.load(open(os.path.join(BUNDLE, "configs", "metadata.json")))["supported_apps"]["monai-label"]
    assert f"monailabel=={version}" in open(os.path.join(ROOT, "docs", "monailabel.md")).read()
    assert f"monailabel=={version}" in open(os.path.join(ROOT, "Makefile")).read()


@pytest.mark.parametrize("doc", DOCS)
def test_relative_links_resolve(doc):
    """Every relative link of the docs (outside code blocks) names a file of the repository."""
    text = re.sub(r"```.*?```", "", open(os.path.join(ROOT, doc), encoding="utf-8").read(), flags=re.S)
    targets = [m.group(1).split("#")[0] for m in re.finditer(r"\]\(([^)\s]+)\)", text)]
    broken = [t for t in targets if t and not re.match(r"^(https?:|mailto:)", t)
              and not os.path.exists(os.path.join(ROOT, os.path.dirname(doc), t))]
    assert not broken, f"{doc}: links to missing files: {broken}"
