"""Progress lines of the benchmarks (``study.benchmark``, ``study.pipeline_bench``): on stderr, so that the tables
printed on stdout stay clean for a pipe or a file."""

from __future__ import annotations

import sys


def progress(message: str, quiet: bool) -> None:
    """Print ``message`` on stderr (flushed at once), unless ``quiet``."""
    if not quiet:
        print(message, file=sys.stderr, flush=True)
