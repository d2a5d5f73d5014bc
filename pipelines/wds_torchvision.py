"""loader=torchvision on local tar shards: the torchvision loader (its DataLoader and workers, its
transforms and AutoAugment, its per-sample seeding, ShardSampler's order) over samples read by index.

A sample's image bytes come from its shard (pipelines/wds_read.py) instead of a file, and are
decoded by PIL as the folder's are; everything else is TorchvisionLoader's. A sample that cannot be
read or decoded is left out of its batch and reported (pipelines/wds_skips.py).
"""
from __future__ import annotations

import functools

import torch
from torch.utils.data import Dataset, default_collate

from pipelines.loader import to_device_batch
from pipelines.torchvision_loader import TorchvisionLoader, image_transform, seeded_by_sample
from pipelines.wds_read import ShardReader, UnreadableSample, decode_rgb
from pipelines.wds_skips import SkipReport, keep_every_step


class ShardImages(Dataset):
    """Sample i of the shard set → (uint8 CHW tensor, label), its augmentation seeded by
    (seed, epoch, i) like SeededImageFolder's; an UnreadableSample in its place when it is bad."""

    seed: int = 0
    epoch: int = 0

    def __init__(self, reader: ShardReader, classes: list[str], transform):
        self.reader, self.classes, self.transform = reader, classes, transform

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, index: int):
        try:
            sample = self.reader.read(index)
            image = decode_rgb(sample.image)
        except UnreadableSample as bad:
            return bad
        except Exception as error:  # PIL raises many types for a bad image
            return UnreadableSample(self.reader.table.where(index), f"does not decode: {type(error).__name__}: {error}")
        return seeded_by_sample(self.seed, self.epoch, index, functools.partial(self.transform, image)), sample.label


def batch_readable(samples: list):
    """DataLoader collate: (images, labels) of the readable samples (None, None if there is none),
    and the unreadable ones, passed on to the training process to be reported."""
    good = [s for s in samples if not isinstance(s, UnreadableSample)]
    bad = [s for s in samples if isinstance(s, UnreadableSample)]
    images, labels = default_collate(good) if good else (None, None)
    return images, labels, bad


class ShardTorchvisionLoader(TorchvisionLoader):
    collate = staticmethod(batch_readable)

    def __init__(self, cfg, split: str, reader: ShardReader, classes: list[str], *, rank: int, world_size: int,
                 device: torch.device):
        self.reader, self.shard_classes = reader, classes
        self.skips = SkipReport(rank, split)
        super().__init__(cfg, split, rank=rank, world_size=world_size, device=device)

    def make_dataset(self, cfg, split: str, rank: int) -> ShardImages:
        return ShardImages(self.reader, self.shard_classes, image_transform(cfg, split))

    def batches(self):
        for images, labels, bad in self.loader:
            for sample in bad:
                self.skips.add(sample)
            yield None if images is None else to_device_batch(images, labels, self.device)

    def __iter__(self):
        return keep_every_step(self.batches(), self.skips, train=self.train)
