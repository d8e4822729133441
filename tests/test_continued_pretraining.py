"""Continued pre-training from a release (docs/use_pretrained.md, "Continue pre-training on your own volumes"):
``pretrain ... --init_checkpoint <release pretrained_local.pt>`` starts the global stage from the release's encoder and
the local stage from its decoder blocks 1..l, on tiny budgets with the embedded synthetic data."""

import json
import os
import re

import pytest
import torch
from monai.bundle import ConfigParser

from conftest import PRETRAIN, TINY, TINY_NETWORK, config, paths, run
from scripts.errors import BundleError
from scripts.networks import UNet2D, pretrained_prefixes


def stand_in(path, seed, contract):
    """A U-Net checkpoint as a release ships it ({"model", "contract"}), with seeded random weights."""
    torch.manual_seed(seed)
    state = UNet2D(1, contract["num_classes"], **TINY_NETWORK).state_dict()
    torch.save({"model": state, "contract": contract}, path)
    return state


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, prepared_data):
    work = tmp_path_factory.mktemp("continued")
    data = prepared_data
    contract = json.load(open(os.path.join(data[1], "datalist.json")))["contract"]
    release = work / "release_pretrained_local.pt"
    return {"work": work, "data": data, "contract": contract, "release": release,
            "release_state": stand_in(release, 1, contract)}


def parser(workspace, **overrides):
    """train.yaml + pretrain.yaml parsed in-process, on the tiny network, the synthetic data and the CPU."""
    config_parser = ConfigParser()
    config_parser.read_config(eval(config("train.yaml", "pretrain.yaml")))
    config_parser.update({"dataset_dir": workspace["data"][1], "device": "$torch.device('cpu')",
                          "init_checkpoint": str(workspace["release"]), **TINY_NETWORK, **overrides})
    return config_parser


def blocks(state, prefixes):
    return {k: v for k, v in state.items() if k.startswith(prefixes)}


def convolutions(state, prefixes):
    """The convolution kernels among ``blocks``: random draws, unlike BatchNorm's initial ones and zeros."""
    return {k: v for k, v in blocks(state, prefixes).items() if v.dim() == 4}


def test_both_stages_start_from_the_release_weights(workspace):
    release = workspace["release_state"]
    # global stage at iteration 0: the release's encoder, nothing else of it
    unet = parser(workspace).get_parsed_content("global#network").unet.state_dict()
    encoder = blocks(release, ("encoder.",))
    assert encoder and all(torch.equal(unet[k], v) for k, v in encoder.items())
    assert not any(torch.equal(unet[k], v) for k, v in convolutions(release, ("decoder.",)).items())

    # local stage at iteration 0: the encoder of the (continued) global stage, decoder blocks 1..3 of the release
    stage1 = workspace["work"] / "stage1_pretrained_global.pt"
    global_state = stand_in(stage1, 2, workspace["contract"])
    local = parser(workspace, **{"local#global_checkpoint": str(stage1)}).get_parsed_content("local#network")
    unet = local.unet.state_dict()
    assert all(torch.equal(unet[k], v) for k, v in blocks(global_state, ("encoder.",)).items())
    decoder = blocks(release, pretrained_prefixes(3)[1:])
    assert decoder and all(torch.equal(unet[k], v) for k, v in decoder.items())
    later = convolutions(release, ("decoder.3.", "decoder.4.", "out_conv."))   # not pre-trained: random
    assert later and not any(torch.equal(unet[k], v) for k, v in later.items())


def test_a_differing_contract_needs_transfer(workspace):
    other = dict(workspace["contract"], class_names=["background", "a", "b"], num_classes=3, label_values=None)
    checkpoint = workspace["work"] / "other_contract.pt"
    stand_in(checkpoint, 3, other)
    with pytest.raises(RuntimeError) as refused:   # MONAI wraps the BundleError of scripts.contract.resolve
        parser(workspace, init_checkpoint=str(checkpoint)).get_parsed_content("contract")
    assert isinstance(refused.value.__cause__, BundleError) and "pass --transfer True" in str(refused.value.__cause__)
    contract = parser(workspace, init_checkpoint=str(checkpoint), transfer=True).get_parsed_content("contract")
    assert contract["num_classes"] == workspace["contract"]["num_classes"]   # the data's contract wins


def test_continued_pretraining_runs_both_stages_with_their_stopping_rule(workspace):
    work = workspace["work"]
    result = run(work, "run", "pretrain", "--config_file", config("train.yaml", "pretrain.yaml"), *workspace["data"],
                 *paths(work, "continued"), *TINY, *PRETRAIN, "--init_checkpoint", workspace["release"])
    output = result.stdout + result.stderr
    loaded = re.findall(r"Initialised (\d+) tensors \((.*?)\) from (\S+)\.", output)
    release = str(workspace["release"])
    assert ("encoder.", release) in [(w, p) for _, w, p in loaded]   # the global stage
    assert ("encoder., decoder.0., decoder.1., decoder.2.", release) in [(w, p) for _, w, p in loaded]   # local
    for stage in ("global", "local"):
        assert (work / "continued" / "models" / f"pretrained_{stage}.pt").is_file()
        report = json.load(open(work / "continued" / "eval" / f"pretrain_{stage}_stop.json"))
        assert report["stage"] == stage and report["reason"] in ("plateau", "budget")
