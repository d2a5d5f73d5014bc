"""timm's AutoAugment/RandAugment policy drawn inside a DALI pipeline (conditional execution).

    python train/run.py loader=dali data.auto_augment=v0

How DALI draws what timm draws, per image:
  - one sub-policy uniformly (RandAugment: one n-tuple of its operations, see augment_policy.py),
    then each of its operations with its probability;
  - a magnitude with noise (mstd) is drawn per operation, N(m, std) or U(0, m) for mstd > 100,
    clipped to [0, mmax or 10], and rounded to 1/LEVEL_STEPS of a level (DALI looks an operation's
    parameters up in a table of magnitude bins, computed when the pipeline is built);
  - operations timm negates at random are negated with probability ½.
The random draws come from the pipeline's seed, like its crops and flips.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
from nvidia.dali import fn, math, types
from nvidia.dali.auto_aug.core import select, signed_bin

from pipelines.backends.augment_policy import IMAGENET_MEAN_255, sub_policies
from pipelines.backends.dali.augment_ops import TIMM_ARGUMENT, dali_augmentation
from common.errors import UserInputError

LEVEL_STEPS = 100  # magnitude bins per level: noisy magnitudes are rounded to 0.01 of a level


class DaliAutoAugment:
    """A timm policy as a piece of a DALI pipeline (built with enable_conditionals=True)."""

    def __init__(self, name: str, image_size: int):
        self.policy = sub_policies(name, image_size)
        unknown = sorted({op.name for ops in self.policy for op in ops} - set(TIMM_ARGUMENT))
        if unknown:
            raise UserInputError(f"data.auto_augment={name!r} uses {', '.join(unknown)}, which loader=dali "
                                 f"does not implement (it does {', '.join(TIMM_ARGUMENT)}): use loader=torchvision")
        self.image_size = image_size
        self.stages = max(len(ops) for ops in self.policy)
        self.top_level = max(op.magnitude_max or 10 for ops in self.policy for op in ops)
        self.top_level = max(self.top_level, max(op.magnitude for ops in self.policy for op in ops))
        self.levels = np.arange(0, round(self.top_level * LEVEL_STEPS) + 1) / LEVEL_STEPS

    def table(self, value: Callable, fill=0, dtype=np.float32) -> np.ndarray:
        """(sub-policy, stage) → value(op); `fill` where a sub-policy is shorter than the longest."""
        rows = [[value(op) for op in ops] + [fill] * (self.stages - len(ops)) for ops in self.policy]
        return np.array(rows, dtype=dtype)

    def stage_augmentations(self, stage: int, augmentation_for: Callable) -> tuple[list, np.ndarray]:
        """The augmentations stage `stage` can run, and per sub-policy the index of the one it runs."""
        names = sorted({ops[stage].name for ops in self.policy if stage < len(ops)})
        index = [names.index(ops[stage].name) if stage < len(ops) else 0 for ops in self.policy]
        return [augmentation_for(name) for name in names], np.array(index, dtype=np.int32)

    def real_augmentation(self, name: str):
        hparams = next(op.hparams for ops in self.policy for op in ops if op.name == name)
        return dali_augmentation(name, hparams, self.levels, self.image_size)

    def __call__(self, images, augmentation_for: Callable | None = None):
        """Applies the policy to a batch of HWC uint8 images (DataNode). `augmentation_for(name)`
        replaces the operations (tests record what was drawn with it)."""
        augmentation_for = augmentation_for or self.real_augmentation
        sub_policy = fn.random.uniform(values=list(range(len(self.policy))), dtype=types.INT32)
        probability = types.Constant(self.table(lambda op: op.prob))[sub_policy]
        bins = self.magnitude_bins(sub_policy)
        should_run = fn.random.uniform(range=[0, 1], shape=(self.stages,), dtype=types.FLOAT)
        kwargs = dict(size=self.image_size, fill=list(map(float, IMAGENET_MEAN_255)))  # for warps
        for stage in range(self.stages):
            augmentations, index = self.stage_augmentations(stage, augmentation_for)
            if should_run[stage] < probability[stage]:
                images = select(augmentations, types.Constant(index)[sub_policy], images,
                                magnitude_bin=bins[stage], num_magnitude_bins=len(self.levels), **kwargs)
        return images

    def magnitude_bins(self, sub_policy):
        """Per stage, the (noisy, clipped) magnitude as a bin of self.levels, with its random sign."""
        magnitude = types.Constant(self.table(lambda op: op.magnitude))[sub_policy]
        std = self.table(lambda op: op.magnitude_std or 0)
        if np.any(std > 0):
            uniform = np.isinf(std)
            noise = fn.random.normal(shape=(self.stages,), dtype=types.FLOAT)
            draw = fn.random.uniform(range=[0, 1], shape=(self.stages,), dtype=types.FLOAT)
            std_node = types.Constant(np.where(uniform, 0, std).astype(np.float32))[sub_policy]
            uniform_node = types.Constant(uniform.astype(np.float32))[sub_policy]
            noisy = magnitude + noise * std_node
            magnitude = uniform_node * draw * magnitude + (1 - uniform_node) * noisy
        upper = types.Constant(self.table(lambda op: op.magnitude_max or 10, fill=10))[sub_policy]
        magnitude = math.clamp(magnitude, 0.0, upper)
        bins = fn.cast(math.floor(magnitude * LEVEL_STEPS + 0.5), dtype=types.INT32)
        return signed_bin(bins, shape=(self.stages,))
