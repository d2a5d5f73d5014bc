"""What the DataLoader workers of both torchvision loaders (loader.py, stream.py) do with a sample:
torchvision's transforms (and timm's AutoAugment), their random draws seeded by the sample, in
workers that leave Ctrl-C to the training process."""
from __future__ import annotations

import random
import signal

import numpy as np
import torch
from torchvision import transforms

from pipelines.backends.augment_policy import timm_transform


def ignore_interrupts(worker_id: int) -> None:
    """DataLoader worker_init_fn: Ctrl-C is the main process's to handle; a worker that died of it
    would break the step the main process is finishing."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def image_transform(cfg, split: str) -> transforms.Compose:
    data = cfg.data
    if split == "train":
        steps = [transforms.RandomResizedCrop(data.image_size, scale=(data.min_scale, 1.0))]
        if data.hflip:
            steps.append(transforms.RandomHorizontalFlip())
        if data.auto_augment:
            steps.append(timm_transform(data.auto_augment, data.image_size))
    else:
        size = data.val_image_size or data.image_size
        steps = [transforms.Resize(round(size / data.crop_ratio)), transforms.CenterCrop(size)]
    return transforms.Compose([*steps, transforms.PILToTensor()])


def seeded_by_sample(seed: int, epoch: int, index: int, load, copy: int = 0):
    """load() with torch's, python's and numpy's RNG seeded by (seed, epoch, index) — and copy, for
    repeated augmentation's copies after the first — the caller's RNG states left as they were
    (workers=0 runs this in the training process)."""
    sample_seed = (seed * 1_000_003 + epoch) * 10_000_019 + index
    if copy:
        sample_seed = int(np.random.SeedSequence([abs(sample_seed), copy]).generate_state(1, np.uint64)[0])
    # timm's AutoAugment draws from python's random, its RandAugment also from numpy's
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(sample_seed)
        random.seed(sample_seed)
        np.random.seed(sample_seed % 2**32)
        try:
            return load()
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)
