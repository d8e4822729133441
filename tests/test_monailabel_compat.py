"""What MONAI Label hands our pre-processing (the server itself: tests/monailabel_server, `make test-monailabel`).

MONAI Label's inference request dict carries "image_path" (a str) beside "image"; monai 1.6's Spacingd tries to
``.update()`` every "image_*" entry after resampling a NIfTI file. ``InPlaneSpacingd`` must leave it alone."""

import numpy as np
import torch

from conftest import write_nifti
from scripts.transforms import preprocessing


def test_preprocessing_keeps_monai_label_request_entries(tmp_path):
    path = str(tmp_path / "volume.nii.gz")
    data = np.random.RandomState(0).rand(40, 36, 6).astype(np.float32)
    write_nifti(path, data, spacing=(1.5, 1.5, 10.0))
    transform = preprocessing(keys=["image"], image_size=32, spacing=3.0)

    served = transform({"image": path, "image_path": path, "model": "bundle"})
    plain = transform({"image": path})

    assert served["image_path"] == path and served["model"] == "bundle"
    assert served["image"].shape == (1, 32, 32, 6)
    assert torch.equal(served["image"], plain["image"])
    restored = transform.inverse({"image": served["image"]})["image"]  # what Invertd does with the prediction
    assert restored.shape == (1, 40, 36, 6)
