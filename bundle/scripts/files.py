"""Files that stay whole, loads that run no code, and hashes: what every module that writes or reads a file uses.

- ``atomic_write(path, write)`` (and ``atomic_save``, ``atomic_write_json``, ``atomic_write_text``, ``atomic_copy``):
  a temporary file in the same folder, flush, fsync, ``os.replace``, fsync of the folder. A crash or a kill at any
  point leaves either the previous file or the new one, never a part.
- ``safe_load(path)``: ``torch.load(..., weights_only=True)``. A missing, empty, truncated or corrupt file, or a
  pickle that would run code, raises a ``BundleError`` (``MissingFileError``) whose one-line message names the file
  and the problem. Nothing else is ever unpickled. ``require(path)``: the same message for a missing file.
- ``file_hash(path)``: the sha256 of a file (training states and releases record it).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import tempfile
import zipfile
from pathlib import Path

import torch

from scripts.errors import BundleError, MissingFileError

__all__ = [
    "atomic_write",
    "atomic_save",
    "atomic_write_json",
    "atomic_write_text",
    "atomic_copy",
    "require",
    "safe_load",
    "file_hash",
]


# ---------------------------------------------------------------- atomic writes
def atomic_write(path: str | os.PathLike, write, binary: bool = True) -> str:
    """Write ``path`` atomically: ``write(file)`` fills a temporary file in the same folder (so the rename never
    crosses file systems), which is flushed and fsync-ed, then ``os.replace``-d onto ``path``; the folder is fsync-ed
    so that the rename itself survives a power cut. On an exception the temporary file is removed and ``path`` is
    untouched; after a SIGKILL a ``.<name>.*.tmp`` file may stay behind, ``path`` is still the previous complete file.
    Every file the bundle writes goes through this. Returns ``path`` as a string."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(mode="wb" if binary else "w", dir=path.parent, prefix=f".{path.name}.",
                                         suffix=".tmp", delete=False)
    try:
        with handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(handle.name, 0o644)  # NamedTemporaryFile makes it owner-only
        os.replace(handle.name, path)
    except BaseException:
        if os.path.exists(handle.name):
            os.remove(handle.name)
        raise
    try:
        folder = os.open(path.parent, os.O_RDONLY)
    except OSError:  # some platforms cannot open a folder; the rename is done, only its durability is weaker
        return str(path)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
    return str(path)


def atomic_write_json(obj, path: str | os.PathLike, indent: int = 2) -> str:
    """Write ``obj`` as JSON (and a final newline) to ``path`` atomically (``atomic_write``)."""
    return atomic_write(path, lambda f: f.write(json.dumps(obj, indent=indent) + "\n"), binary=False)


def atomic_write_text(text: str, path: str | os.PathLike) -> str:
    """Write ``text`` to ``path`` atomically (``atomic_write``)."""
    return atomic_write(path, lambda f: f.write(text), binary=False)


def atomic_copy(source: str | os.PathLike, path: str | os.PathLike) -> str:
    """Copy the file ``source`` to ``path`` atomically (``atomic_write``)."""
    def copy(f):
        with open(source, "rb") as original:
            shutil.copyfileobj(original, f, 1 << 20)

    return atomic_write(path, copy)


def atomic_save(obj, path: str | os.PathLike) -> str:
    """``torch.save(obj)`` to ``path`` atomically (``atomic_write``); returns ``path`` as a string."""
    return atomic_write(path, lambda f: torch.save(obj, f))


# ---------------------------------------------------------------- safe reads
_UNSAFE_GLOBAL = re.compile(r"(?:Unsupported global: |unsupported )GLOBAL ([\w.]+)")


def require(path: str | os.PathLike, what: str = "checkpoint") -> str:
    """``path`` when it is a file, else ``MissingFileError`` naming it (e.g. inference.yaml checks its weights first:
    its network can be built without them, from metadata.json's contract, but not run)."""
    if not os.path.isfile(path):
        raise MissingFileError(f"{what} {path} not found: run the workflow that writes it or give the right path.")
    return str(path)


def safe_load(path: str | os.PathLike, map_location="cpu", what: str = "checkpoint"):
    """``torch.load(path, weights_only=True)``, with every failure turned into a one-line ``BundleError``.

    Args:
        path: the file.
        map_location: as for ``torch.load``.
        what: what the file is, for the messages ("training state", "checkpoint", ...).

    Raises:
        MissingFileError: no such file.
        BundleError: the file is empty, truncated or corrupt, or holds Python objects (a pickle that would import
            or call code, e.g. ``os.system``), which ``weights_only=True`` refuses. The message names the file.
    """
    path = require(path, what)
    if os.path.getsize(path) == 0:
        raise BundleError(f"{what} {path} is empty (0 bytes): the write that made it did not finish; delete it.")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        found = _UNSAFE_GLOBAL.search(str(error))
        culprit = f" (it asks for {found.group(1)})" if found else ""
        raise BundleError(
            f"{what} {path} refused: it holds Python objects that could run code when unpickled{culprit}; only "
            "plain tensors and containers are loaded (weights_only=True). Use a checkpoint you trust and re-save it."
        ) from error
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, KeyError, IndexError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise BundleError(
            f"{what} {path} is truncated or corrupt ({reason}); delete it or restore a good copy."
        ) from error


# ---------------------------------------------------------------- hashes
def file_hash(path) -> str | None:
    """sha256 (hex) of the file at ``path``; None when ``path`` is None or empty (no file used)."""
    if not path:
        return None
    if not os.path.isfile(path):
        raise MissingFileError(f"{path} not found.")
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
