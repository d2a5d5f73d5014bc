"""One sample of a local shard set, by its global index: the image's encoded bytes and its label.

Every backend reads through ShardReader (random access: two preads per sample, in whatever order
ShardSampler gives). A sample found bad mid-epoch (it cannot be read, its cls is no class, its image
does not decode) is replaced by the next sample of the set that reads, as pipelines/loading.py's
`substitute` replaces a folder's image (a shard that cannot be read at all is skipped whole), and
named, shard and key, for the loader's report and left_out: read_or_substitute. Batches stay full,
so every process keeps its step count, and the epoch's order stays a function of (seed, epoch).
"""
from __future__ import annotations

import io
import os
import warnings
from collections import OrderedDict
from dataclasses import dataclass

from PIL import Image

from common.errors import DataError
from pipelines.sources.image_decode import to_rgb
from pipelines.loading import MAX_SUBSTITUTES, substitute
from pipelines.sources.shards.index import SampleTable
from pipelines.sources.shards.spec import IMAGE_EXTENSIONS

# What DALI's image decoders read (GIF, for one, is not among them).
DALI_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "PPM", "JPEG2000")


class UnreadableSample(Exception):
    """A sample that cannot be used: where (shard and key) and why; whole_shard when its shard
    cannot be read at all (the next readable sample is then looked for in the next shard)."""

    def __init__(self, where: str, reason: str, whole_shard: bool = False):
        super().__init__(where, reason, whole_shard)
        self.where, self.reason, self.whole_shard = where, reason, whole_shard

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"


@dataclass
class EncodedSample:
    image: bytes  # the image file's bytes, as stored
    label: int
    ext: str  # jpg, jpeg, png or webp


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
        try:
            fd = self.open_shard(self.table.locate(index)[0])
            parts = [os.pread(fd, size, offset) for offset, size in spans]
        except OSError as error:
            raise UnreadableSample(self.table.where(index), f"cannot read the shard: {error.strerror}", True) from None
        if [len(part) for part in parts] != [size for _, size in spans]:
            raise UnreadableSample(self.table.where(index), "the shard ends before this sample (truncated since "
                                                            "it was indexed?)", True)
        return parts

    def next_candidate(self, index: int, failed: set[int], whole_shard: bool) -> int:
        """The sample to try in place of a failed one: substitute's next one, past its shard if needed."""
        if whole_shard:
            shard = self.table.locate(index)[0]
            failed.update(range(int(self.table.starts[shard]), int(self.table.starts[shard + 1])))
        return substitute(index, len(self.table), failed)

    def parse_label(self, index: int, data: bytes) -> int:
        try:
            value = int(data.strip())
        except ValueError:
            raise UnreadableSample(self.table.where(index), f"cls {data[:20]!r} is not an integer class index") from None
        if not 0 <= value < self.num_classes:
            raise UnreadableSample(self.table.where(index), f"cls {value} is not one of the {self.num_classes} classes")
        return value


def read_or_substitute(reader: ShardReader, index: int, accept):
    """(accept(sample) for sample index or, if it is bad, for the next sample that reads; [(where,
    reason)] of the bad ones met). accept raises for a sample the loader cannot use."""
    failures, failed = [], set()
    while True:
        try:
            return accept(reader.read(index)), failures
        except UnreadableSample as bad:
            failures.append((bad.where, bad.reason))
            whole_shard = bad.whole_shard
        except Exception as error:  # PIL raises many types for a bad image
            failures.append((reader.table.where(index), f"does not decode: {type(error).__name__}: {error}"))
            whole_shard = False
        failed.add(index)
        if len(failures) > MAX_SUBSTITUTES:
            raise DataError(f"{failures[0][0]} and the next {MAX_SUBSTITUTES} samples tried in its place cannot be "
                            f"read: have the shards been moved or changed? ({failures[-1][1]})")
        index = reader.next_candidate(index, failed, whole_shard)


def decode_rgb(data: bytes) -> Image.Image:
    """The torchvision backend's decode: the one PIL rule of every backend (pipelines/sources/image_decode.py)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # palette transparency, large-image warnings
        with Image.open(io.BytesIO(data)) as image:
            return to_rgb(image)


def decodable_by_dali(data: bytes) -> str:
    """'' when the bytes look like a whole image DALI can decode, else the reason. Cheap (signature and
    end marker, no decoding; PIL's header parse for formats other than JPEG, PNG and WebP): DALI stops
    the pipeline on an image it cannot decode, so what can be caught before it is caught here."""
    if data[:3] == b"\xff\xd8\xff":
        return "" if b"\xff\xd9" in data[-64:] else "truncated JPEG (no end-of-image marker)"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "" if b"IEND" in data[-16:] else "truncated PNG (no IEND chunk)"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "" if int.from_bytes(data[4:8], "little") + 8 <= len(data) else "truncated WebP"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as image:
                kind = image.format
    except Exception as error:  # PIL raises many types for bad bytes
        return f"not an image ({type(error).__name__}: {error})"
    return "" if kind in DALI_FORMATS else f"{kind} images are not decoded by DALI"
