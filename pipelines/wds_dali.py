"""loader=dali on local tar shards: the DALI loader (its pipelines, nvJPEG or CPU decoding,
AutoAugment, kept iterators, ShardSampler's order) fed encoded images instead of file paths.

The external source reads each batch's samples from their shards (pipelines/wds_read.py) in
ShardSampler's order and hands DALI the bytes, where the folder's source hands it paths for
fn.io.file.read. Why not fn.readers.webdataset: it shards and shuffles by its own rule (contiguous
ranges per shard_id, a shuffle buffer), which cannot give the one order every backend shares, nor
skip a resumed epoch's consumed batches without reading them.

DALI stops a pipeline on an image it cannot decode, so every image is checked first (headers and
end marker, no decoding: wds_read.decodable_by_dali); a bad one is left out of its batch (batches
may be shorter) and reported (pipelines/wds_skips.py).
"""
from __future__ import annotations

import numpy as np
import torch

from pipelines.dali_loader import DaliLoader, EpochFiles
from pipelines.wds_read import ShardReader, UnreadableSample, decodable_by_dali
from pipelines.wds_skips import SkipReport, keep_every_step


class EpochShardSamples(EpochFiles):
    """The external source: batches of (encoded image, label) of this epoch's sample indices."""

    yields_bytes = True

    def __init__(self, batch_size: int, reader: ShardReader, skips: SkipReport, train: bool):
        super().__init__(batch_size)
        self.reader, self.skips, self.train = reader, skips, train
        self.indices: list[int] = []

    def set(self, indices: list[int], labels: list) -> None:  # labels come with the images
        self.indices = list(indices)

    def __iter__(self):
        self.position = 0
        self.batches = keep_every_step(self.read_batches(), self.skips, train=self.train)
        return self

    def __next__(self):
        return next(self.batches)  # StopIteration at the epoch's end, as DALI expects

    def read_batches(self):
        for start in range(0, len(self.indices), self.batch_size):
            images, labels = [], []
            for index in self.indices[start:start + self.batch_size]:
                try:
                    sample = self.reader.read(index)
                    problem = decodable_by_dali(sample.image)
                    if problem:
                        raise UnreadableSample(self.reader.table.where(index), problem)
                except UnreadableSample as bad:
                    self.skips.add(bad)
                    continue
                images.append(np.frombuffer(sample.image, dtype=np.uint8))
                labels.append(np.array([sample.label], dtype=np.int64))
            yield (images, labels) if images else None


class ShardDaliLoader(DaliLoader):
    def __init__(self, cfg, split: str, reader: ShardReader, classes: list[str], *, rank: int, world_size: int,
                 device: torch.device):
        self.reader, self.shard_classes = reader, classes
        self.skips = SkipReport(rank, split)
        super().__init__(cfg, split, rank=rank, world_size=world_size, device=device)

    def list_samples(self, cfg, split: str, rank: int):
        count = len(self.reader)
        return self.shard_classes, range(count), [None] * count  # the source reads labels with the images

    def new_source(self) -> EpochShardSamples:
        return EpochShardSamples(self.batch_size, self.reader, self.skips, self.train)
