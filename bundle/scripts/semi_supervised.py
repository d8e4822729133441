"""Semi-supervised fine-tuning on MONAI's ``SupervisedTrainer``: Mixup of the labelled batch, and weak-to-strong
consistency on an unlabelled stream (UniMatch-like).

- ``MixupBatch`` (``prepare_batch``, train.yaml ``mixup_alpha``): the fine-tuning batch as ``AugmentedBatch`` gives
  it, then each slice and its one-hot label mixed with a random partner of the same batch, λ ~ Beta(α, α) per slice.
  α = 0 returns the batch untouched (today's fine-tuning, bit for bit).
- ``ConsistencyStep`` (the trainer's ``iteration_update``, overlay ``consistency.yaml``): each step takes the labelled
  batch of the trainer's loader and a batch of unlabelled slices from a second loader; the unlabelled slices get the
  fine-tuning's spatial augmentation (weak view) and, on top of it, an intensity perturbation and CutMix (strong
  view); one forward pass of the network sees [labelled, weak, strong, weak again with channel dropout on the
  encoder features the decoder reads (UniMatch's feature perturbation)]. Loss = the supervised loss + ``weight`` x
  the consistency loss between the confident argmax of the weak view and the strong / feature-perturbed
  predictions (``consistency_loss``).

Every random draw of these steps comes from torch's global generator (CPU) or from the fine-tuning augmentation's
RandomState (the weak view shares it), both of which ``TrainingState`` saves: a run resumed at an epoch boundary
repeats an uninterrupted one. The unlabelled loader starts a fresh pass at every epoch (its sampler draws
``iterations_per_epoch`` batches), so it carries no state across epochs either.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from monai.engines.utils import IterationEvents
from monai.utils.enums import CommonKeys as Keys
from torch.utils.data import RandomSampler

from scripts.distributed import rank_and_world_size
from scripts.errors import BundleError

__all__ = ["mixup", "MixupBatch", "image_view", "StrongPerturbation", "consistency_loss", "masked_dice_ce",
           "unlabelled_sampler", "ConsistencyStep"]

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------- Mixup
def mixup(images: torch.Tensor, onehot: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix each slice with a random partner of the batch: ``λ x_i + (1 - λ) x_p(i)`` for image and one-hot label,
    λ ~ Beta(α, α) drawn per slice, p a random permutation (torch's global generator).

    Args:
        images: (B, C, H, W) float.
        onehot: (B, K, H, W) one-hot labels (any float dtype); each pixel's classes sum to 1, and so do the mixed
            ones (λ + 1 - λ).
        alpha: α > 0.

    Returns:
        (mixed images (B, C, H, W), mixed labels (B, K, H, W)) in the inputs' dtypes.
    """
    if alpha <= 0:
        raise ValueError(f"mixup needs alpha > 0, got {alpha}.")
    b = images.shape[0]
    lam = torch.distributions.Beta(float(alpha), float(alpha)).sample((b,))
    partner = torch.randperm(b)
    lam, partner = lam.to(images.device), partner.to(images.device)
    shape = (b,) + (1,) * (images.ndim - 1)
    weight = lam.view(shape)
    mixed_images = weight * images + (1 - weight) * images[partner]
    mixed_labels = weight * onehot + (1 - weight) * onehot[partner]
    return mixed_images.to(images.dtype), mixed_labels.to(onehot.dtype)


class MixupBatch:
    """``prepare_batch`` for fine-tuning with Mixup (Zhang et al. 2018, applied to segmentation: image and one-hot
    label mixed alike).

    Args:
        batch: the ``prepare_batch`` giving (image (B, C, H, W), label (B, 1, H, W) class indices), e.g.
            ``AugmentedBatch``.
        alpha: α of λ ~ Beta(α, α); 0 (or less): off, the batch is returned as ``batch`` gives it, with no draw.
        num_classes: K, for the one-hot labels.

    Call: ``(batchdata, device, non_blocking) -> (image, label)``; with Mixup the label is (B, K, H, W) float (the loss
    must then take soft one-hot targets: train.yaml's ``to_onehot_y`` is false whenever ``mixup_alpha`` > 0).
    """

    def __init__(self, batch: Callable, alpha: float = 0.0, num_classes: int | None = None):
        if alpha > 0 and not num_classes:
            raise ValueError("Mixup needs num_classes.")
        self.batch, self.alpha, self.num_classes = batch, float(alpha), num_classes

    def __call__(self, batchdata, device=None, non_blocking: bool = False, **kwargs):
        image, label = self.batch(batchdata, device, non_blocking, **kwargs)
        if self.alpha <= 0:
            return image, label
        if int(label.max()) >= self.num_classes:
            raise BundleError(f"Mixup: a label value {int(label.max())} >= num_classes {self.num_classes} (ignored "
                              "voxels of pseudo-labels?): Mixup needs every voxel labelled.")
        onehot = F.one_hot(label[:, 0].long(), self.num_classes).permute(0, 3, 1, 2).to(image.dtype)
        return mixup(image, onehot, self.alpha)


# ---------------------------------------------------------------- views of the unlabelled slices
def image_view(augmentation, key: str = "image"):
    """The weak view: the fine-tuning's spatial augmentation (``RandSpatialAugmentd`` inside ``augmentation``, a
    ``Compose``) for ``key`` alone, drawing from the same RandomState (so ``TrainingState`` saves its draws with the
    augmentation's). Call: ``{key: (U, C, H, W)} -> {key: augmented}``."""
    from scripts.transforms import RandSpatialAugmentd

    found = [t for t in getattr(augmentation, "transforms", [augmentation]) if isinstance(t, RandSpatialAugmentd)]
    if len(found) != 1 or key not in found[0].keys:
        raise BundleError(f"the weak view needs one RandSpatialAugmentd with key '{key}' in train#augmentation.")
    original = found[0]
    view = copy.copy(original)  # a shallow copy: ``R`` is the very same RandomState object
    view.keys, view.mode = (key,), (original.mode[original.keys.index(key)],)
    return view


def _uniform(low: float, high: float, n: int) -> torch.Tensor:
    """n draws of U(low, high) from torch's global (CPU) generator."""
    return low + (high - low) * torch.rand(n)


class StrongPerturbation:
    """The strong view of a batch of (weakly augmented) unlabelled slices, as UniMatch's: per slice, with
    probability ``jitter_probability`` a brightness/contrast jitter; with ``blur_probability`` a Gaussian blur; then,
    with ``cutmix_probability``, a box cut from the next slice of the batch (CutMix; the partner of slice i is
    slice i + 1, cyclically). Every draw comes from torch's global generator (CPU).

    Args:
        jitter_probability: probability of the jitter per slice.
        brightness: b ~ U(-brightness, brightness) added, in units of the slice's intensity standard deviation.
        contrast: c ~ U(1 - contrast, 1 + contrast): ``(x - mean) * c + mean``.
        blur_probability: probability of the blur per slice.
        blur_sigma: σ ~ U(blur_sigma) in pixels.
        cutmix_probability: probability of a CutMix box per slice.
        cutmix_area: the box's area as a fraction of the slice, ~ U(cutmix_area).
        cutmix_aspect: the box's height / width ~ U(cutmix_aspect).

    Call: ``(U, C, H, W) -> (strong (U, C, H, W), box (U, H, W) bool)``: where ``box`` is true the pixel comes from
    the partner ``(i + 1) % U``.
    """

    def __init__(self, jitter_probability: float = 0.8, brightness: float = 0.5, contrast: float = 0.5,
                 blur_probability: float = 0.5, blur_sigma: Sequence[float] = (0.1, 2.0),
                 cutmix_probability: float = 0.5, cutmix_area: Sequence[float] = (0.02, 0.4),
                 cutmix_aspect: Sequence[float] = (0.3, 1 / 0.3)):
        self.jitter_probability, self.brightness, self.contrast = float(jitter_probability), brightness, contrast
        self.blur_probability, self.blur_sigma = float(blur_probability), tuple(float(s) for s in blur_sigma)
        self.cutmix_probability = float(cutmix_probability)
        self.cutmix_area, self.cutmix_aspect = tuple(cutmix_area), tuple(cutmix_aspect)
        self.radius = max(1, int(math.ceil(3 * self.blur_sigma[1])))

    def jitter(self, x: torch.Tensor) -> torch.Tensor:
        u = x.shape[0]
        on = (torch.rand(u) < self.jitter_probability).float()
        c = 1 + on * _uniform(-self.contrast, self.contrast, u)
        b = on * _uniform(-self.brightness, self.brightness, u)
        shape = (u,) + (1,) * (x.ndim - 1)
        c, b = c.to(x.device, x.dtype).view(shape), b.to(x.device, x.dtype).view(shape)
        mean = x.mean(dim=tuple(range(1, x.ndim)), keepdim=True)
        std = x.std(dim=tuple(range(1, x.ndim)), keepdim=True)
        return (x - mean) * c + mean + b * std

    def blur(self, x: torch.Tensor) -> torch.Tensor:
        """A separable Gaussian blur with its own σ per slice (slices without blur: σ -> 0, an identity kernel)."""
        u, ch, h, w = x.shape
        on = torch.rand(u) < self.blur_probability
        sigma = torch.where(on, _uniform(*self.blur_sigma, u), torch.full((u,), 1e-3))
        offsets = torch.arange(-self.radius, self.radius + 1, dtype=torch.float32)
        kernel = torch.exp(-0.5 * (offsets[None] / sigma[:, None]) ** 2)
        kernel = (kernel / kernel.sum(1, keepdim=True)).to(x.device, x.dtype).repeat_interleave(ch, 0)  # (U*C, k)
        flat = F.pad(x.reshape(1, u * ch, h, w), (self.radius,) * 4, mode="reflect")
        flat = F.conv2d(flat, kernel[:, None, :, None], groups=u * ch)
        flat = F.conv2d(flat, kernel[:, None, None, :], groups=u * ch)
        return flat.reshape(u, ch, h, w)

    def boxes(self, u: int, h: int, w: int, device) -> torch.Tensor:
        """(U, H, W) bool CutMix boxes (all false for slices drawn without one)."""
        on = torch.rand(u) < self.cutmix_probability
        area = _uniform(*self.cutmix_area, u) * h * w
        aspect = _uniform(*self.cutmix_aspect, u)
        bh = torch.sqrt(area * aspect).clamp(1, h).floor()
        bw = torch.sqrt(area / aspect).clamp(1, w).floor()
        top = (torch.rand(u) * (h - bh + 1)).floor()
        left = (torch.rand(u) * (w - bw + 1)).floor()
        rows = torch.arange(h)[None, :, None]
        cols = torch.arange(w)[None, None, :]
        inside = ((rows >= top[:, None, None]) & (rows < (top + bh)[:, None, None])
                  & (cols >= left[:, None, None]) & (cols < (left + bw)[:, None, None]))
        return (inside & on[:, None, None]).to(device)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        u, _, h, w = x.shape
        strong = self.blur(self.jitter(x))
        box = self.boxes(u, h, w, x.device)
        strong = torch.where(box[:, None], strong.roll(-1, 0), strong)
        return strong, box


# ---------------------------------------------------------------- the consistency loss
def masked_dice_ce(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, dice_weight: float = 1.0,
                   ce_weight: float = 1.0, smooth: float = 1e-5) -> torch.Tensor:
    """Soft Dice (background included, per slice and class, as MONAI's ``DiceLoss``) plus cross-entropy, counting only
    the pixels where ``mask`` is 1.

    Args:
        logits: (N, K, H, W).
        target: (N, H, W) class indices (any value where ``mask`` is 0).
        mask: (N, H, W), 1 where the pixel counts, 0 elsewhere.
        dice_weight, ce_weight: the weights of the two terms.
        smooth: added to the Dice's numerator and denominator (a slice and class without counted pixels scores 0).

    Returns:
        a scalar: ``ce_weight * sum(mask * CE) / (N H W) + dice_weight * mean over (N, K) of the masked soft Dice
        loss``; the cross-entropy is a mean over all pixels (FixMatch, UniMatch), so it shrinks as fewer count.
    """
    logits = logits.float()
    k = logits.shape[1]
    mask = mask.to(logits.dtype)
    target = torch.where(mask > 0, target.long(), torch.zeros_like(target, dtype=torch.long))
    ce = (F.cross_entropy(logits, target, reduction="none") * mask).mean()
    prob = logits.softmax(1)
    onehot = F.one_hot(target, k).permute(0, 3, 1, 2).to(prob.dtype)
    weight = mask[:, None]
    intersection = (prob * onehot * weight).sum((2, 3))
    denominator = ((prob + onehot) * weight).sum((2, 3))
    dice = 1 - (2 * intersection + smooth) / (denominator + smooth)
    return ce_weight * ce + dice_weight * dice.mean()


def consistency_loss(weak_logits: torch.Tensor, strong_logits: torch.Tensor, threshold: float,
                     box: torch.Tensor | None = None, dice_weight: float = 1.0, ce_weight: float = 1.0
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss between the confident pseudo-labels of the weak view and a prediction of the strong view.

    Args:
        weak_logits: (U, K, H, W) predictions of the weak view (detached here: the pseudo-labels get no gradient).
        strong_logits: (U, K, H, W) predictions of the strong (or feature-perturbed) view.
        threshold: a pixel counts where the weak view's highest softmax probability is >= this.
        box: optional (U, H, W) bool CutMix boxes: inside them the strong view shows slice ``(i + 1) % U``, so its
            pseudo-label and confidence are taken from there.
        dice_weight, ce_weight: ``masked_dice_ce``'s weights.

    Returns:
        (loss, the fraction of pixels that counted).
    """
    with torch.no_grad():
        confidence, pseudo = weak_logits.detach().float().softmax(1).max(1)
        if box is not None:
            pseudo = torch.where(box, pseudo.roll(-1, 0), pseudo)
            confidence = torch.where(box, confidence.roll(-1, 0), confidence)
        mask = (confidence >= threshold).float()
    return masked_dice_ce(strong_logits, pseudo, mask, dice_weight, ce_weight), mask.mean()


# ---------------------------------------------------------------- the unlabelled stream
def unlabelled_sampler(slices, num_samples: int, seed: int = 0):
    """The unlabelled slices' sampler: ``num_samples`` per epoch drawn with replacement; under torch.distributed each
    rank draws from its own shard (``ShardedRandomSampler``, as multi_gpu_train.yaml's labelled sampler), else
    ``RandomSampler`` (its seed drawn from torch's global generator)."""
    if rank_and_world_size()[1] > 1:
        from scripts.sampler import ShardedRandomSampler

        return ShardedRandomSampler(slices, num_samples=num_samples, seed=seed)
    return RandomSampler(slices, replacement=True, num_samples=int(num_samples))


class _FeatureDropout:
    """Forward pre-hooks on the decoder blocks of a ``UNet2D``: while ``start`` is set, the encoder features each
    block reads (the skip connection, and the bottleneck for the first block) get channel dropout (``Dropout2d``,
    probability ``p``) on the batch rows from ``start`` on; other rows and other times are untouched."""

    def __init__(self, unet, p: float):
        self.p, self.start = float(p), None
        self.handles = [block.register_forward_pre_hook(self._hook(i == 0)) for i, block in enumerate(unet.decoder)]

    def _drop(self, t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t[:self.start], F.dropout2d(t[self.start:], self.p, training=True)])

    def _hook(self, first: bool):
        def hook(module, args):
            if self.start is None:
                return None
            x, skip = args
            return (self._drop(x) if first else x), self._drop(skip)

        return hook


def rampup_weight(weight: float, iteration: int, rampup: int) -> float:
    """``weight`` x exp(-5 (1 - t)^2) with t = min(1, iteration / rampup), the sigmoid-shaped ramp of the mean teacher
    (Laine and Aila 2017; SSL4MIS's consistency weight): 0.7 % of ``weight`` at the start, all of it from ``rampup``
    on; ``rampup`` 0: ``weight`` throughout. ``iteration`` counts from 1 (Ignite's ``state.iteration``)."""
    if rampup <= 0:
        return weight
    t = min(1.0, iteration / rampup)
    return weight * math.exp(-5.0 * (1.0 - t) ** 2)


class ConsistencyStep:
    """The ``iteration_update`` of a ``SupervisedTrainer`` for weak-to-strong consistency fine-tuning.

    Args:
        loader: the unlabelled slices' data loader (batches of {"image": (U, 1, H, W)}); a fresh pass starts every
            epoch (``set_epoch(epoch)`` first when its sampler has it), and again if it runs out within one.
        weak: {"image": (U, C, H, W)} -> the same, augmented (``image_view``).
        strong: ``StrongPerturbation``.
        threshold: confidence threshold of the pseudo-labels (UniMatch: 0.95).
        weight: weight of the unsupervised loss against the supervised one.
        rampup: iterations over which that weight rises as ``rampup_weight`` (0: the full weight from the start).
        feature_dropout: channel-dropout probability of the feature-perturbation stream; 0: no such stream.
        feature_share: the stream's share of the unsupervised loss (the strong view has the rest; UniMatch: 0.5).
        dice_weight, ce_weight: the consistency loss's Dice and cross-entropy weights.

    Call ``(engine, batchdata) -> output``: ``prepare`` then ``compute``. The output dict holds "image" / "label" (the
    labelled batch), "pred" (its logits), "loss" (total), "supervised_loss", "unsupervised_loss", "confident" (share
    of unlabelled pixels above the threshold) and "network_images" (images through the network per step: B + 2U or
    B + 3U).
    AMP as the trainer's (``engine.amp``, ``engine.scaler``); gradient accumulation is not supported.
    """

    def __init__(self, loader, weak: Callable, strong: StrongPerturbation, threshold: float = 0.95,
                 weight: float = 1.0, feature_dropout: float = 0.5, feature_share: float = 0.5,
                 dice_weight: float = 1.0, ce_weight: float = 1.0, rampup: int = 0):
        if int(rampup) < 0:
            raise ValueError(f"rampup must be >= 0 iterations, got {rampup}.")
        if not 0 <= feature_dropout < 1 or not 0 <= feature_share <= 1:
            raise ValueError(f"feature_dropout must be in [0, 1) and feature_share in [0, 1], got {feature_dropout}, "
                             f"{feature_share}.")
        self.loader, self.weak, self.strong = loader, weak, strong
        self.threshold, self.weight, self.rampup = float(threshold), float(weight), int(rampup)
        self.feature_dropout = float(feature_dropout)
        self.feature_share = float(feature_share) if feature_dropout > 0 else 0.0
        self.dice_weight, self.ce_weight = float(dice_weight), float(ce_weight)
        self._iterator, self._epoch, self._hooks = None, None, None
        self._sums, self._attached = torch.zeros(3, dtype=torch.float64), set()

    def _log_epoch(self, engine) -> None:
        """Rank 0 logs the epoch's mean supervised and unsupervised losses and share of confident pixels."""
        sums, count = self._sums.cpu().tolist(), max(1, engine.state.epoch_length or 1)
        if rank_and_world_size()[0] == 0:
            logger.info(f"consistency: epoch {engine.state.epoch} supervised loss {sums[0] / count:.4f}, unsupervised "
                        f"loss {sums[1] / count:.4f}, confident pixels {100 * sums[2] / count:.1f}%")
        self._sums = torch.zeros(3, dtype=torch.float64)

    def next_unlabelled(self, epoch: int) -> dict:
        """The next unlabelled batch; a fresh pass of the loader at each new ``epoch``."""
        if self._epoch != epoch or self._iterator is None:
            if hasattr(self.loader.sampler, "set_epoch"):
                self.loader.sampler.set_epoch(epoch)
            self._iterator, self._epoch = iter(self.loader), epoch
        try:
            return next(self._iterator)
        except StopIteration:
            self._iterator = iter(self.loader)
            return next(self._iterator)

    def prepare(self, engine, batchdata) -> dict:
        """The step's tensors on the device: "image", "label" (the labelled batch as ``engine.prepare_batch`` gives
        it), "weak", "strong" (U, C, H, W) and "box" (U, H, W)."""
        if getattr(engine, "accumulation_steps", 1) > 1:
            raise BundleError("consistency fine-tuning does not support gradient accumulation (accumulation_steps).")
        image, label = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking,
                                            **getattr(engine, "to_kwargs", {}))[:2]
        unlabelled = self.next_unlabelled(engine.state.epoch)["image"]
        unlabelled = torch.as_tensor(unlabelled).to(device=image.device, dtype=image.dtype,
                                                    non_blocking=engine.non_blocking)
        weak = self.weak({"image": unlabelled})["image"]
        strong, box = self.strong(weak)
        return {"image": image, "label": label, "weak": weak, "strong": strong, "box": box}

    def _dropout(self, network) -> _FeatureDropout:
        if self._hooks is None:
            self._hooks = _FeatureDropout(getattr(network, "module", network), self.feature_dropout)
        return self._hooks

    def compute(self, engine, data: dict) -> dict:
        """Forwards (the labelled batch, then every unlabelled view in one pass), losses, backward and the optimiser
        step on prepared ``data``."""
        image, label, weak, strong = data["image"], data["label"], data["weak"], data["strong"]
        b, u = image.shape[0], weak.shape[0]
        unlabelled = torch.cat([weak, strong] + ([weak] if self.feature_share > 0 else []))
        output = {Keys.IMAGE: image, Keys.LABEL: label, "network_images": b + int(unlabelled.shape[0])}
        engine.state.output = output
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        use_scaler = engine.amp and engine.scaler is not None
        hooks = self._dropout(engine.network) if self.feature_share > 0 else None
        with torch.autocast("cuda", **engine.amp_kwargs) if use_scaler else nullcontext():
            # two passes: BatchNorm normalises the labelled slices by their own batch, as in supervised fine-tuning
            # (one pass over labelled and unlabelled views together learnt less: docs/study/semi_supervised.md)
            output[Keys.PRED] = engine.inferer(image, engine.network)
            if hooks is not None:
                hooks.start = 2 * u
            try:
                logits = engine.inferer(unlabelled, engine.network)
            finally:
                if hooks is not None:
                    hooks.start = None
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
            supervised = engine.loss_function(output[Keys.PRED], label).mean()
            weak_logits = logits[:u]
            strong_loss, confident = consistency_loss(weak_logits, logits[u:2 * u], self.threshold,
                                                      data["box"], self.dice_weight, self.ce_weight)
            unsupervised = (1 - self.feature_share) * strong_loss
            if self.feature_share > 0:
                fp_loss, _ = consistency_loss(weak_logits, logits[2 * u:], self.threshold, None,
                                              self.dice_weight, self.ce_weight)
                unsupervised = unsupervised + self.feature_share * fp_loss
            loss = supervised + rampup_weight(self.weight, engine.state.iteration, self.rampup) * unsupervised
        output.update({Keys.LOSS: loss, "supervised_loss": supervised.detach(),
                       "unsupervised_loss": unsupervised.detach(), "confident": confident})
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        if use_scaler:
            engine.scaler.scale(loss).backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            engine.scaler.step(engine.optimizer)
            engine.scaler.update()
        else:
            loss.backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            engine.optimizer.step()
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return output

    def __call__(self, engine, batchdata) -> dict:
        if id(engine) not in self._attached:  # the per-epoch summary of the losses (progress output)
            from ignite.engine import Events

            engine.add_event_handler(Events.EPOCH_COMPLETED, self._log_epoch)
            self._attached.add(id(engine))
        output = self.compute(engine, self.prepare(engine, batchdata))
        parts = torch.stack([output[k].float() for k in ("supervised_loss", "unsupervised_loss", "confident")])
        self._sums = self._sums.to(parts.device) + parts.detach().double()  # on the device: no sync per step
        return output
