"""Baseline backend: torchvision ImageFolder + DataLoader, PIL decode on CPU workers, uint8 out."""
from __future__ import annotations

import functools
import random
import signal

import numpy as np
import torch
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from pipelines.augment_policy import timm_transform
from pipelines.image_folder import list_image_folder
from pipelines.loader import ShardSampler, report_skipped, split_folder, to_device_batch


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


class SeededImageFolder(datasets.ImageFolder):
    """ImageFolder whose random augmentation is a function of (seed, epoch, index).

    So an epoch's images are the same whatever the worker count, and a resumed run skipping the
    consumed batches sees exactly the images the uninterrupted run saw.
    """

    seed: int = 0
    epoch: int = 0

    def __init__(self, root, transform, *, rank: int = 0):
        self.listing = list_image_folder(root)  # the walk all backends share (symlinks once)
        report_skipped(self.listing, rank)
        super().__init__(root, transform=transform)

    def find_classes(self, directory):
        return self.listing.classes, {name: i for i, name in enumerate(self.listing.classes)}

    def make_dataset(self, directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
        return self.listing.images()

    def __getitem__(self, index: int):
        return seeded_by_sample(self.seed, self.epoch, index, functools.partial(super().__getitem__, index))


def seeded_by_sample(seed: int, epoch: int, index: int, load):
    """load() with torch's, python's and numpy's RNG seeded by (seed, epoch, index), the caller's
    RNG states left as they were (workers=0 runs this in the training process)."""
    sample_seed = (seed * 1_000_003 + epoch) * 10_000_019 + index
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


class TorchvisionLoader:
    collate = None  # DataLoader's default; a subclass may batch its own way (pipelines/wds_torchvision.py)

    def __init__(self, cfg, split: str, *, rank: int, world_size: int, device: torch.device):
        self.dataset = self.make_dataset(cfg, split, rank)
        self.classes = self.dataset.classes
        self.dataset.seed = cfg.seed
        self.train = split == "train"
        self.batch_size, self.device = cfg.batch_size, device
        self.sampler = ShardSampler(len(self.dataset), shuffle=self.train, seed=cfg.seed,
                                    rank=rank, world_size=world_size, batch_size=self.batch_size)
        workers = cfg.data.workers
        self.loader = DataLoader(
            self.dataset, batch_size=self.batch_size, sampler=self.sampler,  # train: whole batches only
            num_workers=workers, pin_memory=device.type == "cuda", collate_fn=self.collate,
            # Workers are re-made each epoch so they see the dataset's new epoch (see SeededImageFolder).
            persistent_workers=False, worker_init_fn=ignore_interrupts,
            # Its own generator: making an iterator draws a seed, which must not come from the
            # global RNG (a resumed run makes one more iterator mid-epoch than the original did).
            generator=torch.Generator().manual_seed(cfg.seed))

    def make_dataset(self, cfg, split: str, rank: int):
        """The map-style dataset of the split (seed and epoch attributes, classes, PIL → uint8 tensors)."""
        return SeededImageFolder(split_folder(cfg, split), image_transform(cfg, split), rank=rank)

    @property
    def num_samples(self) -> int:
        return len(self.sampler)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.sampler.set_epoch(epoch, start_batch)
        self.dataset.epoch = epoch

    def __len__(self) -> int:
        return self.sampler.num_batches

    def __iter__(self):
        for images, labels in self.loader:
            yield to_device_batch(images, labels, self.device)


def make_loader(cfg, split, *, rank, world_size, device):
    return TorchvisionLoader(cfg, split, rank=rank, world_size=world_size, device=device)
