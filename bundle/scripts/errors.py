"""Errors a user can fix, and how they reach the terminal: one line, the traceback only on request.

Every bad-input or bad-configuration error the bundle raises is a ``BundleError`` whose message is one line: the
file or config key, what is wrong, what to do. ``python -m monai.bundle run`` wraps errors raised while a config is
parsed in its own ``RuntimeError("Failed to evaluate ...")``; the hook installed by ``install_excepthook`` (when the
``scripts`` package is imported) finds the ``BundleError`` in the exception chain and prints only its message as the
last line of stderr. An ``OSError`` that names a file (a folder that is a file, a file removed between two steps, a
full or read-only disk) is the user's to fix too and is printed the same way, as "<file>: <problem>". Set the
environment variable ``BUNDLE_DEBUG=1`` to get the full traceback instead. Any other exception keeps Python's usual
traceback.

Served by MONAI Label (a FastAPI / Starlette web server), a ``BundleError`` raised while a request runs is also
Starlette's ``HTTPException``: the server answers HTTP 422 with the one-line message as the JSON ``detail`` instead of
a bare "Internal Server Error". Where Starlette is not installed, ``BundleError`` is a plain ``ValueError``.
"""

from __future__ import annotations

import errno
import os
import sys

DEBUG_VARIABLE = "BUNDLE_DEBUG"
HTTP_STATUS = 422  # "unprocessable content": the request was well formed, the data it names are not usable

try:  # present where the bundle is served (MONAI Label), absent in the bundle's own environment
    from starlette.exceptions import HTTPException as _HTTPError
except ImportError:  # pragma: no cover - depends on the environment
    _HTTPError = Exception


class BundleError(ValueError, _HTTPError):
    """A bad input or configuration: the message is one line (file or key, the problem, the way out).

    Also an HTTP 422 error with ``detail`` = the message where Starlette is installed (module docstring)."""

    def __init__(self, message: str):
        text = " ".join(str(message).split())
        ValueError.__init__(self, text)
        self.status_code, self.detail, self.headers = HTTP_STATUS, text, None

    def __str__(self) -> str:
        return self.detail

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.detail!r})"


class MissingFileError(BundleError, FileNotFoundError):
    """A file the workflow needs does not exist (checkpoint, datalist, input image)."""


def _is_bundle_error(error: BaseException) -> bool:
    """``isinstance(error, BundleError)`` by name: MONAI Label unloads and re-imports ``scripts`` for each task, so a
    ``BundleError`` may come from another import of this module than the one whose hook is installed."""
    return any(c.__name__ == BundleError.__name__ and c.__module__ == __name__ for c in type(error).__mro__)


def _first_in_chain(error: BaseException | None, wanted) -> BaseException | None:
    """The first exception of ``error``'s chain of causes and contexts (``raise ... from``) for which ``wanted`` is
    true, or None."""
    seen = set()
    while error is not None and id(error) not in seen:
        if wanted(error):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def find_bundle_error(error: BaseException | None) -> BundleError | None:
    """The first ``BundleError`` in ``error``'s chain of causes and contexts (``raise ... from``), or None."""
    return _first_in_chain(error, _is_bundle_error)


# what a file-system error means for the user, where the system's words mislead (errno -> text)
FILE_PROBLEMS = {
    errno.EEXIST: "exists and is not a folder (a file is in the way of a folder to create)",
    errno.ENOTDIR: "a part of this path is a file, not a folder",
    errno.ENOSPC: "no space left on the device",
    errno.EROFS: "the file system is read-only",
}


def find_file_error(error: BaseException | None) -> OSError | None:
    """The first ``OSError`` naming a file (``filename`` set: a folder that is a file, a file that vanished, a disk
    that is full or read-only) in ``error``'s chain, or None: a problem with the user's files, not with the code."""
    return _first_in_chain(error, lambda e: isinstance(e, OSError) and e.filename is not None)


def one_line(error: BaseException | None) -> str | None:
    """The one-line report of ``error``: its ``BundleError``'s message, else "<file>: <problem>" of an ``OSError``
    naming a file, else None (a bug: the traceback is shown)."""
    found = find_bundle_error(error)
    if found is not None:
        return str(found)
    failed = find_file_error(error)
    if failed is None:
        return None
    other = f" -> {failed.filename2}" if failed.filename2 is not None else ""
    problem = FILE_PROBLEMS.get(failed.errno, failed.strerror or type(failed).__name__)
    return f"{failed.filename}{other}: {problem} (check the path: its folders must exist or be creatable, and writable)"


def _excepthook(kind, error, traceback, fallback=sys.__excepthook__) -> None:
    message = one_line(error)
    if message is None or os.environ.get(DEBUG_VARIABLE, "") not in ("", "0"):
        fallback(kind, error, traceback)
        return
    sys.stderr.flush()
    print(f"(full traceback: set {DEBUG_VARIABLE}=1)", file=sys.stderr)
    print(f"ERROR: {message}", file=sys.stderr)


def install_excepthook() -> None:
    """Print uncaught ``BundleError`` s and file errors as one line (see the module docstring); idempotent."""
    if getattr(sys.excepthook, "__module__", None) != __name__:
        previous = sys.excepthook

        def hook(kind, error, traceback):
            _excepthook(kind, error, traceback, fallback=previous)

        hook.__module__ = __name__
        sys.excepthook = hook
