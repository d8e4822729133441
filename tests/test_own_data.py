"""A user's own data as it comes: a few labelled volumes, many unlabelled ones, no research split.

``prepare_folder``'s split (prepare.yaml ``folder#split``): one validation patient, no test split, no labelled
subsets; every image outside validation serves pre-training; the unlabelled ones are what ``select`` chooses from;
preparing again after labelling more volumes keeps the validation patient.
"""

from __future__ import annotations

import json
import os
import shlex

import nibabel as nib
import numpy as np
import pytest

from conftest import BUNDLE, PRETRAIN, ROOT, TINY, config, paths, run, write_nifti
from scripts.data import split_patients
from scripts.errors import BundleError

SPACING = (1.0, 1.0, 3.0)


def _cases(labelled: int, unlabelled: int) -> list[dict]:
    cases = [{"image": f"img{i:03d}.nii.gz", "patient": f"p{i:03d}", "label": f"lab{i:03d}.nii.gz"}
             for i in range(labelled)]
    return cases + [{"image": f"img{i:03d}.nii.gz", "patient": f"p{i:03d}"}
                    for i in range(labelled, labelled + unlabelled)]


def test_few_labels_split_keeps_every_other_image_for_pretraining():
    datalist = split_patients(_cases(3, 50), num_validation=1, num_test=0, subset_sizes=[], num_subsets=[], seed=0)
    validation = {c["image"] for c in datalist["validation"]}
    assert len(validation) == 1 and datalist["test"] == []
    assert {c["image"] for c in datalist["pretrain"]} == {c["image"] for c in _cases(3, 50)} - validation
    assert len(datalist["labelled_all"]) == 2 and len(datalist["unlabelled"]) == 50
    assert all("label" not in c for c in datalist["unlabelled"])
    assert not [k for k in datalist if k.startswith("labelled_") and k != "labelled_all"]


def test_preparing_again_after_labelling_keeps_validation_and_test():
    first = split_patients(_cases(4, 50), 1, 1, [], [], seed=0)
    keep = {c["patient"]: role for role in ("validation", "test") for c in first[role]}
    grown = split_patients(_cases(9, 45), 1, 1, [], [], seed=0, keep=keep)
    for role in ("validation", "test"):
        assert grown[role] == first[role]
    assert len(grown["labelled_all"]) == 7


@pytest.mark.parametrize("labelled, num_test", [(1, 0), (2, 1)])
def test_too_few_labels_is_one_line_that_says_what_to_do(labelled, num_test):
    with pytest.raises(BundleError, match="label more volumes, or lower the split's num_validation") as error:
        split_patients(_cases(labelled, 5), 1, num_test, [], [], seed=0)
    assert "\n" not in str(error.value)


def _folder(root, labelled: int, unlabelled: int):
    """``prepare_folder``'s default layout: images/<id>.nii.gz, labels/<id>.nii.gz for the labelled ones."""
    rng = np.random.default_rng(0)
    for i in range(labelled + unlabelled):
        label = np.zeros((20, 18, 8), np.uint8)
        label[5 + i % 3 : 12, 4:13] = 1
        label[8:11, 6 : 9 + i % 2] = 2
        write_nifti(root / "images" / f"case{i:03d}.nii.gz", (rng.random(label.shape) + label).astype(np.float32),
                    spacing=SPACING)
        if i < labelled:
            write_nifti(root / "labels" / f"case{i:03d}.nii.gz", label, spacing=SPACING)
    return root


@pytest.fixture(scope="module")
def own_data(tmp_path_factory):
    """3 labelled + 50 unlabelled volumes prepared by ``prepare_folder`` with no split option."""
    work = tmp_path_factory.mktemp("own")
    raw = _folder(work / "raw", 3, 50)
    data = work / "data"
    result = run(work, "run", "prepare_folder", "--config_file", config("train.yaml", "prepare.yaml"),
                 "--raw_dir", raw, "--dataset_dir", data, "--image_size", "32", "--spacing", "1.0",
                 "--cache_workers", "0", env={"PYTHONPATH": str(BUNDLE)})
    with open(data / "datalist.json") as f:
        return work, data, json.load(f), result.stdout + result.stderr


def test_prepare_folder_takes_few_labels_without_overrides(own_data):
    _, _, datalist, log = own_data
    images = {f"case{i:03d}.nii.gz" for i in range(53)}
    validation = {c["image"].rsplit("/", 1)[-1] for c in datalist["validation"]}
    assert len(validation) == 1 and datalist["test"] == []
    assert {c["image"].rsplit("/", 1)[-1] for c in datalist["pretrain"]} == images - validation
    assert len(datalist["labelled_all"]) == 2 and len(datalist["unlabelled"]) == 50
    assert "case052.nii.gz: no label matching 'labels/*.nii.gz'" in log   # each label-less image named in the log


def test_select_chooses_among_unlabelled_volumes_by_default(own_data):
    work, data, datalist, _ = own_data
    common = ["--dataset_dir", data, *paths(work, "pre"), *TINY]
    run(work, "run", "pretrain", "--config_file", config("train.yaml", "pretrain.yaml"), *common, *PRETRAIN)
    run(work, "run", "select", "--config_file", config("train.yaml", "select.yaml"), *common, "--num_labelled", "2")
    with open(data / "datalist.json") as f:
        chosen = {c["image"] for c in json.load(f)["selected_2"]}
    assert len(chosen) == 2 and chosen <= {c["image"] for c in datalist["unlabelled"]}


def test_one_labelled_volume_is_refused_in_one_line(tmp_path):
    raw = _folder(tmp_path / "raw", 1, 4)
    result = run(tmp_path, "run", "prepare_folder", "--config_file", config("train.yaml", "prepare.yaml"),
                 "--raw_dir", raw, "--dataset_dir", tmp_path / "data", "--image_size", "16", "--cache_workers", "0",
                 expect=None)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ERROR: cannot split 1 labelled patients") and "label more volumes" in last
    assert not (tmp_path / "data" / "datalist.json").exists()


# ---------------------------------------------------------------- the journey of docs/own_data.md, on real MRI
SHARED_HIPPOCAMPUS = ROOT.parent / "shared" / "data" / "Task04_Hippocampus"
JOURNEY = ROOT / "docs" / "own_data.md"


def journey_commands(variables: dict) -> list[list[str]]:
    """The ``monai.bundle`` commands of docs/own_data.md's first bash block, continuation lines joined, the shell
    variables it sets replaced by ``variables``; each as the words after ``python -m monai.bundle``."""
    text = JOURNEY.read_text().split("```bash\n", 1)[1].split("```", 1)[0].replace("\\\n", " ")
    commands = []
    for line in text.splitlines():
        if line.startswith("python -m monai.bundle"):
            for name, value in variables.items():
                line = line.replace(f"${name}", str(value))
            commands.append(shlex.split(line)[3:])
    return commands


@pytest.mark.realdata
def test_the_own_data_journey_on_hippocampus_mri(tmp_path):
    """docs/own_data.md's commands as written, with tiny budgets, on Task04_Hippocampus cut down to 3 labelled
    volumes + 101 unlabelled: prepare, pre-training continued from the committed release, select among the
    unlabelled, label the chosen two (their real labels copied in) and prepare again, fine-tune, segment them all."""
    if not SHARED_HIPPOCAMPUS.is_dir():
        pytest.skip(f"the shared hippocampus data is not at {SHARED_HIPPOCAMPUS}")
    raw, mine = tmp_path / "raw", tmp_path / "mine"
    (raw / "images").mkdir(parents=True)
    (raw / "labels").mkdir()
    images = sorted((SHARED_HIPPOCAMPUS / "imagesTr").glob("*.nii.gz"))
    for i, image in enumerate(images):
        (raw / "images" / image.name).symlink_to(image)
        if i < 3:
            (raw / "labels" / image.name).symlink_to(SHARED_HIPPOCAMPUS / "labelsTr" / image.name)
    prepare, pretrain, select, finetune, segment = journey_commands(
        {"C": "bundle/configs", "RAW": raw, "MINE": mine})
    tiny = {"pretrain": PRETRAIN, "select": [], "finetune": ["--max_epochs", "2", "--iterations_per_epoch", "2",
                                                             "--batch_size", "4"]}
    run(ROOT, *prepare, "--cache_workers", "0", timeout=600)
    first = json.loads((mine / "datalist.json").read_text())
    assert len(first["labelled_all"]) == 2 and len(first["unlabelled"]) == len(images) - 3
    run(ROOT, *pretrain, *tiny["pretrain"], timeout=900)
    run(ROOT, *select, timeout=600)
    chosen = json.loads((mine / "datalist.json").read_text())["selected_2"]
    assert len(chosen) == 2 and all(case in first["unlabelled"] for case in chosen)
    for case in chosen:   # the user labels them
        name = os.path.basename(case["image"])
        (raw / "labels" / name).symlink_to(SHARED_HIPPOCAMPUS / "labelsTr" / name)
    run(ROOT, *prepare, "--cache_workers", "0", timeout=600)
    second = json.loads((mine / "datalist.json").read_text())
    assert second["validation"] == first["validation"] and len(second["labelled_all"]) == 4
    run(ROOT, *finetune, *tiny["finetune"], timeout=900)
    run(ROOT, *segment, timeout=900)
    outputs = sorted((mine / "seg").glob("*_seg.nii.gz"))
    assert len(outputs) == len(images)
    assert set(np.unique(np.asarray(nib.load(outputs[0]).dataobj)).tolist()) <= {0, 1, 2}


def test_a_file_in_the_way_of_a_folder_is_one_line_naming_it(tmp_path):
    """Between two steps a folder the next step writes into became a file: one line naming it, no traceback."""
    raw = _folder(tmp_path / "raw", 3, 2)
    (tmp_path / "in_the_way").write_text("not a folder")
    result = run(tmp_path, "run", "prepare_folder", "--config_file", config("train.yaml", "prepare.yaml"),
                 "--raw_dir", raw, "--dataset_dir", tmp_path / "in_the_way", "--image_size", "32",
                 "--cache_workers", "0", expect=None)
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode != 0 and last.startswith(f"ERROR: {tmp_path / 'in_the_way'}")
    assert "(check the path" in last and "Traceback" not in result.stderr


def test_evaluation_without_a_test_split_is_one_line(tmp_path):
    """The folder split has no test volumes by default: evaluating on them says so in one line (MONAI's reader
    raised an IndexError on an empty 'test' list)."""
    from scripts.data import load_datalist

    path = tmp_path / "datalist.json"
    path.write_text(json.dumps({"test": [], "unlabelled": []}))
    with pytest.raises(BundleError, match=r"'test' holds no volume: .*--folder#split#num_test N"):
        load_datalist(str(path), "test", require_label=True)
    assert load_datalist(str(path), "unlabelled") == []
