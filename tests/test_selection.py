"""Which volumes to label first (scripts/selection.py, configs/select.yaml).

MONAI Label's strategy (scripts/active_learning.py) on a stand-in datastore: the medoid first, then another
unlabelled image once that one is labelled, None when all are (the real server: tests/monailabel_server).
Unit level, on toy embeddings: the rules (k = 1 gives the medoid, two clusters give one volume each, fixed volumes are
kept and never chosen again, the swaps never do worse than the greedy choice), the partition pooling, the picture
without matplotlib, the datalist write that keeps every other key.
Workflow level, on the embedded synthetic data with a tiny network: prepare, a short pretrain, then
`select --num_labelled 2` writes selected_2 (2 volumes), the CSV and the PNG; fine-tuning with --train_key selected_2
runs; the same selection again gives the same volumes and CSV; bad input stops with a one-line BundleError.
"""

from __future__ import annotations

import csv
import itertools
import json
import logging
import os
import sys

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

import conftest as br
from scripts.errors import BundleError, find_bundle_error
from scripts.selection import (
    choose,
    cosine_distances,
    coverage,
    kmedoids,
    partition_means,
    pca_2d,
    plot_selection,
    run_selection,
    typicality,
    write_datalist_key,
)


def unit_rows(points) -> np.ndarray:
    points = np.asarray(points, dtype=float)
    return points / np.linalg.norm(points, axis=1, keepdims=True)


def two_clusters(seed=0, sizes=(6, 4)) -> np.ndarray:
    """Unit embeddings (10, 3): 6 around +x, 4 around +y."""
    rng = np.random.default_rng(seed)
    a = np.array([1.0, 0.0, 0.0]) + 0.05 * rng.standard_normal((sizes[0], 3))
    b = np.array([0.0, 1.0, 0.0]) + 0.05 * rng.standard_normal((sizes[1], 3))
    return unit_rows(np.concatenate([a, b]))


# ---------------------------------------------------------------- the rules
@pytest.mark.parametrize("rule", ["kmedoids", "kcenter"])
def test_one_volume_is_the_medoid(rule):
    distances = cosine_distances(unit_rows(np.random.default_rng(1).standard_normal((12, 5))))
    assert choose(rule, distances, 1) == [int(np.argmin(distances.sum(1)))]


@pytest.mark.parametrize("rule", ["kmedoids", "kcenter"])
def test_two_clusters_give_one_volume_each(rule):
    chosen = choose(rule, cosine_distances(two_clusters()), 2)
    assert sorted(i < 6 for i in chosen) == [False, True]


def test_typical_takes_the_densest_cluster_twice():
    chosen = choose("typical", cosine_distances(two_clusters()), 2)   # what covering the pool avoids
    assert all(i < 6 for i in chosen)


def test_fixed_volumes_are_kept_and_the_next_one_covers_the_rest():
    distances = cosine_distances(two_clusters())
    for rule in ("kmedoids", "kcenter"):
        (next_one,) = choose(rule, distances, 1, fixed=[0])   # a volume of the first cluster is labelled already
        assert next_one >= 6, rule
    assert 0 not in choose("random", distances, 9, seed=3, fixed=[0])


def test_kmedoids_ends_where_no_swap_helps_and_never_does_worse_than_greedy():
    distances = cosine_distances(unit_rows(np.random.default_rng(4).standard_normal((9, 4))))
    chosen = kmedoids(distances, 2)
    cost = coverage(distances, chosen)
    for position, candidate in itertools.product(range(2), range(9)):   # PAM's end: a local optimum of single swaps
        swapped = list(chosen)
        swapped[position] = candidate
        assert coverage(distances, swapped) >= cost - 1e-12
    greedy = [int(np.argmin(distances.sum(1)))]
    greedy.append(int(np.argmin(np.minimum(distances[:, greedy[0]][:, None], distances).mean(0))))
    assert cost <= coverage(distances, greedy) + 1e-12


def test_random_is_seeded_and_rules_check_their_input():
    distances = cosine_distances(two_clusters())
    assert choose("random", distances, 3, seed=7) == choose("random", distances, 3, seed=7)
    assert len(set(choose("random", distances, 10, seed=7))) == 10
    with pytest.raises(BundleError, match="not one of"):
        choose("densest", distances, 1)
    with pytest.raises(BundleError, match="cannot choose 11"):
        choose("kmedoids", distances, 11)


def test_typicality_and_distances():
    embeddings = unit_rows([[1, 0], [1, 0], [0, 1]])
    distances = cosine_distances(embeddings)
    np.testing.assert_allclose(distances, [[0, 0, 1], [0, 0, 1], [1, 1, 0]], atol=1e-12)
    np.testing.assert_allclose(typicality(distances), [0.5, 0.5, 0.0])


def test_partition_means_cover_short_volumes():
    features = torch.arange(10.0)[:, None].repeat(1, 2)   # (Z=10, C=2), slice k has features k
    np.testing.assert_allclose(partition_means(features, 4)[:, 0], [1.0, 3.5, 6.0, 8.5])   # slices 0-2, 3-4, 5-7, 8-9
    short = partition_means(torch.tensor([[0.0], [2.0]]), 4)   # 2 slices, 4 partitions: the empty ones get the mean
    np.testing.assert_allclose(short[:, 0], [0.0, 1.0, 2.0, 1.0])


def test_pca_is_deterministic_in_sign():
    embeddings = two_clusters()
    points = pca_2d(embeddings)
    assert points.shape == (10, 2)
    np.testing.assert_allclose(pca_2d(-embeddings + 2 * embeddings.mean(0)), -points, atol=1e-9)   # mirrored data


def test_picture_without_matplotlib_is_a_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "matplotlib", None)   # import matplotlib now raises ImportError
    with caplog.at_level(logging.WARNING):
        assert plot_selection(np.zeros((3, 2)), [0], "t", str(tmp_path / "p.png")) is None
    assert "matplotlib is not installed" in caplog.text and not os.listdir(tmp_path)


def test_datalist_key_write_keeps_every_other_entry(tmp_path):
    path = tmp_path / "datalist.json"
    content = {"labelled_all": [{"image": "a.nii.gz", "label": "a_gt.nii.gz"}], "contract": {"image_size": 64}}
    path.write_text(json.dumps(content))
    write_datalist_key(str(path), "selected_1", content["labelled_all"])
    assert json.loads(path.read_text()) == {**content, "selected_1": content["labelled_all"]}
    with pytest.raises(BundleError, match="must start with 'selected_'"):
        write_datalist_key(str(path), "labelled_all", [])
    assert sorted(os.listdir(tmp_path)) == ["datalist.json", "datalist.json.lock"]


def test_an_empty_pool_stops_before_anything(tmp_path):
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps({"labelled_all": []}))
    with pytest.raises(BundleError, match="holds no volume"):
        run_selection(None, [], str(path), "labelled_all", 1, "kmedoids", "selected_1", str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- the workflow
@pytest.fixture(scope="module")
def selected(tmp_path_factory):
    """prepare -> a short pretrain -> select --num_labelled 2; returns (work, dataset args, run paths)."""
    work = tmp_path_factory.mktemp("select")
    data = br.prepare(work)
    paths = br.paths(work, "run")
    br.run(work, "run", "pretrain", "--config_file", br.config("train.yaml", "pretrain.yaml"), *data, *paths,
           *br.TINY, *br.PRETRAIN)
    # the synthetic volumes all have labels: choose among them (the pool a study uses) to fine-tune on the choice
    result = br.run(work, "run", "select", "--config_file", br.config("train.yaml", "select.yaml"), *data, *paths,
                    *br.TINY, "--num_labelled", "2", "--selection_pool", "labelled_all")
    return work, data, paths, result.stdout + result.stderr


def test_select_writes_the_key_the_csv_and_the_picture(selected):
    work, _, _, log = selected
    datalist = json.loads((work / "data" / "datalist.json").read_text())
    chosen = datalist["selected_2"]
    assert len(chosen) == 2 and all(case in datalist["labelled_all"] for case in chosen)   # entries as stored
    assert {"pretrain", "labelled_all", "validation", "test", "labelled_1_0", "labelled_2_0", "contract",
            "source"} <= set(datalist)
    with open(work / "run" / "eval" / "selected_2.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["image"] for r in rows] == [c["image"] for c in datalist["labelled_all"]]   # every pool volume
    assert [r["image"] for r in sorted((r for r in rows if r["chosen"] == "1"), key=lambda r: r["pick"])] == \
        [c["image"] for c in chosen]
    assert all(float(r["distance_to_chosen"]) == 0.0 for r in rows if r["chosen"] == "1")
    assert (work / "run" / "eval" / "selected_2.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "select (kcenter)" in log   # the default rule


def test_fine_tuning_runs_on_the_selected_volumes(selected):
    work, data, _, _ = selected
    result = br.run(work, "run", "--config_file", br.config("train.yaml"), *data, *br.paths(work, "fine"), *br.TINY,
                    "--max_epochs", "1", "--iterations_per_epoch", "2", "--batch_size", "4", "--train_key",
                    "selected_2", "--pretrained_checkpoint", work / "run" / "models" / "pretrained_local.pt")
    assert "val_mean_dice" in result.stdout + result.stderr
    assert (work / "fine" / "models" / "model.pt").is_file()


def parsed_selection(work, data, paths, **overrides):
    parser = ConfigParser()
    parser.read_config([os.path.join(br.CONFIGS, "train.yaml"), os.path.join(br.CONFIGS, "select.yaml")])
    words = [*data, *paths, *br.TINY]
    parser.update({key.lstrip("-"): value for key, value in zip(words[::2], words[1::2])})
    parser.update({"encoder_channels": [4, 8, 8, 8, 8, 8], "decoder_channels": [8, 8, 8, 8, 4],
                   "selection_pool": "labelled_all", **overrides})
    return parser


def test_selection_is_deterministic(selected, tmp_path):
    work, data, paths, _ = selected
    again = parsed_selection(work, data, paths, num_labelled=2, selection_key="selected_again",
                             output_dir=str(tmp_path)).get_parsed_content("selection#run")
    datalist = json.loads((work / "data" / "datalist.json").read_text())
    assert again == datalist["selected_2"] == datalist["selected_again"]
    assert (tmp_path / "selected_again.csv").read_text() == (work / "run" / "eval" / "selected_2.csv").read_text()


def test_a_checkpoint_of_other_data_is_refused(selected, tmp_path):
    work, data, paths, _ = selected
    checkpoint = torch.load(work / "run" / "models" / "pretrained_local.pt", weights_only=True)
    checkpoint["contract"]["spacing"] = 1.5
    torch.save(checkpoint, tmp_path / "other.pt")
    parser = parsed_selection(work, data, paths, num_labelled=1, pretrained_checkpoint=str(tmp_path / "other.pt"))
    with pytest.raises(Exception) as error:
        parser.get_parsed_content("selection#run")
    assert "disagree: spacing = 3.0" in str(find_bundle_error(error.value))


def test_too_many_volumes_is_refused_before_any_embedding(selected, tmp_path):
    work, data, paths, _ = selected
    parser = parsed_selection(work, data, paths, num_labelled=5, output_dir=str(tmp_path))
    with pytest.raises(Exception) as error:   # `monai.bundle run` prints this BundleError as one ERROR line
        parser.get_parsed_content("selection#run")
    assert str(find_bundle_error(error.value)).startswith(
        "--num_labelled 5 is not between 1 and the 4 volume(s) of the pool 'labelled_all'")
    assert not os.listdir(tmp_path)


class FakeDatastore:
    """What CoverageStrategy reads of MONAI Label's Datastore: image ids, the labelled ones, each image's file."""

    def __init__(self, files: dict, labelled=()):
        self.files, self.labelled = files, set(labelled)

    def list_images(self):
        return list(self.files)

    def get_labeled_images(self):
        return sorted(self.labelled)

    def get_image_uri(self, image_id):
        return self.files[image_id]


def test_monai_label_strategy_answers_unlabelled_images_around_the_labelled_ones(selected, tmp_path):
    from scripts.active_learning import CoverageStrategy

    work, data, paths, _ = selected
    pool = json.loads((work / "data" / "datalist.json").read_text())["labelled_all"]
    files = {case["patient"]: str(work / "data" / case["image"]) for case in pool}
    checkpoint = str(work / "run" / "models" / "pretrained_local.pt")
    strategy = CoverageStrategy(os.path.join(br.ROOT, "bundle"), overrides={
        "dataset_dir": str(work / "data"), "pretrained_checkpoint": checkpoint,
        "encoder_channels": [4, 8, 8, 8, 8, 8], "decoder_channels": [8, 8, 8, 8, 4]})
    store = FakeDatastore(files)
    first = strategy({"strategy": "coverage"}, store)["id"]
    medoid = parsed_selection(work, data, paths, num_labelled=1, selection_key="selected_medoid",
                              output_dir=str(tmp_path)).get_parsed_content("selection#run")
    assert files[first] == str(work / "data" / medoid[0]["image"])   # nothing labelled: the select run's medoid
    store.labelled.add(first)
    second = strategy({"strategy": "coverage"}, store)["id"]
    assert second in files and second != first
    store.labelled.update(files)
    assert strategy({"strategy": "coverage"}, store) is None
    assert strategy.info()["description"]
