"""Batch augmentation on the training device: timm's RandomErasing, then timm's Mixup/CutMix.

    data.random_erasing=0.25 data.erasing_mode=pixel data.erasing_count=1        # timm's --reprob --remode --recount
    data.mixup=0.8 data.cutmix=1.0 data.mix_prob=1 data.mix_switch_prob=0.5 data.mix_mode=batch label_smoothing=0.1

train/loop.py runs BatchAugment on each training batch where it has become float [0, 1] on the
device, before the method: the same for every loader, no host round trip (the host draws only
scalars: λ, box corners). The order is DeiT's (erasing in the per-image transform, mixing in the
training loop). Evaluation is never augmented.

- Erasing is timm.data.RandomErasing itself, applied where timm applies it, in the model's
  normalised units (its `pixel` and `rand` fills are N(0, 1) there, `const` is 0, the mean colour):
  the boxes are mapped back to [0, 1] pixels and clamped to [0, 1], the range every attack and
  model input lives in (≈ 3 % of N(0, 1) fill values lie outside it). Pixels outside the boxes are
  left exactly as they were.
- Mixing is timm.data.Mixup itself (image i mixed with image N−1−i, per batch, pair or image), its
  targets class probabilities with timm's label smoothing inside (label_smoothing), so every
  method's loss is the soft-target cross-entropy (timm's SoftTargetCrossEntropy: F.cross_entropy
  with probabilities, no second smoothing). The batch before the mix (images, class indices) is
  kept for the methods that attack it (StepContext.unmixed: advprop and fast_advprop, as the Fast
  AdvProp authors' code; docs/augmentation.md).
- The draws come from the run's seeded generators, those timm uses: numpy's global RNG (Mixup),
  python's `random` (erasing boxes) and torch's RNG on the device (erasing fill). Accelerate's
  checkpoint keeps all three per process, so a resumed run draws what the uninterrupted one drew.
"""
from __future__ import annotations

import torch
from timm.data import Mixup
from timm.data.random_erasing import RandomErasing

from models.factory import NORMALIZATION

MIX_MODES = ("batch", "pair", "elem")
ERASING_MODES = ("const", "rand", "pixel")


def mixing_on(cfg) -> bool:
    return cfg.data.mixup > 0 or cfg.data.cutmix > 0


class BatchAugment:
    """(images, labels) → (images, labels, unmixed): erased, then mixed; unmixed is the batch
    before the mix, or None when mixing is off. The input tensors are never written to."""

    def __init__(self, cfg, num_classes: int, device: torch.device | str):
        data = cfg.data
        mean, std = NORMALIZATION[cfg.normalization]
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1)
        self.erasing = None
        if data.random_erasing > 0:
            self.erasing = RandomErasing(probability=data.random_erasing, mode=data.erasing_mode,
                                         max_count=data.erasing_count, device=device)
        self.mixup = None
        if mixing_on(cfg):
            self.mixup = Mixup(mixup_alpha=data.mixup, cutmix_alpha=data.cutmix, prob=data.mix_prob,
                               switch_prob=data.mix_switch_prob, mode=data.mix_mode,
                               label_smoothing=cfg.label_smoothing, num_classes=num_classes)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor):
        if self.erasing is not None:
            images = self.erase(images)
        if self.mixup is None:
            return images, labels, None
        mixed, targets = self.mixup(images.clone(), labels)  # timm mixes in place
        return mixed, targets, (images, labels)

    def erase(self, images: torch.Tensor) -> torch.Tensor:
        """timm's RandomErasing on the batch in normalised units, as pixels. Its draws do not depend
        on the pixels, so it runs on a NaN canvas: what it fills are the boxes, the rest stays NaN."""
        canvas = torch.full_like(images, float("nan"))
        self.erasing(canvas)
        fill = (canvas * self.std + self.mean).clamp_(0, 1)
        return torch.where(canvas.isnan(), images, fill)


def random_unmixed_class(targets: torch.Tensor) -> torch.Tensor:
    """For mixed targets (N, K): a uniformly random class in neither of the two labels of each
    row's mix, i.e. among the classes at the row's lowest probability (label smoothing's floor, or
    0). Rows whose mix holds every class (2 classes) get their least likely one."""
    outside = targets == targets.amin(dim=1, keepdim=True)
    return (torch.rand(targets.shape, device=targets.device) * outside).argmax(dim=1)


def dominant_label(labels: torch.Tensor) -> torch.Tensor:
    """Class indices as they are; for class probabilities the most likely class (the mix's larger part)."""
    return labels.argmax(dim=1) if labels.is_floating_point() else labels


def checks(cfg, method=None) -> list:
    """[(holds, key, problem)] for train/config_checks.py's validate(); method: the chosen method's record."""
    data = cfg.data
    mixing = mixing_on(cfg)
    return [
        (0 <= data.random_erasing <= 1, "data.random_erasing",
         "must be in [0, 1] (the chance that an image gets erased)"),
        (data.erasing_mode in ERASING_MODES, "data.erasing_mode", f"must be one of {ERASING_MODES}"),
        (data.erasing_count >= 1, "data.erasing_count", "must be ≥ 1"),
        (data.mixup >= 0, "data.mixup", "must be ≥ 0 (Mixup's Beta α; 0 → off)"),
        (data.cutmix >= 0, "data.cutmix", "must be ≥ 0 (CutMix's Beta α; 0 → off)"),
        (0 <= data.mix_prob <= 1, "data.mix_prob", "must be in [0, 1]"),
        (0 <= data.mix_switch_prob <= 1, "data.mix_switch_prob", "must be in [0, 1]"),
        (data.mix_mode in MIX_MODES, "data.mix_mode", f"must be one of {MIX_MODES}"),
        (data.repeated_aug >= 1, "data.repeated_aug", "must be ≥ 1 (copies of each drawn image; 1 → off)"),
        (not mixing or cfg.batch_size % 2 == 0, "batch_size",
         "must be even with data.mixup or data.cutmix (timm's Mixup pairs image i with image N−1−i)"),
        (not mixing or method is None or method.soft_targets, "method",
         "takes no mixed targets (its record has soft_targets=False): set data.mixup=0 data.cutmix=0"),
    ]
