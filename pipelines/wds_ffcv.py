"""loader=ffcv on tar shards, by converting: each split's shards → a .beton, once, with the FFCV
converter of folders (pipelines/ffcv_writer.py: every image checked, bad ones skipped and listed,
the .beton appearing only when complete), fed the shards' images instead of files.

    python tools/convert_ffcv.py data/imagenet-wds data/ffcv/train.beton --split train
    train/run.py data.dataset=webdataset data.root=data/imagenet-wds loader=ffcv    # converts on first use

Samples are converted in the shards' order; a sample whose label cannot be read is skipped with its
reason like an unreadable image. The .beton's classes are the shard set's.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipelines.ffcv_writer import ConversionError, StorageSettings, convert_imagefolder
from pipelines.image_folder import FolderListing
from pipelines.wds_index import read_index, split_name
from pipelines.wds_read import ShardMember, ShardReader, UnreadableSample
from pipelines.wds_spec import ShardSplit


def shard_listing(shards: ShardSplit, classes: list[str], *, workers: int = 0, limit: int = 0) -> FolderListing:
    """The split's images as a converter listing: (ShardMember, label) per sample; unreadable
    labels in listing.unreadable. limit > 0 keeps that many samples, evenly spaced."""
    from pipelines.webdataset_source import read_labels, split_table

    if shards.remote:
        raise ConversionError(f"{shards.source}: remote shards cannot be converted here; copy them first")
    table = split_table(shards, workers)
    picks = np.arange(len(table))
    if 0 < limit < len(table):
        picks = np.linspace(0, len(table) - 1, limit).round().astype(int)
    reader = ShardReader(table, len(classes))
    labels = read_labels(reader, f"read {shards.split} labels")
    keys = [split_name(sample[0][3])[0] for path in table.index_files for sample in read_index(path)]
    listing = FolderListing(Path(shards.source), list(classes))
    for index in picks.tolist():
        shard = table.shards[table.locate(index)[0]]
        offset, size = table.image[index].tolist()
        member = ShardMember(shard, offset, size, keys[index])
        if isinstance(labels[index], UnreadableSample):
            listing.unreadable.append((str(member), labels[index].reason))
        else:
            listing.files.append((member, labels[index]))
    return listing


def convert_shards(shards: ShardSplit, classes: list[str], out: str | Path, settings: StorageSettings, *,
                   workers: int = 0, limit: int = 0) -> dict:
    """convert_imagefolder's conversion and summary, from shards."""
    listing = shard_listing(shards, classes, workers=workers, limit=limit)
    return convert_imagefolder(shards.source, out, settings, workers=workers, limit=limit, listing=listing)


def convert_splits(cfg, classes: list[str]) -> None:
    """prepare() for loader=ffcv: each split's .beton (data.ffcv.*_beton, else <data.root>/ffcv/) made
    unless a current one exists (made from these shards with these storage settings)."""
    from pipelines.ffcv_loader import beton_path, is_current, storage_settings
    from pipelines.wds_spec import shard_split

    settings = storage_settings(cfg)
    for split in ("train", "val"):
        shards, beton = shard_split(cfg.data, split), beton_path(cfg, split)
        user_given = bool(cfg.data.ffcv.train_beton if split == "train" else cfg.data.ffcv.val_beton)
        if (user_given and beton.is_file()) or is_current(beton, Path(shards.source), settings):
            continue
        print(f"converting {shards.source} → {beton} (once; FFCV reads the .beton)")
        summary = convert_shards(shards, classes, beton, settings, workers=cfg.data.workers)
        if summary["skipped"]:
            print(f"warning: {summary['skipped']} unreadable samples skipped, listed in {beton}.skipped.txt")
