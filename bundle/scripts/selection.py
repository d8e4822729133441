"""Which volumes to label first: cold-start selection from the pre-trained encoder's embeddings.

The embedding of a volume (``volume_embedding``): every slice goes through the pre-trained encoder; the deepest
encoder level's feature map is averaged over its pixels, (Z, C); the slices are averaged within each of S partitions
along z (partition(k) = floor(k S / Z), as in pre-training), (S, C); each partition's vector is L2-normalised and the
S vectors are concatenated and scaled to unit norm, (S C,). Every level of the anatomy (base, middle, apex...) thus
weighs the same, and two volumes are close when they look alike partition by partition. Distances are cosine
distances, 1 - cos, in [0, 2].

The rules (``RULES``; ``choose`` dispatches), each choosing k volumes of a pool of N, optionally around volumes
already labelled (``fixed``, kept, never chosen again):

- ``kmedoids``: the k volumes that minimise the pool's mean distance to its nearest chosen (or fixed) volume: greedy
  additions, then swaps of a chosen volume for another while one lowers that mean (PAM). k = 1: the medoid.
- ``kcenter``: farthest-first: the medoid (or the fixed volumes), then each time the volume farthest from every chosen
  one (minimises the largest distance: covers the outliers).
- ``typical``: the k volumes of highest typicality (mean cosine similarity to the rest of the pool): the densest point.
- ``random``: k volumes drawn with the seed (the baseline).

The default (``kcenter``, configs/select.yaml) is the rule that ranked best against random subsets on ACDC's
validation volumes (study plan ``docs/experiments/selection_acdc.yaml``, results in docs/results.md). Ties go to the
lowest index, so every rule but ``random`` is deterministic, and ``random`` is for a given seed.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from scripts.data import load_datalist
from scripts.errors import BundleError
from scripts.files import atomic_write, atomic_write_json
from scripts.networks import UNet2D, load_pretrained
from scripts.sampler import partition_of

logger = logging.getLogger(__name__)

RULES = ("kmedoids", "kcenter", "typical", "random")
KEY_PREFIX = "selected_"   # datalist keys that selection may write (never a prepared role or subset)


# ---------------------------------------------------------------- embeddings
def partition_means(features: torch.Tensor, num_partitions: int) -> torch.Tensor:
    """Mean of the slice features within each partition along z: (Z, C) -> (S, C).

    A partition without slices (Z < S) gets the mean of the whole volume."""
    num_slices = features.shape[0]
    parts = partition_of(torch.arange(num_slices), num_slices, num_partitions)
    membership = torch.nn.functional.one_hot(parts, num_partitions).T.to(features.dtype)   # (S, Z)
    counts = membership.sum(1, keepdim=True)
    means = membership @ features / counts.clamp(min=1)
    return torch.where(counts > 0, means, features.mean(0, keepdim=True))


def volume_embedding(encoder: UNet2D, image: torch.Tensor, num_partitions: int, batch_size: int = 32) -> torch.Tensor:
    """The unit-norm embedding (S C,) of one pre-processed volume ``image`` (C_in, H, W, Z), slice axis last."""
    slices = image.permute(3, 0, 1, 2)   # (Z, C_in, H, W)
    pooled = [encoder.encode(batch)[-1].mean(dim=(2, 3)) for batch in slices.split(batch_size)]   # (b, C) each
    parts = torch.nn.functional.normalize(partition_means(torch.cat(pooled), num_partitions), dim=1)   # (S, C)
    return parts.flatten() / num_partitions ** 0.5


@torch.no_grad()
def embed_volumes(encoder: UNet2D, volumes, num_partitions: int = 4, device="cpu", batch_size: int = 32) -> np.ndarray:
    """Embeddings (N, S C) of the N volumes of ``volumes`` (a dataset of dicts whose "image" is (C_in, H, W, Z)),
    with ``encoder`` (a ``UNet2D``) in eval mode."""
    encoder.eval()
    rows = []
    for i in range(len(volumes)):
        image = torch.as_tensor(volumes[i]["image"]).float().to(device)
        rows.append(volume_embedding(encoder, image, num_partitions, batch_size).cpu())
        logger.info(f"embedded volume {i + 1}/{len(volumes)}")
    return torch.stack(rows).double().numpy()


def cosine_distances(embeddings: np.ndarray) -> np.ndarray:
    """(N, D) unit-norm rows -> (N, N) cosine distances 1 - cos, clipped to [0, 2], zero diagonal."""
    distances = np.clip(1.0 - embeddings @ embeddings.T, 0.0, 2.0)
    np.fill_diagonal(distances, 0.0)
    return distances


def typicality(distances: np.ndarray) -> np.ndarray:
    """(N, N) distances -> (N,) mean cosine similarity of each volume to the other volumes (1 for N = 1)."""
    n = len(distances)
    return 1.0 - distances.sum(1) / max(n - 1, 1)


def coverage(distances: np.ndarray, chosen: Sequence[int]) -> float:
    """The pool's mean distance to its nearest volume in ``chosen`` (what ``kmedoids`` minimises)."""
    return float(distances[:, list(chosen)].min(1).mean())


# ---------------------------------------------------------------- rules: (N, N) distances -> chosen indices
def _nearest(distances: np.ndarray, chosen: Sequence[int]) -> np.ndarray:
    """(N,) distance of each volume to its nearest volume in ``chosen``; +inf everywhere when it is empty."""
    chosen = list(chosen)
    return distances[:, chosen].min(1) if chosen else np.full(len(distances), np.inf)


def _best_addition(distances: np.ndarray, nearest: np.ndarray, excluded: Sequence[int]) -> tuple[int, float]:
    """The volume whose addition lowers the pool's mean nearest distance most, and that mean (ties: lowest index)."""
    costs = np.minimum(nearest[:, None], distances).mean(0)   # (N,): the mean after adding each candidate
    costs[list(excluded)] = np.inf
    best = int(np.argmin(costs))
    return best, float(costs[best])


def kmedoids(distances: np.ndarray, k: int, fixed: Sequence[int] = ()) -> list[int]:
    """k volumes minimising the mean distance of the pool to its nearest chosen or fixed volume: greedy additions
    (the medoid first when nothing is fixed), then the best improving swap of a chosen volume until none improves."""
    fixed, chosen = list(fixed), []
    for _ in range(k):
        best, _ = _best_addition(distances, _nearest(distances, fixed + chosen), fixed + chosen)
        chosen.append(best)
    cost = coverage(distances, fixed + chosen)
    for _ in range(100 * max(k, 1)):   # each swap lowers the cost, so this ends; the bound is a guard
        swaps = []
        for position in range(k):
            others = fixed + chosen[:position] + chosen[position + 1:]
            swaps.append(_best_addition(distances, _nearest(distances, others), fixed + chosen) + (position,))
        candidate, new_cost, position = min(swaps, key=lambda s: (s[1], s[2]))
        if new_cost >= cost - 1e-12:
            break
        chosen[position], cost = candidate, new_cost
    return chosen


def kcenter(distances: np.ndarray, k: int, fixed: Sequence[int] = ()) -> list[int]:
    """Farthest-first: the medoid when nothing is fixed, then each time the volume farthest from every chosen or
    fixed volume."""
    fixed, chosen = list(fixed), []
    if not fixed and k:
        chosen.append(kmedoids(distances, 1)[0])
    while len(chosen) < k:
        nearest = _nearest(distances, fixed + chosen)
        nearest[fixed + chosen] = -np.inf
        chosen.append(int(np.argmax(nearest)))
    return chosen


def most_typical(distances: np.ndarray, k: int, fixed: Sequence[int] = ()) -> list[int]:
    """The k volumes of highest typicality that are not fixed (ties: lowest index)."""
    order = np.argsort(-typicality(distances), kind="stable")
    return [int(i) for i in order if i not in set(fixed)][:k]


def random_volumes(num_volumes: int, k: int, seed: int = 0, fixed: Sequence[int] = ()) -> list[int]:
    """k volumes drawn without replacement among those not fixed, with ``numpy.random.default_rng(seed)``."""
    candidates = [i for i in range(num_volumes) if i not in set(fixed)]
    return [int(i) for i in np.random.default_rng(seed).choice(candidates, size=k, replace=False)]


def choose(rule: str, distances: np.ndarray, k: int, seed: int = 0, fixed: Sequence[int] = ()) -> list[int]:
    """Indices of the k volumes ``rule`` chooses (in the order chosen) among the N volumes of ``distances`` (N, N),
    besides the ``fixed`` ones. Raises ``BundleError`` for an unknown rule or a k the pool cannot give."""
    if rule not in RULES:
        raise BundleError(f"selection_rule {rule!r} is not one of {', '.join(RULES)}.")
    free = len(distances) - len(set(fixed))
    if not 1 <= k <= free:
        raise BundleError(f"cannot choose {k} volume(s) among {free} not yet chosen: give 1 <= num_labelled <= {free}.")
    if rule == "random":
        return random_volumes(len(distances), k, seed, fixed)
    return {"kmedoids": kmedoids, "kcenter": kcenter, "typical": most_typical}[rule](distances, k, fixed)


# ---------------------------------------------------------------- outputs: datalist key, CSV, picture
def pca_2d(embeddings: np.ndarray) -> np.ndarray:
    """(N, D) -> (N, 2): the first two principal components (zeros where there are fewer); each component's sign is
    fixed so that its largest-magnitude loading is positive (the same picture on every run)."""
    centred = embeddings - embeddings.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    axes = vt[:2]
    axes = axes * np.sign(axes[np.arange(len(axes)), np.abs(axes).argmax(1)])[:, None]
    points = np.zeros((len(embeddings), 2))
    points[:, : len(axes)] = centred @ axes.T
    return points


def selection_rows(cases: Sequence[Mapping], distances: np.ndarray, chosen: Sequence[int],
                   points: np.ndarray) -> list[dict]:
    """One CSV row per pool volume: image, patient, chosen (1/0), pick (1-based order, or empty), typicality,
    distance_to_chosen (cosine distance to its nearest chosen volume), nearest_chosen (that volume's image), pc1,
    pc2 (``points`` (N, 2), the picture's coordinates)."""
    pick = {index: order + 1 for order, index in enumerate(chosen)}
    nearest = np.asarray(chosen)[distances[:, list(chosen)].argmin(1)]
    typical = typicality(distances)
    return [{"image": case["image"], "patient": case.get("patient", ""), "chosen": int(i in pick),
             "pick": pick.get(i, ""), "typicality": f"{typical[i]:.6f}",
             "distance_to_chosen": f"{distances[i, nearest[i]]:.6f}", "nearest_chosen": cases[nearest[i]]["image"],
             "pc1": f"{points[i, 0]:.6f}", "pc2": f"{points[i, 1]:.6f}"} for i, case in enumerate(cases)]


def write_csv(rows: Sequence[Mapping], path: str) -> str:
    """``rows`` (dicts with the same keys) as a CSV file at ``path``, written atomically."""
    def write(f):
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return atomic_write(path, write, binary=False)


def plot_selection(points: np.ndarray, chosen: Sequence[int], title: str, path: str) -> str | None:
    """The pool's embeddings in 2D (``points`` (N, 2)), the chosen volumes marked and numbered in pick order, as a
    PNG at ``path`` (atomically). Without matplotlib: a warning, no file, None."""
    try:
        from scripts.report import pyplot

        plt = pyplot()
    except ImportError:
        logger.warning(f"matplotlib is not installed: no picture {path} (pip install matplotlib, the project's "
                       "'plot' extra); the CSV holds the same 2D coordinates (pc1, pc2).")
        return None
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    ax.scatter(points[:, 0], points[:, 1], s=22, color="0.6", label="pool volume")
    picked = points[list(chosen)]
    ax.scatter(picked[:, 0], picked[:, 1], s=140, marker="*", color="tab:red", label="chosen")
    for order, (x, y) in enumerate(picked, start=1):
        ax.annotate(str(order), (x, y), textcoords="offset points", xytext=(6, 6), color="tab:red")
    ax.set(title=title, xlabel="principal component 1", ylabel="principal component 2")
    ax.legend(frameon=False)
    fig.tight_layout()
    try:
        return atomic_write(path, lambda f: fig.savefig(f, dpi=110, format="png"))
    finally:
        plt.close(fig)


def write_datalist_key(datalist_file: str, key: str, cases: Sequence[Mapping]) -> None:
    """Set ``key`` of the datalist JSON to ``cases`` (entries as the file stores them), keeping every other entry;
    the file is replaced atomically, under an exclusive lock of ``<datalist>.lock`` where the platform has ``fcntl``
    (two selections writing at once both land). Only ``selected_*`` keys may be written."""
    if not key.startswith(KEY_PREFIX):
        raise BundleError(f"selection_key {key!r} must start with '{KEY_PREFIX}' (prepared roles and subsets are "
                          "never overwritten).")
    try:
        import fcntl
    except ImportError:   # not Unix: no lock
        fcntl = None
    with open(datalist_file + ".lock", "a") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
        with open(datalist_file) as f:
            content = json.load(f)
        if key in content:
            logger.info(f"{datalist_file}: '{key}' replaced.")
        content[key] = [dict(case) for case in cases]
        atomic_write_json(content, datalist_file)


# ---------------------------------------------------------------- the workflow (select.yaml)
def pool_images(datalist_file: str, key: str) -> list[dict]:
    """``[{"image": absolute path}, ...]`` of the datalist's ``key`` list, in its order: the images alone, so the disk
    cache entries of pre-training (keyed by the files) are found again."""
    return [{"image": case["image"]} for case in load_datalist(datalist_file, key)]


def load_encoder(network: UNet2D, checkpoint: str, contract: Mapping) -> UNet2D:
    """``network`` with the pre-trained encoder of ``checkpoint`` (whose data contract must agree with ``contract``),
    in eval mode. An empty checkpoint is refused: a random encoder gives meaningless embeddings."""
    if not checkpoint:
        raise BundleError("select needs a pre-trained checkpoint: run the pre-training (pretrain.yaml) or give "
                          "--pretrained_checkpoint.")
    return load_pretrained(network, checkpoint, decoder_blocks=0, contract=contract).eval()


def run_selection(encoder: UNet2D, volumes, datalist_file: str, pool_key: str, num_labelled: int, rule: str,
                  key: str, output_dir: str, num_partitions: int = 4, seed: int = 0, device="cpu",
                  batch_size: int = 32) -> list[dict]:
    """Embed the pool ``volumes`` (the datalist's ``pool_key`` list, pre-processed, same order), choose
    ``num_labelled`` of them by ``rule``, write the datalist key ``key`` (the chosen entries, as stored, in pick
    order), ``<output_dir>/<key>.csv`` (every pool volume: scores, chosen or not) and ``<output_dir>/<key>.png``.
    Returns the chosen entries. Bad input (empty pool, k too large, unknown rule or key) stops before any embedding."""
    with open(datalist_file) as f:
        stored = json.load(f).get(pool_key)
    if not stored:
        hint = (" (every training volume has a label already; to choose among labelled volumes, as a study does: "
                "--selection_pool labelled_all)" if pool_key == "unlabelled" else "")
        raise BundleError(f"datalist {datalist_file}: the pool '{pool_key}' holds no volume: nothing to select "
                          f"from{hint}.")
    if len(stored) != len(volumes):
        raise BundleError(f"datalist {datalist_file}: '{pool_key}' changed while it was read: run select again.")
    if not 1 <= int(num_labelled) <= len(stored):
        raise BundleError(f"--num_labelled {num_labelled} is not between 1 and the {len(stored)} volume(s) of the pool "
                          f"'{pool_key}' in {datalist_file}.")
    if rule not in RULES:
        raise BundleError(f"--selection_rule {rule!r} is not one of {', '.join(RULES)}.")
    if not key.startswith(KEY_PREFIX):
        raise BundleError(f"--selection_key {key!r} must start with '{KEY_PREFIX}'.")
    embeddings = embed_volumes(encoder, volumes, num_partitions, device, batch_size)
    distances = cosine_distances(embeddings)
    chosen = choose(rule, distances, int(num_labelled), seed=seed)
    points = pca_2d(embeddings)
    rows = selection_rows(stored, distances, chosen, points)
    csv_file = write_csv(rows, os.path.join(output_dir, f"{key}.csv"))
    cost = coverage(distances, chosen)
    title = f"{rule}, {num_labelled} of {len(stored)}: mean distance to the nearest chosen {cost:.3f}"
    png_file = plot_selection(points, chosen, title, os.path.join(output_dir, f"{key}.png"))
    picked = [stored[i] for i in chosen]
    write_datalist_key(datalist_file, key, picked)
    logger.info(f"select ({rule}): {', '.join(str(c.get('patient', c['image'])) for c in picked)} -> '{key}' in "
                f"{datalist_file}; {csv_file}" + (f", {png_file}" if png_file else ""))
    return picked
