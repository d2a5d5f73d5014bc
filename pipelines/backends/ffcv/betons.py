"""loader=ffcv on tar shards, by converting: each split's shards → a .beton, once, with the FFCV
converter of folders (pipelines/writers/beton.py: every image checked by the one decode rule, bad ones
skipped and listed, the .beton appearing only when complete), fed the shards' images
(pipelines/sources/shards/member.py) instead of files.

    python tools/convert_ffcv.py data/imagenet-wds data/ffcv/val.beton --split validation
    train/run.py data.dataset=webdataset data.root=data/imagenet-wds loader=ffcv    # converts on first use

Samples are converted in the shards' order; a sample whose label cannot be read is skipped with its
reason like an unreadable image. The .beton's classes are the shard set's; its fingerprint is that
of the shard files (path, size, mtime), so changed shards are converted again.
"""
from __future__ import annotations

import os
from array import array
from dataclasses import asdict
from pathlib import Path

import numpy as np

from pipelines.writers.beton import ConversionError, StorageSettings, convert_imagefolder, read_metadata
from pipelines.sources.folder.listing import FolderListing, file_stamp
from pipelines.sources.shards.member import ShardMember
from pipelines.sources.shards.index import read_index, split_name
from pipelines.sources.shards.read import ShardReader, UnreadableSample
from pipelines.sources.shards.spec import IMAGE_EXTENSIONS, ShardSplit


def shard_stamps(shards: ShardSplit) -> array:
    return array("Q", [file_stamp(url, os.stat(url)) for url in shards.urls])


def shard_fingerprint(shards: ShardSplit, classes: list[str]) -> str:
    return FolderListing(Path(shards.source), list(classes), stamps=shard_stamps(shards)).fingerprint()


def shard_listing(shards: ShardSplit, classes: list[str], *, workers: int = 0, limit: int = 0) -> FolderListing:
    """The split's images as a converter listing: (ShardMember, label) per sample; unreadable
    labels in listing.unreadable. limit > 0 keeps that many samples, evenly spaced."""
    from pipelines.sources.shards.source import read_labels, split_table

    if shards.remote:
        raise ConversionError(f"{shards.source}: remote shards cannot be converted here; copy them first")
    table = split_table(shards, workers)
    picks = np.arange(len(table))
    if 0 < limit < len(table):
        picks = np.linspace(0, len(table) - 1, limit).round().astype(int)
    labels = read_labels(ShardReader(table, len(classes)), f"read {shards.split} labels")
    keys = [split_name(sample[0][3])[0] for path in table.index_files for sample in read_index(path)]
    listing = FolderListing(Path(shards.source), list(classes), stamps=shard_stamps(shards))
    for index in picks.tolist():
        (offset, size), ext = table.image[index].tolist(), IMAGE_EXTENSIONS[int(table.image_ext[index])]
        member = ShardMember(table.shards[table.locate(index)[0]], keys[index], ext, offset, size)
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


def staleness(beton: Path, shards: ShardSplit, classes: list[str], settings: StorageSettings) -> str:
    """'' when the .beton was made from these shards, as they are now, with these settings; else why not."""
    meta = read_metadata(beton)
    if not beton.is_file() or meta is None:
        return "none yet"
    if meta.get("bytes") != beton.stat().st_size:
        return "the .beton is incomplete"
    if meta.get("source") != str(Path(shards.source).resolve()) or meta.get("limit") != 0:
        return f"it was made from {meta.get('source')}"
    if meta.get("settings") != asdict(settings):
        return "the storage settings changed"
    if meta.get("fingerprint") != shard_fingerprint(shards, classes):
        return f"the shards of {shards.source} changed since they were converted"
    return ""


def convert_splits(cfg, classes: list[str]) -> None:
    """prepare() for loader=ffcv: each split's .beton (data.ffcv.*_beton if given, used as it is;
    else <data.root>/ffcv/<split>.beton, made unless current)."""
    from pipelines.backends.ffcv.loader import beton_path, storage_settings
    from pipelines.sources.shards.spec import shard_split

    settings = storage_settings(cfg)
    for split in ("train", "val"):
        shards, beton = shard_split(cfg.data, split), beton_path(cfg, split)
        given = cfg.data.ffcv.train_beton if split == "train" else cfg.data.ffcv.val_beton
        why = "" if given and beton.is_file() else staleness(beton, shards, classes, settings)
        if why:
            print(f"converting {shards.source} → {beton} ({why}; FFCV reads the .beton)")
            convert_shards(shards, classes, beton, settings, workers=cfg.data.workers)
