"""docs/design.md's map names every config and every module, and nothing that is gone.

The map is three Markdown tables, each under a ``###`` heading that names its folder in backticks (``bundle/configs``,
``bundle/scripts``, ``study/``); the first cell of each row is a file name in backticks. Each table must list exactly
the files of its folder: configs (every file), Python modules (``*.py``).
"""

from __future__ import annotations

import re

from conftest import ROOT

DESIGN = ROOT / "docs" / "design.md"
FOLDERS = {"bundle/configs": "*", "bundle/scripts": "*.py", "study": "*.py"}


def map_tables(text: str) -> dict[str, set[str]]:
    """{folder: the file names of the first cells of the table under the ``###`` heading naming that folder}."""
    tables: dict[str, set[str]] = {}
    folder = None
    for line in text.splitlines():
        if line.startswith("#"):
            named = [f for f in FOLDERS if re.search(rf"`{re.escape(f)}/?`", line)]
            folder = named[0] if line.startswith("### ") and named else None
            if folder:
                tables.setdefault(folder, set())
        elif folder and line.startswith("| `"):
            tables[folder].add(line.split("|")[1].strip().strip("`"))
    return tables


def folder_files(folder: str, pattern: str) -> set[str]:
    return {p.name for p in (ROOT / folder).glob(pattern) if p.is_file()}


def test_the_design_map_lists_every_config_and_module_and_nothing_else():
    tables = map_tables(DESIGN.read_text())
    assert set(tables) == set(FOLDERS), f"docs/design.md: no table for {sorted(set(FOLDERS) - set(tables))}"
    for folder, pattern in FOLDERS.items():
        files = folder_files(folder, pattern)
        assert files, folder
        missing, gone = sorted(files - tables[folder]), sorted(tables[folder] - files)
        assert not missing and not gone, f"docs/design.md, table of {folder}: missing {missing}, no such file {gone}"


def test_a_missing_or_stale_row_is_seen():
    text = "### Configs (`bundle/configs`)\n\n| File | Role |\n| --- | --- |\n| `train.yaml` | fine-tuning |\n" \
           "| `old.yaml` | gone |\n\n## Elsewhere\n\n| `not_a_row.yaml` | outside the map |\n"
    assert map_tables(text) == {"bundle/configs": {"train.yaml", "old.yaml"}}
    files = folder_files("bundle/configs", "*")
    assert "train.yaml" in files and "old.yaml" not in files and "inference.yaml" in files
