"""Run an exported network (TorchScript ``.ts`` or ONNX ``.onnx``) where the configs expect the PyTorch U-Net.

``configs/inference_exported.yaml`` uses ``load_exported`` as its ``network``, so an exported model goes through the
same pre-processing, ``SliceInferer`` and post-processing as ``models/model.pt`` in ``inference.yaml``. The exports
themselves are MONAI's: ``python -m monai.bundle ckpt_export`` (TorchScript) and ``onnx_export`` (ONNX, with a
dynamic batch axis); the model card lists both commands.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from scripts.errors import BundleError, MissingFileError


class OnnxNetwork(nn.Module):
    """An ONNX model run by onnxruntime behind the ``nn.Module`` interface of the U-Net.

    forward(x (B, C_in, H, W) float tensor) -> logits (B, num_classes, H, W) float32 tensor on ``x``'s device.
    The model's first input takes ``x``; its first output is returned. The batch axis must be dynamic when the
    inferer batches slices (``onnx_export ... --converter_kwargs "{'dynamic_axes': ...}"``, see the model card).
    """

    def __init__(self, path: str, providers: list[str] | None = None):
        super().__init__()
        try:
            import onnxruntime
        except ImportError:
            raise BundleError(f"{path}: running an ONNX model needs onnxruntime (pip install onnxruntime).") from None
        self.path = path
        self.session = onnxruntime.InferenceSession(path, providers=providers or ["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        array = torch.as_tensor(x).detach().cpu().float().numpy()
        logits = self.session.run(None, {self.input_name: array})[0]
        return torch.from_numpy(logits).to(x.device)


def load_exported(path: str, device: str | torch.device = "cpu") -> nn.Module:
    """The exported network at ``path``: ``.ts`` / ``.pt`` via ``torch.jit.load``, ``.onnx`` via onnxruntime.

    Raises ``MissingFileError`` when the file does not exist and ``BundleError`` for another suffix.
    """
    if not os.path.isfile(path):
        raise MissingFileError(
            f"exported model {path} not found: export it first (ckpt_export for TorchScript, onnx_export for ONNX; "
            "the model card's command list) or point --exported_model at it."
        )
    if path.endswith(".onnx"):
        return OnnxNetwork(path)
    if path.endswith((".ts", ".pt")):
        return torch.jit.load(path, map_location=device)
    raise BundleError(f"exported model {path}: unknown format (expected a .ts TorchScript or an .onnx ONNX file).")
