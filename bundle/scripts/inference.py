"""Inference over many files without half-failing silently: inputs checked up front, outputs written whole.

``InputCheck`` reads every input once before the network runs (readable, 3D or 4D with the contract's channel,
finite, not constant). With ``on_error="skip"`` (the default) a bad input is left out with a warning naming it and
the reason, the good ones are segmented, and ``finish()`` (the last step of inference.yaml's ``run``) raises one
summary error, so the exit status is non-zero whenever anything was skipped. With ``on_error="raise"`` any bad input
stops the run before anything is written. Two inputs that would write the same output file also stop it before
anything is written (with ``keep_folders``, outputs keep each input's folder below the glob's root, so inputs of the
same name in two folders do not clash). ``AtomicNibabelWriter`` writes each label map to a temporary file beside its
destination and renames it, so an interrupted run leaves no partial output file.
"""

from __future__ import annotations

import logging
import os
import re
from collections import defaultdict

from monai.data import NibabelWriter

from scripts.data import find_images
from scripts.errors import BundleError

logger = logging.getLogger(__name__)

ON_ERROR = ("skip", "raise")


def glob_root(pattern: str) -> str:
    """The folder above the first wildcard of the glob ``pattern`` (absolute): ``/data/*/image.nii.gz`` -> ``/data``."""
    head = os.path.dirname(str(pattern))
    while re.search(r"[*?[]", head):
        head = os.path.dirname(head)
    return os.path.abspath(head or ".")


def output_root(pattern: str, keep_folders: bool = False) -> str:
    """``SaveImaged``'s ``data_root_dir`` in inference.yaml: with ``keep_folders`` the glob's root (each label map is
    written at its input's folder below it, under ``output_dir``), else "" (every label map directly in
    ``output_dir``)."""
    return glob_root(pattern) if keep_folders else ""


def output_name(path: str, root: str = "") -> str:
    """Where the label map of ``path`` goes, relative to ``output_dir``: its folder below ``root`` (none when
    ``root`` is "") and its name without the extension (".nii.gz" counts as one), as MONAI's ``SaveImaged`` with
    ``data_root_dir=root`` names it (before its ``_seg`` postfix and extension)."""
    folder, name = os.path.split(os.path.abspath(path))
    stem, extension = os.path.splitext(name)
    if extension == ".gz":
        stem = os.path.splitext(stem)[0]
    return os.path.normpath(os.path.join(os.path.relpath(folder, root), stem)) if root else stem


class InputCheck:
    """The input volumes matching ``pattern``, checked before inference.

    Args:
        pattern: glob of the 3D images to segment.
        channel: channel of 4D images (the data contract's); None: 3D images.
        on_error: "skip" (leave bad inputs out, report them in ``finish``) or "raise" (stop before writing anything).
        normalisation: the contract's ``normalisation`` (its percentiles must be distinct in each image).
        keep_folders: the outputs keep each input's folder below the glob's root (``output_root``); False: all in
            one folder, and two inputs of the same name stop the run before anything is written.

    Attributes: ``images`` (``[{"image": path}, ...]``, the good ones, what the dataset reads) and ``skipped``
    (``[(path, reason), ...]``).
    """

    def __init__(self, pattern: str, channel: int | None = None, on_error: str = "skip",
                 normalisation: dict | None = None, keep_folders: bool = False):
        if on_error not in ON_ERROR:
            raise BundleError(f"on_error must be one of {ON_ERROR}, got {on_error!r}.")
        from scripts.datasets import check_case

        norm = normalisation or {"lower_percentile": 1.0, "upper_percentile": 99.0}
        percentiles = (norm["lower_percentile"], norm["upper_percentile"])
        self.images, self.skipped = [], []
        for case in find_images(pattern):
            problems = check_case(case, channel=channel, num_partitions=1, percentiles=percentiles)
            if problems:
                reason = "; ".join(message for _, message in problems)
                self.skipped.append((case["image"], reason))
                logger.warning(f"skipped: {case['image']}: {reason}")
            else:
                self.images.append(case)
        self._refuse_collisions(output_root(pattern, keep_folders))
        total = len(self.images) + len(self.skipped)
        if self.skipped and (on_error == "raise" or not self.images):
            raise BundleError(f"{len(self.skipped)} of {total} input(s) cannot be segmented, nothing was written: "
                              f"{self._listing()}. Fix or remove them, or run with --on_error skip.")
        logger.info(f"{len(self.images)} of {total} input(s) to segment")

    def _refuse_collisions(self, root: str) -> None:
        """Stop before anything is written when two inputs would write the same output file (the same name in two
        folders, or ``a.nii`` and ``a.nii.gz`` in one)."""
        by_output = defaultdict(list)
        for case in self.images + [{"image": path} for path, _ in self.skipped]:
            by_output[output_name(case["image"], root)].append(case["image"])
        clashes = [paths for paths in by_output.values() if len(paths) > 1]
        if clashes:
            listing = "; ".join(" and ".join(paths) for paths in clashes)
            hint = "rename them or narrow --input_glob" if root else "run with --keep_folders True (outputs keep " \
                "each input's folder below the glob's root), rename them or narrow --input_glob"
            raise BundleError(f"{len(clashes)} output name(s) would be written twice, nothing was written: {listing} "
                              f"give the same label map name; {hint}.")

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
