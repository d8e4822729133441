"""The reference 2D U-Net of Chaitanya et al. (2020) and the projection heads used for pre-training.

Shapes: images are (B, C_in, H, W) with H and W divisible by 2 ** (levels - 1) (32 for the 6-level default).

- ``UNet2D``: encoder of ``len(encoder_channels)`` levels (two [3x3 conv, BN, ReLU] each, 2x2 max-pool between
  levels) and a decoder of ``len(encoder_channels) - 1`` blocks (x2 nearest upsampling, 2x2 conv, concatenate the
  encoder skip, two [3x3 conv, BN, ReLU]); a 1x1 output convolution gives the class logits.
- ``GlobalProjectionHead`` (g1): flattened bottleneck -> FC hidden [+ BN] + ReLU -> FC out.
- ``LocalProjectionHead`` (g2): 1x1 conv + BN + ReLU -> 1x1 conv, keeping the channel count.
- ``GlobalContrastiveNet`` / ``LocalContrastiveNet``: the U-Net parts each pre-training stage trains, plus its head.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from scripts.contract import check_checkpoint
from scripts.errors import BundleError, MissingFileError
from scripts.files import safe_load

logger = logging.getLogger(__name__)

REFERENCE_ENCODER_CHANNELS = (16, 32, 64, 128, 128, 128)
REFERENCE_DECODER_CHANNELS = (128, 128, 64, 32, 16)


def he_normal_init(module: nn.Module) -> None:
    """He-normal weights and zero biases for every conv and linear layer of ``module`` (the reference init)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class ConvBlock(nn.Sequential):
    """Two [3x3 conv -> BN -> ReLU]: (B, in_channels, H, W) -> (B, out_channels, H, W)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class UpBlock(nn.Module):
    """x2 nearest upsampling -> 2x2 conv -> concat skip -> ConvBlock.

    forward(x (B, in_channels, h, w), skip (B, skip_channels, 2h, 2w)) -> (B, out_channels, 2h, 2w)
    """

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int):
        super().__init__()
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.up_conv = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(in_channels, out_channels, 2))  # "same" 2x2
        self.conv = ConvBlock(out_channels + skip_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([self.up_conv(self.up(x)), skip], dim=1))


class UNet2D(nn.Module):
    """The reference U-Net (6 encoder levels, 5 decoder blocks by default).

    Args:
        in_channels: image channels.
        out_channels: number of classes (background included); the output is logits.
        encoder_channels: channels of each encoder level (the last one is the bottleneck).
        decoder_channels: channels of each decoder block, ``len(encoder_channels) - 1`` of them.

    Example:
        >>> net = UNet2D(1, 4)
        >>> net(torch.rand(2, 1, 192, 192)).shape
        torch.Size([2, 4, 192, 192])
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 4,
        encoder_channels: Sequence[int] = REFERENCE_ENCODER_CHANNELS,
        decoder_channels: Sequence[int] = REFERENCE_DECODER_CHANNELS,
    ):
        super().__init__()
        encoder_channels, decoder_channels = tuple(encoder_channels), tuple(decoder_channels)
        if len(encoder_channels) < 2:
            raise ValueError(f"encoder_channels needs at least 2 levels, got {encoder_channels}.")
        if len(decoder_channels) != len(encoder_channels) - 1:
            raise ValueError(
                f"decoder_channels must have len(encoder_channels) - 1 = {len(encoder_channels) - 1} entries, "
                f"got {decoder_channels}."
            )
        self.in_channels, self.out_channels = in_channels, out_channels
        self.encoder_channels, self.decoder_channels = encoder_channels, decoder_channels
        self.pool = nn.MaxPool2d(2)
        self.encoder = nn.ModuleList(
            ConvBlock(c_in, c_out) for c_in, c_out in zip((in_channels,) + encoder_channels[:-1], encoder_channels)
        )
        skips = encoder_channels[-2::-1]  # skip channels seen by decoder blocks 1, 2, ...
        self.decoder = nn.ModuleList(
            UpBlock(c_in, c_skip, c_out)
            for c_in, c_skip, c_out in zip((encoder_channels[-1],) + decoder_channels[:-1], skips, decoder_channels)
        )
        self.out_conv = nn.Conv2d(decoder_channels[-1], out_channels, 1)
        self.downsampling = 2 ** (len(encoder_channels) - 1)  # the input size must be a multiple of it
        he_normal_init(self)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, C_in, H, W) -> features of every encoder level; the last is the bottleneck (B, C, H/f, W/f)."""
        features = []
        for level, block in enumerate(self.encoder):
            x = block(x if level == 0 else self.pool(x))
            features.append(x)
        return features

    def decode(self, features: list[torch.Tensor], num_blocks: int | None = None) -> torch.Tensor:
        """Run the first ``num_blocks`` decoder blocks (all by default) on the encoder ``features``.

        Block l outputs ``decoder_channels[l-1]`` channels at 1 / 2 ** (levels - 1 - l) of the input size.
        """
        num_blocks = len(self.decoder) if num_blocks is None else num_blocks
        x = features[-1]
        for i, block in enumerate(self.decoder):
            if i < num_blocks:
                x = block(x, features[-2 - i])
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> logits (B, out_channels, H, W)."""
        return self.out_conv(self.decode(self.encode(x)))


class GlobalProjectionHead(nn.Module):
    """g1: (B, C, h, w) bottleneck -> flatten -> FC ``hidden`` [+ BN] + ReLU -> FC ``out_features`` [+ BN]
    = (B, out_features).

    ``norm``: "none" (the paper's g1); "batch" (BatchNorm1d after the hidden layer, as SimCLR's projection head); or
    "batch_all" (also a BatchNorm1d without affine parameters on the output, as SimCLR v2's head): the embeddings are
    centred over the batch, so they cannot all point the same way (a collapse the paper's g1 falls into at first).
    ``init``: "he_normal" (the reference: He-normal weights, zero biases) or "torch" (PyTorch's default for
    ``nn.Linear``, uniform with a third of the He variance).
    """

    def __init__(self, in_features: int, hidden_features: int = 1024, out_features: int = 128, norm: str = "none",
                 init: str = "he_normal"):
        super().__init__()
        if norm not in ("none", "batch", "batch_all") or init not in ("he_normal", "torch"):
            raise ValueError(f"norm must be 'none', 'batch' or 'batch_all' and init 'he_normal' or 'torch', got "
                             f"{norm!r}, {init!r}.")
        hidden = [nn.Linear(in_features, hidden_features, bias=norm == "none")]
        if norm != "none":
            hidden.append(nn.BatchNorm1d(hidden_features))
        output = [nn.Linear(hidden_features, out_features, bias=norm != "batch_all")]
        if norm == "batch_all":
            output.append(nn.BatchNorm1d(out_features, affine=False))
        self.mlp = nn.Sequential(nn.Flatten(), *hidden, nn.ReLU(inplace=True), *output)
        if init == "he_normal":
            he_normal_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class LocalProjectionHead(nn.Module):
    """g2: (B, C, H, W) -> 1x1 conv + BN + ReLU -> 1x1 conv -> (B, C, H, W)."""

    def __init__(self, channels: int):
        super().__init__()
        self.proj = nn.Sequential(
            nn.Conv2d(channels, channels, 1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 1),
        )
        he_normal_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class GlobalContrastiveNet(nn.Module):
    """Stage 1: encoder e + g1. forward((B, C_in, H, W)) -> embeddings (B, out_features).

    Args:
        unet: the U-Net whose encoder is trained (its decoder is left untouched).
        image_size: side of the square input slices; fixes the flattened bottleneck size.
        hidden_features / out_features: g1 widths (paper: 1024 / 128).
        head_norm / head_init: g1's normalisation ("none", the paper, "batch" or "batch_all") and initialisation
            ("he_normal", the reference, or "torch"); see ``GlobalProjectionHead``.
    """

    def __init__(self, unet: UNet2D, image_size: int, hidden_features: int = 1024, out_features: int = 128,
                 head_norm: str = "none", head_init: str = "he_normal"):
        super().__init__()
        if image_size % unet.downsampling:
            raise ValueError(f"image_size must be a multiple of {unet.downsampling}, got {image_size}.")
        side = image_size // unet.downsampling
        self.unet = unet
        self.head = GlobalProjectionHead(unet.encoder_channels[-1] * side * side, hidden_features, out_features,
                                         head_norm, head_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.unet.encode(x)[-1])


class LocalContrastiveNet(nn.Module):
    """Stage 2: frozen encoder e, trainable decoder blocks d_1..d_l + g2.

    forward((B, C_in, H, W)) -> projected feature maps (B, decoder_channels[l-1], H / 2**(levels-1-l), W / ...).
    The encoder's weights get no gradient and its BatchNorm layers stay in eval mode (running statistics frozen)
    whatever ``train()`` is called with.
    """

    def __init__(self, unet: UNet2D, decoder_blocks: int = 3):
        super().__init__()
        if not 1 <= decoder_blocks <= len(unet.decoder):
            raise ValueError(f"decoder_blocks must be in [1, {len(unet.decoder)}], got {decoder_blocks}.")
        self.unet = unet
        self.decoder_blocks = decoder_blocks
        self.head = LocalProjectionHead(unet.decoder_channels[decoder_blocks - 1])
        unet.encoder.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True) -> LocalContrastiveNet:
        super().train(mode)
        self.unet.encoder.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            features = self.unet.encode(x)
        return self.head(self.unet.decode(features, self.decoder_blocks))


def unet_shape(checkpoint: str | None = None) -> dict[str, list[int]]:
    """The channel lists of the ``UNet2D`` saved in ``checkpoint``, as its ``encoder_channels`` / ``decoder_channels``
    arguments: ``{"encoder_channels": [C_0, ...], "decoder_channels": [D_1, ...]}``, read from the shapes of its
    weights (``encoder.<i>.0.weight``: (C_i, C_in, 3, 3); ``decoder.<j>.conv.0.weight``: (D_j+1, ., 3, 3)).

    ``checkpoint``: a U-Net state_dict or a dict holding one under "model" (loaded with ``weights_only=True``). No
    file (None, "", or a bundle without its weights yet): the reference U-Net's, the shape of the weights the bundle
    ships (``REFERENCE_ENCODER_CHANNELS`` / ``REFERENCE_DECODER_CHANNELS``).
    """
    if not checkpoint or not os.path.isfile(checkpoint):
        return {"encoder_channels": list(REFERENCE_ENCODER_CHANNELS),
                "decoder_channels": list(REFERENCE_DECODER_CHANNELS)}
    loaded = safe_load(checkpoint)
    state = loaded.get("model", loaded)

    def channels(pattern: str) -> list[int]:
        found = {int(m.group(1)): int(v.shape[0]) for k, v in state.items() if (m := re.fullmatch(pattern, k))}
        return [found[i] for i in range(len(found))] if sorted(found) == list(range(len(found))) else []

    encoder, decoder = channels(r"encoder\.(\d+)\.0\.weight"), channels(r"decoder\.(\d+)\.conv\.0\.weight")
    if len(encoder) < 2 or len(decoder) != len(encoder) - 1:
        raise BundleError(f"{checkpoint}: not a UNet2D state_dict (no encoder.<i>.0.weight / "
                          "decoder.<j>.conv.0.weight of matching counts).")
    return {"encoder_channels": encoder, "decoder_channels": decoder}


def pretrained_prefixes(decoder_blocks: int) -> tuple[str, ...]:
    """State-dict key prefixes of the parts pre-training produces: the encoder and decoder blocks 1..l."""
    return ("encoder.",) + tuple(f"decoder.{i}." for i in range(decoder_blocks))


def load_pretrained(
    network: UNet2D, checkpoint: str | None, decoder_blocks: int = 0, contract: Mapping | None = None
) -> UNet2D:
    """Initialise the encoder and the first ``decoder_blocks`` decoder blocks of ``network`` from ``checkpoint``.

    ``checkpoint`` is a U-Net state_dict (or a dict holding one under "model"), loaded with ``weights_only=True``;
    weights and BatchNorm statistics are copied, every other layer keeps its random initialisation. ``None`` or
    an empty string leaves the network untouched (training from random initialisation). With ``contract``, a
    checkpoint whose data contract has other pre-processing is refused. Returns ``network``.
    """
    if not checkpoint:
        logger.info("No pre-trained checkpoint: the network starts from random initialisation.")
        return network
    if not os.path.isfile(checkpoint):
        raise MissingFileError(
            f"pre-trained checkpoint {checkpoint} not found: run the pre-training (pretrain.yaml) first, point "
            "pretrained_checkpoint at it, or fine-tune from random initialisation with --use_pretrained False."
        )
    loaded = safe_load(checkpoint)
    if contract is not None:
        check_checkpoint(loaded, checkpoint, contract)
    state = loaded.get("model", loaded)
    prefixes = pretrained_prefixes(decoder_blocks)
    selected = {k: v for k, v in state.items() if k.startswith(prefixes)}
    if not any(k.startswith("encoder.") for k in selected):
        raise BundleError(f"{checkpoint}: no encoder weights found (expected keys starting with 'encoder.').")
    own = network.state_dict()
    mismatched = [k for k, v in selected.items() if k not in own or own[k].shape != v.shape]
    if mismatched:
        raise BundleError(f"{checkpoint}: keys missing in or shaped unlike the network: {mismatched[:5]} (another "
                          "architecture: set encoder_channels / decoder_channels as the checkpoint was trained)")
    network.load_state_dict(selected, strict=False)
    logger.info(f"Initialised {len(selected)} tensors ({', '.join(prefixes)}) from {checkpoint}.")
    return network
