"""The reference U-Net, the projection heads, the frozen encoder of the local stage and pre-trained loading."""

import pytest
import torch

from conftest import TINY_NETWORK
from scripts.errors import BundleError
from scripts.networks import GlobalContrastiveNet, LocalContrastiveNet, UNet2D, load_pretrained, unet_shape


def test_reference_unet_shapes():
    net = UNet2D(1, 4)
    x = torch.rand(2, 1, 192, 192)
    features = net.encode(x)
    assert [tuple(f.shape[1:]) for f in features] == [
        (16, 192, 192), (32, 96, 96), (64, 48, 48), (128, 24, 24), (128, 12, 12), (128, 6, 6)
    ]
    assert net.decode(features, 3).shape == (2, 64, 48, 48)  # decoder block l = 3 (the paper's l)
    assert net(x).shape == (2, 4, 192, 192)


def test_tiny_widths_and_validation():
    net = UNet2D(1, 3, **TINY_NETWORK)
    assert net(torch.rand(1, 1, 64, 64)).shape == (1, 3, 64, 64)
    with pytest.raises(ValueError, match="decoder_channels"):
        UNet2D(1, 3, encoder_channels=(4, 8, 8), decoder_channels=(8,))
    with pytest.raises(ValueError, match="image_size"):
        GlobalContrastiveNet(net, image_size=48)
    with pytest.raises(ValueError, match="decoder_blocks"):
        LocalContrastiveNet(net, decoder_blocks=6)


def test_global_head_embeddings():
    net = GlobalContrastiveNet(UNet2D(1, 4, **TINY_NETWORK), image_size=64, hidden_features=32, out_features=16)
    assert net(torch.rand(5, 1, 64, 64)).shape == (5, 16)


def test_local_stage_freezes_encoder_weights_and_batchnorm_statistics():
    unet = UNet2D(1, 4, **TINY_NETWORK)
    local = LocalContrastiveNet(unet, decoder_blocks=3).train()
    assert not any(p.requires_grad for p in unet.encoder.parameters())
    assert all(p.requires_grad for p in unet.decoder[:3].parameters())
    assert not unet.encoder.training and unet.decoder.training
    before = {k: v.clone() for k, v in unet.encoder.state_dict().items()}
    out = local(torch.rand(4, 1, 64, 64))
    assert out.shape == (4, 8, 16, 16)
    out.square().mean().backward()
    for k, v in unet.encoder.state_dict().items():
        assert torch.equal(v, before[k]), f"encoder state {k} changed"
    assert all(p.grad is None for p in unet.encoder.parameters())


def test_load_pretrained_copies_encoder_and_first_decoder_blocks_only(tmp_path):
    source = UNet2D(1, 4, **TINY_NETWORK)
    with torch.no_grad():
        for p in source.parameters():
            p.fill_(0.5)
    source.encoder[0][1].running_mean.fill_(3.0)
    path = tmp_path / "pretrained.pt"
    torch.save(source.state_dict(), path)
    target = UNet2D(1, 4, **TINY_NETWORK)
    untouched = {k: v.clone() for k, v in target.state_dict().items()}
    load_pretrained(target, str(path), decoder_blocks=2)
    state = target.state_dict()
    for k, v in state.items():
        if k.startswith(("encoder.", "decoder.0.", "decoder.1.")):
            assert torch.equal(v, source.state_dict()[k]), k
        else:
            assert torch.equal(v, untouched[k]), k
    assert torch.all(state["encoder.0.1.running_mean"] == 3.0)  # BatchNorm statistics come along


def test_load_pretrained_errors_and_random_init(tmp_path):
    net = UNet2D(1, 4, **TINY_NETWORK)
    assert load_pretrained(net, None) is net
    other = tmp_path / "other.pt"
    torch.save(UNet2D(1, 4).state_dict(), other)  # reference widths: shapes differ
    with pytest.raises(ValueError, match="shaped unlike"):
        load_pretrained(net, str(other))
    empty = tmp_path / "empty.pt"
    torch.save({"out_conv.weight": torch.zeros(1)}, empty)
    with pytest.raises(ValueError, match="no encoder weights"):
        load_pretrained(net, str(empty))
    with pytest.raises(FileNotFoundError, match="missing.pt not found: run the pre-training"):
        load_pretrained(net, str(tmp_path / "missing.pt"))


def test_torchscript_matches_eager():
    net = UNet2D(1, 4, **TINY_NETWORK).eval()
    x = torch.rand(2, 1, 64, 64)
    torch.testing.assert_close(torch.jit.script(net)(x), net(x))


def test_global_head_batch_norm_option():
    unet = UNet2D(1, 4, **TINY_NETWORK)
    paper = GlobalContrastiveNet(unet, image_size=64, hidden_features=32, out_features=16)
    batch = GlobalContrastiveNet(unet, image_size=64, hidden_features=32, out_features=16, head_norm="batch")
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in paper.head.modules())
    assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in batch.head.modules()) == 1
    assert batch(torch.rand(4, 1, 64, 64)).shape == (4, 16)
    with pytest.raises(ValueError, match="norm"):
        GlobalContrastiveNet(unet, image_size=64, head_norm="layer")
    with pytest.raises(ValueError, match="init"):
        GlobalContrastiveNet(unet, image_size=64, head_init="xavier")
    torch_init = GlobalContrastiveNet(unet, image_size=64, hidden_features=32, out_features=16, head_init="torch")
    assert torch_init.head.mlp[1].weight.std() < paper.head.mlp[1].weight.std()  # a third of the He variance


def test_unet_shape_reads_the_channels_of_a_checkpoint(tmp_path):
    """inference.yaml builds its network from unet_shape: the checkpoint's channel lists, else the reference ones."""
    reference = {"encoder_channels": [16, 32, 64, 128, 128, 128], "decoder_channels": [128, 128, 64, 32, 16]}
    assert unet_shape(None) == unet_shape(str(tmp_path / "missing.pt")) == reference
    tiny = {"encoder_channels": [4, 8, 8, 16], "decoder_channels": [8, 8, 4]}
    torch.save({"model": UNet2D(1, 3, **tiny).state_dict(), "contract": {}}, tmp_path / "tiny.pt")
    assert unet_shape(str(tmp_path / "tiny.pt")) == tiny
    torch.save(UNet2D(1, 4).state_dict(), tmp_path / "plain.pt")   # a bare state_dict
    assert unet_shape(str(tmp_path / "plain.pt")) == reference
    torch.save({"model": {"head.weight": torch.zeros(2, 2)}}, tmp_path / "other.pt")
    with pytest.raises(BundleError, match="not a UNet2D"):
        unet_shape(str(tmp_path / "other.pt"))
