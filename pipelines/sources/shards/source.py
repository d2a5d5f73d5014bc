"""data.dataset=webdataset: tar shards (WebDataset's format) as the data source of every backend.

    train/run.py data.dataset=webdataset data.root=/data/imagenet-1k-wds loader=dali
    train/run.py data.dataset=webdataset data.train_shards='/x/train-{0000..0099}.tar' data.val_shards=...

A source, not a loader: the shards replace the ImageFolder under the backends that exist.
  local shards   ShardSource: read by index (table.py, read.py), so ShardSampler's order is every
                 backend's, exactly as for a folder: disjoint shards by global rank, equal steps,
                 val counting each sample once, order a function of (seed, epoch), exact mid-epoch
                 resume. FFCV converts them to .beton files once (pipelines/backends/ffcv/betons.py).
  remote shards  StreamSource: (pipe:, http://, ...) streamed by the backends whose record says
                 `streams` (loader=torchvision: pipelines/backends/torchvision/stream.py).
Classes: the info file's names ("classes") or count ("num_classes"), else data.num_classes, else
one more than the largest label (read from every sample: say data.num_classes=K to skip that).
Without names, class i is called str(i).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from tqdm.auto import tqdm

from pipelines.sources.samples import EncodedSample
from pipelines.sources.shards.read import ShardReader
from pipelines.sources.shards.spec import ShardSetError, ShardSplit, shard_split
from pipelines.sources.shards.table import SampleTable, build_table
from pipelines.substitution import Unreadable

_TABLES: dict[tuple[str, ...], SampleTable] = {}  # per process: train and val, prepare and every loader


def split_table(shards: ShardSplit, workers: int = 0) -> SampleTable:
    key = tuple(shards.urls)
    if key not in _TABLES:
        _TABLES[key] = build_table(shards, workers)
    return _TABLES[key]


def dataset_classes(cfg, split: str = "train") -> list[str]:
    """The class names of the set (see the module doc). An info file's or data.num_classes hold for
    both splits; counted from labels, they are counted over both, so train and val agree."""
    this = shard_split(cfg.data, split)
    if this.classes or this.num_classes or cfg.data.num_classes:
        return set_classes([this], cfg.data.num_classes)
    splits = [shard_split(cfg.data, "train"), shard_split(cfg.data, "val")]
    return set_classes(splits, cfg.data.num_classes, cfg.data.workers)


def set_classes(splits: list[ShardSplit], num_classes: int = 0, workers: int = 0) -> list[str]:
    names = next((s.classes for s in splits if s.classes), None)
    count = num_classes or next((s.num_classes for s in splits if s.num_classes), None)
    if names and count != len(names):
        raise ShardSetError(f"data.num_classes={count} but {splits[0].source} names {len(names)} classes")
    if not count:
        count = 1 + max(largest_label(s, workers) for s in splits)
    return list(names) if names else [str(i) for i in range(count)]


def largest_label(shards: ShardSplit, workers: int = 0) -> int:
    if shards.remote:
        raise ShardSetError(f"{shards.source}: the number of classes is unknown (no \"num_classes\" in an info "
                            f"file): set data.num_classes")
    labels = read_labels(ShardReader(split_table(shards, workers), num_classes=2**62),
                         f"read {shards.split} labels (data.num_classes=K skips this)")
    bad = [x for x in labels if isinstance(x, Unreadable)]
    if bad:
        raise ShardSetError(f"{len(bad)} samples of {shards.source} have no usable label ({bad[0]})")
    return max(labels)


def read_labels(reader: ShardReader, desc: str) -> list[int | Exception]:
    """Every sample's label (or its Unreadable), read by 16 threads (small reads, I/O bound)."""
    def label(index):
        try:
            return reader.read_label(index)
        except Unreadable as bad:
            return bad

    with ThreadPoolExecutor(16) as pool:
        labels = pool.map(label, range(len(reader)), chunksize=256)
        return list(tqdm(labels, total=len(reader), desc=desc, unit="sample", disable=len(reader) < 10_000))


# ---------------------------------------------------------------------------------------------
# The sources

class ShardSource:
    """A split of local shards, read by index: what the backends read (see pipelines/sources/__init__.py)."""
    kind = "shards"

    def __init__(self, reader: ShardReader, classes: list[str]):
        self.reader, self.classes = reader, classes
        self.left_out: list[tuple[str, str]] = []  # nothing is left out before training (no decode check)

    def __len__(self) -> int:
        return len(self.reader)

    def where(self, index: int) -> str:
        return self.reader.table.where(index)

    def read(self, index: int) -> EncodedSample:
        return self.reader.read(index)

    def unreadable(self, index: int, error: Exception) -> Unreadable:
        """The failure of a sample whose bytes were read but do not decode (error: the decoder's)."""
        return Unreadable(self.where(index), f"does not decode: {type(error).__name__}: {error}")

    @staticmethod
    def failure_line(where: str, reason: str) -> str:
        return f"{where}: {reason}; the next sample of the set is used in its place"


@dataclass
class StreamSource:
    """A split of remote shards: streamed whole, in order (the backends whose record says `streams`)."""
    shards: ShardSplit
    classes: list[str]
    kind = "stream"


def check_streamable(shards: ShardSplit, loader: str, streaming: list[str]) -> None:
    """What streaming needs, checked before any work (the shards themselves are only opened to read)."""
    if shards.lengths is None:
        raise ShardSetError(f"{shards.source}: remote shards are streamed, which needs each shard's sample count: "
                            f"give data.root a folder (or URL) whose _info.json lists these shards")
    if loader not in streaming:
        raise ShardSetError(f"{shards.source}: remote shards are streamed by loader={' or loader='.join(streaming)} "
                            f"only; the other loaders read local shards (copy them first)")


def prepare_shards(cfg, streaming: list[str]) -> list[str]:
    """Up front, on the main process first: every local shard indexed (once) and checked, remote ones
    checked for streaming; returns the classes."""
    for split in ("train", "val"):
        shards = shard_split(cfg.data, split)
        if shards.remote:
            check_streamable(shards, cfg.loader, streaming)
        else:
            split_table(shards, cfg.data.workers)
    return dataset_classes(cfg)


def open_shards(cfg, split: str, streaming: list[str]) -> ShardSource | StreamSource:
    shards = shard_split(cfg.data, split)
    classes = dataset_classes(cfg, split)
    if shards.remote:
        check_streamable(shards, cfg.loader, streaming)
        return StreamSource(shards, classes)
    return ShardSource(ShardReader(split_table(shards, cfg.data.workers), len(classes)), classes)
