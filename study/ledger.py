"""The files of an experiment folder that say what is done: the ledgers (``results.jsonl``, ``stages.jsonl``: one
JSON line per finished job), the commands log (``commands.log``: every command started, with the time) and the copy
of the plan (``plan.yaml``).

A ledger line is written by replacing the whole file atomically, so a reader (or a restart after a kill) sees the
file with or without the line, never half of it. A job is done when its line exists.
"""

from __future__ import annotations

import datetime
import json
import os
import shlex
import tempfile
import threading

RESULTS, STAGES_FILE, COMMANDS, PLAN_COPY, LOCK = "results.jsonl", "stages.jsonl", "commands.log", "plan.yaml", ".lock"

_COMMANDS_LOCK = threading.Lock()   # one writer of the commands log at a time (the runner's worker threads)


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


def check_unchanged(jobs: list, done: dict[str, dict]) -> None:
    """Refuse to resume when a finished job (of ``jobs``, ``study.jobs.Job``) was made with another configuration
    than the plan now asks for (its ``config`` against the ``config`` of its line in ``done``)."""
    changed = [j.id for j in jobs if j.id in done and done[j.id].get("config") != jsonable(j.config)]
    if changed:
        raise ValueError(
            f"{len(changed)} finished job(s) were run with another configuration than the plan now gives "
            f"(e.g. {changed[:3]}): start a new experiment folder (--experiment_dir), or delete their lines from "
            f"{RESULTS} / {STAGES_FILE} to have them run again."
        )


def jsonable(value):
    """``value`` as it reads back from a ledger line (tuples become lists, keys strings)."""
    return json.loads(json.dumps(value))


def now() -> str:
    """The local time with its offset, to the second (ISO 8601): the ``finished`` of a line, the commands log's."""
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def log_command(experiment_dir: str, job_id: str, command: list[str]) -> None:
    """Append ``# <time> <job id>`` and the shell-quoted command to the folder's commands log."""
    with _COMMANDS_LOCK, open(os.path.join(experiment_dir, COMMANDS), "a") as f:
        f.write(f"# {now()} {job_id}\n{shlex.join(command)}\n")


def write_text(path: str, text: str) -> str:
    """Write ``text`` to ``path`` through a temporary file renamed over it; returns ``path``."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    return path
