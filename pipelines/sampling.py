"""The order of an epoch, for every backend and source: ShardSampler.

Sharding is the loader's job, not Accelerate's (Accelerate cannot prepare DALI/FFCV iterators),
and this is its one rule:
  train: each process gets a disjoint, equally long shard of a permutation seeded by (seed, epoch);
         the incomplete last batch is dropped. With repeated augmentation (DeiT's, data.repeated_aug)
         each image of the permutation comes `repeats` times in a row before the striping, so its
         copies go to different processes, and each process still takes its n / world_size.
  val:   each process gets every world_size-th image; nothing is dropped or duplicated, so summing
         per-process counts gives every image counted exactly once.
A resumed run sets the epoch and the batches already taken (set_epoch(epoch, start_batch)): the
order continues after them, without reading them. Streamed remote shards, which cannot be read by
index, follow their own rule (pipelines/backends/torchvision/stream.py).
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Sampler


class ShardSampler(Sampler[int]):
    """This process's sample indices for one epoch.

    train: a permutation seeded by (seed, epoch), each index repeated `repeats` times in a row
           (DeiT's RASampler; 1: no repeats), striped over the processes, cut to n // world_size per
           process — an epoch's length stays the data set's, as DeiT's — and cut again to whole
           batches (every process takes the same number of steps);
    val:   range(rank, n, world_size): every image once across processes, nothing padded.
    set_epoch(epoch, start_batch) fixes the epoch and skips its first start_batch batches (resume).
    Iterating gives the indices from there on; len() counts them (torch's Sampler convention);
    copies() gives each one's copy number (0 … repeats − 1), for loaders that seed an image's
    augmentation by its index and must give its copies draws of their own. The shard is kept as
    int64 arrays (index_array, copy_array); indices() and copies() give them as lists.
    """

    def __init__(self, n: int, *, shuffle: bool, seed: int, rank: int, world_size: int, batch_size: int,
                 repeats: int = 1):
        self.n, self.shuffle, self.seed, self.repeats = n, shuffle, seed, repeats if shuffle else 1
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.epoch, self.start_batch = 0, 0
        self._shard: tuple[int, np.ndarray, np.ndarray] | None = None  # (epoch, indices, copies), kept

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def shard(self) -> tuple[np.ndarray, np.ndarray]:
        """The epoch's whole shard, from its first batch: (indices, copy numbers)."""
        if not self.shuffle:
            indices = np.arange(self.rank, self.n, self.world_size, dtype=np.int64)
            return indices, np.zeros_like(indices)
        if self._shard is None or self._shard[0] != self.epoch:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.n, generator=generator)
            # this process's stripe of positions in the repeated order [a, a, a, b, b, b, …]
            positions = self.rank + self.world_size * torch.arange(self.n // self.world_size)
            positions = positions[:len(positions) - len(positions) % self.batch_size]
            self._shard = self.epoch, order[positions // self.repeats].numpy(), (positions % self.repeats).numpy()
        return self._shard[1], self._shard[2]

    def index_array(self) -> np.ndarray:
        """The indices still to come this epoch (after start_batch batches)."""
        return self.shard()[0][self.start_batch * self.batch_size:]

    def copy_array(self) -> np.ndarray:
        """The copy number of each of index_array(): 0 without repeated augmentation."""
        return self.shard()[1][self.start_batch * self.batch_size:]

    def indices(self) -> list[int]:
        return self.index_array().tolist()

    def copies(self) -> list[int]:
        return self.copy_array().tolist()

    def __iter__(self):
        return map(int, self.index_array())

    def __len__(self) -> int:
        return len(self.index_array())

    @property
    def num_batches(self) -> int:
        return -(-len(self) // self.batch_size)
