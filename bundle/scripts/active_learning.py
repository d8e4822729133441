"""The cold-start selection of ``scripts.selection`` as a MONAI Label active-learning strategy.

``POST /activelearning/<name>`` asks the served app for the next image to annotate. ``CoverageStrategy`` embeds
every image of the datastore with the bundle's pre-trained encoder (``configs/select.yaml``: the same embedding and
``selection_rule`` as the ``select`` run id) and answers the unlabelled image that the rule picks next around the
images that already have a final label: with the default ``kcenter``, the one farthest from every labelled image
(the medoid when nothing is labelled yet). Embeddings are kept in memory per image file
(path and modification time), so each image goes through the encoder once.

MONAI Label's ``monaibundle`` sample app declares its strategies in its ``main.py`` only; docs/monailabel.md shows
the lines that add this one. The class follows MONAI Label's ``Strategy`` interface (``info()``, ``__call__(request,
datastore)`` returning ``{"id": image id}``, or None when nothing is left, as monailabel 0.8.5's own strategies do)
without importing monailabel, so the bundle keeps its own dependencies.
"""

from __future__ import annotations

import logging
import os
import sys

import numpy as np

from scripts.selection import choose, cosine_distances, volume_embedding

logger = logging.getLogger(__name__)


class CoverageStrategy:
    """Next image to annotate by the bundle's selection rule.

    Args:
        bundle_dir: the bundle folder (holds configs/train.yaml, configs/select.yaml, models/, scripts/).
        overrides: config values replacing the bundle's (e.g. ``{"selection_rule": "kcenter"}``,
            ``{"pretrained_checkpoint": path}``; default checkpoint: ``models/pretrained_local.pt``).
    """

    def __init__(self, bundle_dir: str, overrides: dict | None = None):
        self.bundle_dir = os.path.abspath(bundle_dir)
        self.overrides = dict(overrides or {})
        self.description = "Cold start: the unlabelled image that best covers the datastore in the embedding of the " \
                           "pre-trained encoder (configs/select.yaml)"
        self._parts = None
        self._embeddings: dict[str, tuple[int, np.ndarray]] = {}

    def info(self) -> dict:
        return {"description": self.description}

    def _load(self) -> dict:
        """encoder, preprocessing, rule, partitions and device, parsed from the bundle's configs once."""
        if self._parts is None:
            from monai.bundle import ConfigParser

            parser = ConfigParser()
            configs = [os.path.join(self.bundle_dir, "configs", name) for name in ("train.yaml", "select.yaml")]
            parser.read_config(configs)
            parser.update({"bundle_root": self.bundle_dir, **self.overrides})
            self._parts = {key: parser.get_parsed_content(key) for key in
                           ("selection#encoder", "selection#preprocessing", "selection_rule", "selection_partitions",
                            "selection_batch_size", "device", "seed")}
        return self._parts

    def _embedding(self, path: str) -> np.ndarray:
        """(S C,) embedding of the image file at ``path``, computed once per file version."""
        version = os.stat(path).st_mtime_ns
        cached = self._embeddings.get(path)
        if cached is None or cached[0] != version:
            import torch

            parts = self._load()
            image = parts["selection#preprocessing"]({"image": path})["image"]
            image = torch.as_tensor(image).float().to(parts["device"])
            with torch.no_grad():
                vector = volume_embedding(parts["selection#encoder"], image, parts["selection_partitions"],
                                          parts["selection_batch_size"])
            self._embeddings[path] = cached = (version, vector.cpu().double().numpy())
        return cached[1]

    def __call__(self, request: dict, datastore) -> dict | None:
        """``{"id": the next unlabelled image of datastore}`` (MONAI Label's ``Datastore``), None when every image has
        a final label."""
        images = sorted(datastore.list_images())
        labelled = set(datastore.get_labeled_images())
        if all(image in labelled for image in images):
            return None
        sys.path.insert(0, self.bundle_dir)   # as MONAI Label's bundle tasks do: `scripts` is the bundle's
        try:
            embeddings = np.stack([self._embedding(datastore.get_image_uri(image)) for image in images])
            parts = self._load()
        finally:
            sys.path.remove(self.bundle_dir)
        fixed = [i for i, image in enumerate(images) if image in labelled]
        (pick,) = choose(parts["selection_rule"], cosine_distances(embeddings), 1, seed=parts["seed"] + len(fixed),
                         fixed=fixed)
        logger.info(f"{parts['selection_rule']}: next image {images[pick]} ({len(fixed)} of {len(images)} labelled)")
        return {"id": images[pick]}
