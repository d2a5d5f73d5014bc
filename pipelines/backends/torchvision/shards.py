"""loader=torchvision on local tar shards: the torchvision loader (its DataLoader and workers, its
transforms and AutoAugment, its per-sample seeding, ShardSampler's order, its mid-run report of bad
images) over samples read by index.

A sample's image bytes come from its shard (pipelines/sources/shards/read.py) instead of a file and are decoded
by the PIL rule of every backend; a bad sample is replaced by the next one that reads, reported
with its shard and key, and listed in the loader's left_out.
"""
from __future__ import annotations

import functools

import torch
from torch.utils.data import Dataset

from pipelines.backends.torchvision.loader import TorchvisionLoader, image_transform, sample_key, seeded_by_sample
from pipelines.sources.shards.read import ShardReader, decode_rgb, read_or_substitute


class ShardImages(Dataset):
    """Sample i of the shard set → (uint8 CHW tensor, label, failures), its augmentation seeded by
    (seed, epoch, i) like SeededImageFolder's; failures: a "where<TAB>reason" line per bad sample
    that a substitute stood in for ("" when none)."""

    seed: int = 0
    epoch: int = 0

    def __init__(self, reader: ShardReader, classes: list[str], transform):
        self.reader, self.classes, self.transform = reader, classes, transform
        self.left_out: list[tuple[str, str]] = []  # nothing is left out before training (no decode check)

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, key: int | tuple[int, int]):
        index, copy = sample_key(key)
        (image, label), failures = read_or_substitute(self.reader, index, lambda s: (decode_rgb(s.image), s.label))
        lines = "\n".join(f"{where}\t{reason}".replace("\n", " ") for where, reason in failures)
        load = functools.partial(self.transform, image)
        return seeded_by_sample(self.seed, self.epoch, index, load, copy), label, lines


class ShardTorchvisionLoader(TorchvisionLoader):
    def __init__(self, cfg, split: str, reader: ShardReader, classes: list[str], *, rank: int, world_size: int,
                 device: torch.device):
        self.reader, self.shard_classes = reader, classes
        super().__init__(cfg, split, rank=rank, world_size=world_size, device=device)

    def make_dataset(self, cfg, split: str, rank: int) -> ShardImages:
        return ShardImages(self.reader, self.shard_classes, image_transform(cfg, split))

    def report_failure(self, where: str, reason: str) -> None:
        """Once per sample and process: a line, and a place in left_out (the run's report)."""
        if all(where != known for known, _ in self.left_out):
            self.left_out.append((where, f"failed mid-run: {reason}"))
            print(f"warning: {where}: {reason}; the next sample of the set is used in its place", flush=True)
