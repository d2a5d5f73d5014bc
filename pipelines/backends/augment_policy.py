"""`data.auto_augment`: timm's AutoAugment and RandAugment, on PIL images or inside a DALI pipeline.

The setting is timm's name ("v0", "original", "rand-m9-mstd0.5-inc1", ...) and timm parses it, for
both backends: torchvision applies timm's transform to PIL images; DALI applies the same policy —
timm's sub-policies, probabilities, magnitudes and magnitude noise, read from timm's objects —
with DALI's conditional execution (nvidia.dali.auto_aug), on the GPU after nvJPEG or on the CPU.

    python train/run.py loader=dali data.auto_augment=v0

The DALI side: pipelines/backends/dali/auto_augment.py (the draws), pipelines/backends/dali/augment_ops.py (the
operations).
"""
from __future__ import annotations

import itertools

from common.errors import UserInputError

IMAGENET_MEAN_255 = (124, 116, 104)  # timm's fill colour for geometric operations


def timm_hparams(image_size: int) -> dict:
    """timm's own choice (create_transform): translations up to 45% of the crop, mean-coloured fill."""
    return dict(translate_const=int(image_size * 0.45), img_mean=IMAGENET_MEAN_255)


def timm_transform(name: str, image_size: int):
    """timm's AutoAugment ("v0", "original", ...) or RandAugment ("rand-m9-mstd0.5") for PIL images."""
    from timm.data.auto_augment import auto_augment_transform, rand_augment_transform
    try:
        if name.startswith("rand"):
            return rand_augment_transform(name, timm_hparams(image_size))
        return auto_augment_transform(name, timm_hparams(image_size))
    except (AssertionError, KeyError, ValueError) as error:
        raise UserInputError(f"data.auto_augment={name!r} is not a timm AutoAugment or RandAugment "
                             f"setting (e.g. v0, original, rand-m9-mstd0.5): {error}") from None


def sub_policies(name: str, image_size: int) -> list:
    """The policy as AutoAugment sub-policies: lists of timm AugmentOps (name, prob, magnitude, ...).
    RandAugment (n operations drawn with replacement, each applied with its probability) is the
    AutoAugment policy whose sub-policies are all n-tuples of its operations."""
    from timm.data.auto_augment import AutoAugment, RandAugment
    transform = timm_transform(name, image_size)
    if isinstance(transform, AutoAugment):
        return [list(sub_policy) for sub_policy in transform.policy]
    if isinstance(transform, RandAugment):
        if transform.choice_weights is not None:
            raise UserInputError(f"data.auto_augment={name!r}: weighted RandAugment choice (w) draws "
                                 "without replacement, which loader=dali does not do: use "
                                 "loader=torchvision or drop the w setting")
        return [list(ops) for ops in itertools.product(transform.ops, repeat=transform.num_layers)]
    raise UserInputError(f"data.auto_augment={name!r} is not AutoAugment or RandAugment")
