"""Errors a user can fix, and how they reach the terminal: one line, the traceback only on request.

Every bad-input or bad-configuration error the bundle raises is a ``BundleError`` whose message is one line: the
file or config key, what is wrong, what to do. ``python -m monai.bundle run`` wraps errors raised while a config is
parsed in its own ``RuntimeError("Failed to evaluate ...")``; the hook installed by ``install_excepthook`` (when the
``scripts`` package is imported) finds the ``BundleError`` in the exception chain and prints only its message as the
last line of stderr. Set the environment variable ``BUNDLE_DEBUG=1`` to get the full traceback instead. Any other
exception keeps Python's usual traceback.
"""

from __future__ import annotations

import os
import sys

DEBUG_VARIABLE = "BUNDLE_DEBUG"


class BundleError(ValueError):
    """A bad input or configuration: the message is one line (file or key, the problem, the way out)."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class MissingFileError(BundleError, FileNotFoundError):
    """A file the workflow needs does not exist (checkpoint, datalist, input image)."""


def find_bundle_error(error: BaseException | None) -> BundleError | None:
    """The first ``BundleError`` in ``error``'s chain of causes and contexts (``raise ... from``), or None."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, BundleError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _excepthook(kind, error, traceback, fallback=sys.__excepthook__) -> None:
    found = find_bundle_error(error)
    if found is None or os.environ.get(DEBUG_VARIABLE, "") not in ("", "0"):
        fallback(kind, error, traceback)
        return
    sys.stderr.flush()
    print(f"(full traceback: set {DEBUG_VARIABLE}=1)", file=sys.stderr)
    print(f"ERROR: {found}", file=sys.stderr)


def install_excepthook() -> None:
    """Print uncaught ``BundleError`` s as one line (see the module docstring); idempotent."""
    if getattr(sys.excepthook, "__module__", None) != __name__:
        previous = sys.excepthook

        def hook(kind, error, traceback):
            _excepthook(kind, error, traceback, fallback=previous)

        hook.__module__ = __name__
        sys.excepthook = hook
