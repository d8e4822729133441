"""Inference over many files without half-failing silently: inputs checked up front, outputs written whole.

``InputCheck`` reads every input once before the network runs (readable, 3D or 4D with the contract's channel,
finite, not constant). With ``on_error="skip"`` (the default) a bad input is left out with a warning naming it and
the reason, the good ones are segmented, and ``finish()`` (the last step of inference.yaml's ``run``) raises one
summary error, so the exit status is non-zero whenever anything was skipped. With ``on_error="raise"`` any bad input
stops the run before anything is written. ``AtomicNibabelWriter`` writes each label map to a temporary file beside
its destination and renames it, so an interrupted run leaves no partial output file.
"""

from __future__ import annotations

import logging
import os

from monai.data import NibabelWriter

from scripts.data import find_images
from scripts.errors import BundleError

logger = logging.getLogger(__name__)

ON_ERROR = ("skip", "raise")


class InputCheck:
    """The input volumes matching ``pattern``, checked before inference.

    Args:
        pattern: glob of the 3D images to segment.
        channel: channel of 4D images (the data contract's); None: 3D images.
        on_error: "skip" (leave bad inputs out, report them in ``finish``) or "raise" (stop before writing anything).

    Attributes: ``images`` (``[{"image": path}, ...]``, the good ones, what the dataset reads) and ``skipped``
    (``[(path, reason), ...]``).
    """

    def __init__(self, pattern: str, channel: int | None = None, on_error: str = "skip"):
        if on_error not in ON_ERROR:
            raise BundleError(f"on_error must be one of {ON_ERROR}, got {on_error!r}.")
        from scripts.datasets import check_case

        self.images, self.skipped = [], []
        for case in find_images(pattern):
            problems = check_case(case, channel=channel, num_partitions=1)
            if problems:
                reason = "; ".join(message for _, message in problems)
                self.skipped.append((case["image"], reason))
                logger.warning(f"skipped: {case['image']}: {reason}")
            else:
                self.images.append(case)
        total = len(self.images) + len(self.skipped)
        if self.skipped and (on_error == "raise" or not self.images):
            raise BundleError(f"{len(self.skipped)} of {total} input(s) cannot be segmented, nothing was written: "
                              f"{self._listing()}. Fix or remove them, or run with --on_error skip.")
        logger.info(f"{len(self.images)} of {total} input(s) to segment")

    def _listing(self) -> str:
        return "; ".join(f"{os.path.basename(path)}: {reason}" for path, reason in self.skipped)

    def finish(self) -> None:
        """Raise the summary error when inputs were skipped (the outputs of the good ones are written by then)."""
        if self.skipped:
            total = len(self.images) + len(self.skipped)
            raise BundleError(f"{len(self.skipped)} of {total} input(s) skipped ({self._listing()}); the other "
                              f"{len(self.images)} were segmented.")


class AtomicNibabelWriter(NibabelWriter):
    """``NibabelWriter`` that writes to a temporary file in the destination folder and renames it into place."""

    def write(self, filename, verbose: bool = False, **obj_kwargs):
        filename = str(filename)
        folder, name = os.path.split(filename)
        partial = os.path.join(folder, f".partial-{os.getpid()}-{name}")  # same extension: same compression
        try:
            super().write(partial, verbose=verbose, **obj_kwargs)
            os.replace(partial, filename)
        finally:
            if os.path.exists(partial):
                os.remove(partial)
