"""The prepare_batch functions and the loss adapter that let SupervisedTrainer run fine-tuning and pre-training."""

import torch

from scripts.engines import AugmentedBatch, ContrastiveViews, MetadataLoss
from scripts.losses import GlobalContrastiveLoss, LocalContrastiveLoss


def _batch(b=6):
    return {"image": torch.rand(b, 1, 8, 8), "volume": torch.tensor([0, 0, 0, 1, 1, 1])[:b],
            "partition": torch.tensor([0, 1, 2, 0, 1, 2])[:b], "position": torch.linspace(0, 0.9, b)}


def test_views_are_independent_augmentations_with_shared_sample_ids():
    views, meta = ContrastiveViews(augment=lambda x: x + torch.rand(x.shape[0], 1, 1, 1), num_views=2)(_batch(), "cpu")
    assert views.shape == (12, 1, 8, 8)
    assert torch.equal(meta["sample"], torch.tensor([0, 1, 2, 3, 4, 5] * 2))
    assert torch.equal(meta["volume"], torch.tensor([0, 0, 0, 1, 1, 1] * 2))
    assert not torch.allclose(views[:6], views[6:])  # two draws, not one copied


def test_augmented_batch_augments_image_and_label_together_on_the_device():
    seen = []

    def augment(data):
        seen.append(sorted(data))
        return {"image": data["image"].flip(-1), "label": data["label"].flip(-1)}

    batch = {"image": torch.rand(3, 1, 8, 8), "label": torch.randint(0, 2, (3, 1, 8, 8)), "volume": torch.zeros(3)}
    image, label = AugmentedBatch(augment)(batch, "cpu")
    assert seen == [["image", "label"]]  # only the two keys, in one call
    assert torch.equal(image, batch["image"].flip(-1)) and torch.equal(label, batch["label"].flip(-1))


def test_channels_last_views():
    views, _ = ContrastiveViews(augment=lambda x: x, channels_last=True)(_batch(), "cpu")
    assert views.is_contiguous(memory_format=torch.channels_last)


def test_metadata_loss_passes_what_each_loss_accepts():
    _, meta = ContrastiveViews(augment=lambda x: x)(_batch(), "cpu")
    glob = MetadataLoss(GlobalContrastiveLoss(strategy="positional"))
    assert glob.keys == ("volume", "partition", "sample", "position")
    embeddings = torch.randn(12, 16)
    expected = GlobalContrastiveLoss(strategy="positional")(embeddings, meta["volume"], meta["partition"],
                                                            meta["sample"], meta["position"])
    torch.testing.assert_close(glob(embeddings, meta), expected)
    local = MetadataLoss(LocalContrastiveLoss())
    assert local.keys == ("volume", "partition", "sample")
    assert torch.isfinite(local(torch.randn(12, 4, 12, 12), meta))
