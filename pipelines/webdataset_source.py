"""data.dataset=webdataset: tar shards (WebDataset's format) as the data source of every backend.

    train/run.py data.dataset=webdataset data.root=/data/imagenet-1k-wds loader=dali
    train/run.py data.dataset=webdataset data.train_shards='/x/train-{0000..0099}.tar' data.val_shards=...

A source, not a loader: the shards replace the ImageFolder under the backends that exist.
  local shards   read by index (pipelines/wds_index.py, wds_read.py), so ShardSampler's order is
                 every backend's, exactly as for a folder: disjoint shards by global rank, equal
                 steps, val counting each sample once, order a function of (seed, epoch), exact
                 mid-epoch resume. torchvision: pipelines/wds_torchvision.py; DALI:
                 pipelines/wds_dali.py; FFCV: the shards converted to .beton files once
                 (pipelines/wds_ffcv.py), then FFCV's own loader.
  remote shards  (pipe:, http://, ...) streamed by loader=torchvision with webdataset
                 (pipelines/wds_stream.py), with the guarantees listed there.
Classes: the info file's names ("classes") or count ("num_classes"), else data.num_classes, else
one more than the largest label (read from every sample: say data.num_classes=K to skip that).
Without names, class i is called str(i).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch
from tqdm.auto import tqdm

from pipelines.wds_index import SampleTable, build_table
from pipelines.wds_read import ShardReader
from pipelines.wds_spec import ShardSetError, ShardSplit, shard_split

_TABLES: dict[tuple[str, ...], SampleTable] = {}  # per process: train and val, prepare and make_loader


def split_table(shards: ShardSplit, workers: int = 0) -> SampleTable:
    key = tuple(shards.urls)
    if key not in _TABLES:
        _TABLES[key] = build_table(shards, workers)
    return _TABLES[key]


def dataset_classes(cfg) -> list[str]:
    """The class names of the set (see the module doc); train and val must agree."""
    train, val = shard_split(cfg.data, "train"), shard_split(cfg.data, "val")
    names = train.classes or val.classes
    count = cfg.data.num_classes or train.num_classes or val.num_classes
    if names and count != len(names):
        raise ShardSetError(f"data.num_classes={count} but {train.source} names {len(names)} classes")
    if not count:
        count = 1 + max(largest_label(train, cfg), largest_label(val, cfg))
    return list(names) if names else [str(i) for i in range(count)]


def largest_label(shards: ShardSplit, cfg) -> int:
    if shards.remote:
        raise ShardSetError(f"{shards.source}: the number of classes is unknown (no \"num_classes\" in an info "
                            f"file): set data.num_classes")
    reader = ShardReader(split_table(shards, cfg.data.workers), num_classes=2**62)
    with ThreadPoolExecutor(16) as pool:  # small reads, I/O bound
        labels = pool.map(reader.read_label, range(len(reader)), chunksize=256)
        return max(tqdm(labels, total=len(reader), desc=f"read {shards.split} labels (set data.num_classes to skip)",
                        unit="sample", disable=len(reader) < 10_000))


def prepare(cfg) -> None:
    """Up front, on the main process first: every local shard indexed (once) and checked, the classes
    known, and for loader=ffcv the .beton files made."""
    for split in ("train", "val"):
        shards = shard_split(cfg.data, split)
        if shards.remote:
            from pipelines.wds_stream import check_streamable
            check_streamable(cfg, shards)
        else:
            split_table(shards, cfg.data.workers)
    classes = dataset_classes(cfg)
    if cfg.loader == "ffcv":
        from pipelines.wds_ffcv import convert_splits
        convert_splits(cfg, classes)


def make_loader(cfg, split: str, *, rank: int, world_size: int, device: torch.device):
    shards = shard_split(cfg.data, split)
    classes = dataset_classes(cfg)
    if shards.remote:
        if cfg.loader != "torchvision":
            raise ShardSetError(f"{shards.source}: remote shards are streamed by loader=torchvision only; "
                                f"DALI and FFCV read local shards (copy them first)")
        from pipelines.wds_stream import StreamingLoader
        return StreamingLoader(cfg, split, shards, classes, rank=rank, world_size=world_size, device=device)
    if cfg.loader == "ffcv":  # prepare() converted the shards; FFCV reads the .beton as for a folder
        from pipelines.ffcv_loader import make_loader as ffcv_loader
        return ffcv_loader(cfg, split, rank=rank, world_size=world_size, device=device)
    reader = ShardReader(split_table(shards, cfg.data.workers), len(classes))
    if cfg.loader == "dali":
        from pipelines.wds_dali import ShardDaliLoader
        return ShardDaliLoader(cfg, split, reader, classes, rank=rank, world_size=world_size, device=device)
    from pipelines.wds_torchvision import ShardTorchvisionLoader
    return ShardTorchvisionLoader(cfg, split, reader, classes, rank=rank, world_size=world_size, device=device)
