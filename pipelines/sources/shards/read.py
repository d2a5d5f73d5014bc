"""One sample of a local shard set, by its global index: the image's encoded bytes and its label.

Every backend reads through ShardReader (random access: two preads per sample, in whatever order
ShardSampler gives). A sample that cannot be read (its shard is gone or cut short, its cls is no
class) raises Unreadable naming its shard and key, and pipelines/substitution.py's rule replaces it;
a shard that cannot be read at all fails whole (its samples are skipped together).
"""
from __future__ import annotations

import os
from collections import OrderedDict

from pipelines.sources.samples import EncodedSample
from pipelines.sources.shards.spec import IMAGE_EXTENSIONS
from pipelines.sources.shards.table import SampleTable
from pipelines.substitution import Unreadable


class ShardReader:
    """Reads samples of a SampleTable, keeping a few shards open (safe in any process or thread)."""

    OPEN_SHARDS = 64  # file descriptors kept open per process (pread needs no seek: any thread may use one)

    def __init__(self, table: SampleTable, num_classes: int):
        self.table, self.num_classes = table, num_classes
        self.files: OrderedDict[int, int] = OrderedDict()  # shard number → fd, most recent last
        self.pid = os.getpid()

    def open_shard(self, shard: int) -> int:
        if self.pid != os.getpid():  # a forked worker: its own descriptors (the parent may close its)
            self.files, self.pid = OrderedDict(), os.getpid()
        fd = self.files.pop(shard, None)
        if fd is None:
            fd = os.open(self.table.shards[shard], os.O_RDONLY)
            while len(self.files) >= self.OPEN_SHARDS:
                os.close(self.files.popitem(last=False)[1])
        self.files[shard] = fd
        return fd

    def __getstate__(self):  # to a spawned worker: no descriptors
        return {**self.__dict__, "files": OrderedDict(), "pid": -1}

    def __len__(self) -> int:
        return len(self.table)

    def read(self, index: int) -> EncodedSample:
        image_span, label_span = self.table.image[index].tolist(), self.table.label[index].tolist()
        image, label = self.pread(index, [image_span, label_span])
        return EncodedSample(image, self.parse_label(index, label), IMAGE_EXTENSIONS[int(self.table.image_ext[index])])

    def read_label(self, index: int) -> int:
        return self.parse_label(index, self.pread(index, [self.table.label[index].tolist()])[0])

    def pread(self, index: int, spans: list[tuple[int, int]]) -> list[bytes]:
        """The bytes at (offset, size) spans of the sample's shard."""
        shard = self.table.locate(index)[0]
        whole_shard = range(int(self.table.starts[shard]), int(self.table.starts[shard + 1]))
        try:
            fd = self.open_shard(shard)
            parts = [os.pread(fd, size, offset) for offset, size in spans]
        except OSError as error:
            raise Unreadable(self.table.where(index), f"cannot read the shard: {error.strerror}", whole_shard,
                             unit=f"shard {self.table.shards[shard]}") from None
        if [len(part) for part in parts] != [size for _, size in spans]:
            raise Unreadable(self.table.where(index), "the shard ends before this sample (truncated since "
                                                      "it was indexed?)", whole_shard)
        return parts

    def parse_label(self, index: int, data: bytes) -> int:
        try:
            value = int(data.strip())
        except ValueError:
            raise Unreadable(self.table.where(index), f"cls {data[:20]!r} is not an integer class index") from None
        if not 0 <= value < self.num_classes:
            raise Unreadable(self.table.where(index), f"cls {value} is not one of the {self.num_classes} classes")
        return value
