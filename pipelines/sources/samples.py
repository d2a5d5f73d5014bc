"""Many samples as a few arrays, not as Python objects: what a DataLoader worker can read for free.

A forked worker shares its parent's memory until it writes to a page. Indexing a Python list of
`(path, label)` tuples writes each tuple's and string's reference count, so every worker ends up
with a private copy of the whole list — about 250 B per file, and again each epoch for workers
that are re-made (pytorch/pytorch#13246). Here the paths are one byte buffer and the offsets
where each starts, the labels one int64 array: reading sample i makes two new objects and writes
nothing shared.

    paths = PathTable.from_strings(["cat/1.jpg", "dog/2.jpg"])
    paths[1]            'dog/2.jpg'
    paths.encoded(1)    b'dog/2.jpg'
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


class PathTable(Sequence):
    """Paths (file-system encoded) as a uint8 buffer and int64 offsets (n + 1)."""

    def __init__(self, data: np.ndarray, offsets: np.ndarray):
        self.data, self.offsets = data, offsets

    @classmethod
    def from_strings(cls, paths) -> "PathTable":
        encoded = [os.fsencode(path) for path in paths]
        offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(path) for path in encoded], out=offsets[1:])
        return cls(np.frombuffer(b"".join(encoded), dtype=np.uint8).copy(), offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def encoded(self, index: int) -> bytes:
        return self.data[self.offsets[index]:self.offsets[index + 1]].tobytes()

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        return os.fsdecode(self.encoded(index))

    def take(self, indices: np.ndarray) -> "PathTable":
        """The paths at indices, as a new table (a subset: small next to the buffer it copies from)."""
        return PathTable.from_strings([self.encoded(i) for i in indices])


class SampleView(Sequence):
    """A read-only list-like view of n items made on demand by item(i): what a loader shows of its
    samples (`dataset.samples`, `loader.files`) without holding them as Python objects."""

    def __init__(self, n: int, item):
        self.n, self.item = n, item

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self.item(i) for i in range(*index.indices(self.n))]
        if index < 0:
            index += self.n
        if not 0 <= index < self.n:
            raise IndexError(index)
        return self.item(index)

    def __eq__(self, other) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)

    __hash__ = None


@dataclass
class EncodedSample:
    """What a source gives for one sample: the image file's bytes, as stored, and its label."""
    image: bytes
    label: int
    ext: str = ""  # jpg, jpeg, png, webp, ...: the stored file's kind, where known
