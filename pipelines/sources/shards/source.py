"""data.dataset=webdataset: tar shards (WebDataset's format) as the data source of every backend.

    train/run.py data.dataset=webdataset data.root=/data/imagenet-1k-wds loader=dali
    train/run.py data.dataset=webdataset data.train_shards='/x/train-{0000..0099}.tar' data.val_shards=...

A source, not a loader: the shards replace the ImageFolder under the backends that exist.
  local shards   read by index (pipelines/sources/shards/index.py, wds_read.py), so ShardSampler's order is
                 every backend's, exactly as for a folder: disjoint shards by global rank, equal
                 steps, val counting each sample once, order a function of (seed, epoch), exact
                 mid-epoch resume. torchvision: pipelines/backends/torchvision/shards.py; DALI:
                 pipelines/backends/dali/shards.py; FFCV: the shards converted to .beton files once
                 (pipelines/backends/ffcv/betons.py), then FFCV's own loader.
  remote shards  (pipe:, http://, ...) streamed by loader=torchvision with webdataset
                 (pipelines/backends/torchvision/stream.py), with the guarantees listed there.
Classes: the info file's names ("classes") or count ("num_classes"), else data.num_classes, else
one more than the largest label (read from every sample: say data.num_classes=K to skip that).
Without names, class i is called str(i).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch
from tqdm.auto import tqdm

from pipelines.sources.shards.index import SampleTable, build_table
from pipelines.sources.shards.read import ShardReader, UnreadableSample
from pipelines.sources.shards.spec import ShardSetError, ShardSplit, shard_split

_TABLES: dict[tuple[str, ...], SampleTable] = {}  # per process: train and val, prepare and make_loader


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
    bad = [x for x in labels if isinstance(x, UnreadableSample)]
    if bad:
        raise ShardSetError(f"{len(bad)} samples of {shards.source} have no usable label ({bad[0]})")
    return max(labels)


def read_labels(reader: ShardReader, desc: str) -> list[int | Exception]:
    """Every sample's label (or its UnreadableSample), read by 16 threads (small reads, I/O bound)."""
    def label(index):
        try:
            return reader.read_label(index)
        except UnreadableSample as bad:
            return bad

    with ThreadPoolExecutor(16) as pool:
        labels = pool.map(label, range(len(reader)), chunksize=256)
        return list(tqdm(labels, total=len(reader), desc=desc, unit="sample", disable=len(reader) < 10_000))


def prepare(cfg) -> None:
    """Up front, on the main process first: every local shard indexed (once) and checked, the classes
    known, and for loader=ffcv the .beton files made."""
    for split in ("train", "val"):
        shards = shard_split(cfg.data, split)
        if shards.remote:
            from pipelines.backends.torchvision.stream import check_streamable
            check_streamable(cfg, shards)
        else:
            split_table(shards, cfg.data.workers)
    classes = dataset_classes(cfg)
    if cfg.loader == "ffcv":
        from pipelines.backends.ffcv.betons import convert_splits
        convert_splits(cfg, classes)


def make_loader(cfg, split: str, *, rank: int, world_size: int, device: torch.device):
    shards = shard_split(cfg.data, split)
    classes = dataset_classes(cfg, split)
    if shards.remote:  # its check refuses the other loaders
        from pipelines.backends.torchvision.stream import StreamingLoader
        return StreamingLoader(cfg, split, shards, classes, rank=rank, world_size=world_size, device=device)
    if cfg.loader == "ffcv":  # prepare() converted the shards; FFCV reads the .beton as for a folder
        from pipelines.backends.ffcv.loader import make_loader as ffcv_loader
        return ffcv_loader(cfg, split, rank=rank, world_size=world_size, device=device)
    reader = ShardReader(split_table(shards, cfg.data.workers), len(classes))
    if cfg.loader == "dali":
        from pipelines.backends.dali.shards import ShardDaliLoader
        return ShardDaliLoader(cfg, split, reader, classes, rank=rank, world_size=world_size, device=device)
    from pipelines.backends.torchvision.shards import ShardTorchvisionLoader
    return ShardTorchvisionLoader(cfg, split, reader, classes, rank=rank, world_size=world_size, device=device)
