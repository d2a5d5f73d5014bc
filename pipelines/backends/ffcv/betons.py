"""The .beton files loader=ffcv reads: made from the source once, and again when it changes.

prepare(cfg) converts each split of the source to <data.root>/ffcv/{train,val}.beton (the
writer: pipelines/writers/beton.py), and again when the storage settings or the source's contents
change (its fingerprint: every file's path, size and mtime; for tar shards every shard's), read
from the source's cached listing (pipelines/sources/folder/listing_cache.py), not by walking it.
data.ffcv.train_beton/val_beton point at betons made with tools/convert_ffcv.py instead, used as
they are, with a warning when their source folder has changed since.

    python tools/convert_ffcv.py data/imagenet-wds data/ffcv/val.beton --split validation
    train/run.py data.dataset=webdataset data.root=data/imagenet-wds loader=ffcv    # converts on first use

Tar shards are converted in the shards' order, their images read where they lie
(pipelines/sources/shards/member.py); a sample whose label cannot be read is skipped with its
reason like an unreadable image. The .beton's classes are the shard set's.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np

from pipelines.sources.folder.image_check import decode_all
from pipelines.sources.folder.listing import check_no_empty_class, file_stamp
from pipelines.sources.folder.listing_cache import folder_listing
from pipelines.sources.folder.source import split_folder
from pipelines.sources.shards.index import read_index, split_name
from pipelines.sources.shards.member import ShardMember
from pipelines.sources.shards.read import ShardReader
from pipelines.sources.shards.source import dataset_classes, read_labels, split_table
from pipelines.sources.shards.spec import IMAGE_EXTENSIONS, ShardSplit, shard_split
from pipelines.substitution import Unreadable
from pipelines.writers.beton import convert_imagefolder, read_metadata
from pipelines.writers.beton_storage import StorageSettings
from pipelines.writers.conversion import ConversionError, SourceImages, spread_subset


def storage_settings(cfg) -> StorageSettings:
    f = cfg.data.ffcv
    return StorageSettings(max_resolution=f.max_resolution, write_mode=f.write_mode,
                           compress_probability=f.compress_probability, jpeg_quality=f.jpeg_quality)


def beton_path(cfg, split: str) -> Path:
    given = cfg.data.ffcv.train_beton if split == "train" else cfg.data.ffcv.val_beton
    return Path(given) if given else Path(cfg.data.root) / "ffcv" / f"{split}.beton"


def given_beton(cfg, split: str) -> bool:
    return bool(cfg.data.ffcv.train_beton if split == "train" else cfg.data.ffcv.val_beton)


def prepare(cfg) -> None:
    """Each split's .beton: a given one used as it is (a warning when its folder changed); the
    default one made unless current."""
    settings = storage_settings(cfg)
    shards = cfg.data.dataset == "webdataset"
    classes = dataset_classes(cfg) if shards else None
    for split in ("train", "val"):
        beton = beton_path(cfg, split)
        if given_beton(cfg, split) and beton.is_file():
            if not shards:
                warn_if_source_changed(beton, split)
            continue
        if shards:
            source = shard_split(cfg.data, split)
            why = shard_staleness(beton, source, classes, settings)
            if why:
                print(f"converting {source.source} → {beton} ({why}; FFCV reads the .beton)")
                convert_shards(source, classes, beton, settings, workers=cfg.data.workers)
            continue
        source = split_folder(cfg, split)
        why = staleness(beton, source, settings)
        if why:
            print(f"converting {source} → {beton} ({why}; FFCV reads the .beton)")
            convert_imagefolder(source, beton, settings, workers=cfg.data.workers)  # what it left out: in its .json


# ---------------------------------------------------------------------------------------------
# Is a .beton current?

def is_current(beton: Path, source: Path, settings: StorageSettings) -> bool:
    """Made by our writer from this folder, as it is now, with these settings, and complete."""
    return not staleness(beton, source, settings)


def made_as_asked(beton: Path, source: str, settings: StorageSettings) -> str:
    """'' when the .beton is ours, complete, of all of `source`, with these settings; else why not."""
    meta = read_metadata(beton)
    if not beton.is_file() or meta is None:
        return "none yet"
    if meta.get("bytes") != beton.stat().st_size:
        return "the .beton is incomplete"
    if meta.get("source") != str(Path(source).resolve()) or meta.get("limit") != 0:
        subset = f" (--limit {meta.get('limit')})" if meta.get("limit") else ""
        return f"it was made from {meta.get('source')}{subset}"
    if meta.get("settings") != asdict(settings):
        return "the storage settings changed"
    return ""


def staleness(beton: Path, source: Path, settings: StorageSettings) -> str:
    """'' when the .beton is current (see is_current), else why it is not."""
    return made_as_asked(beton, str(source), settings) or folder_change(read_metadata(beton), source)


def folder_change(meta: dict, source: Path) -> str:
    """'' if source holds what it held when the .beton was made, else what changed."""
    listing = folder_listing(source)
    if meta.get("fingerprint") == listing.fingerprint():
        return ""
    then, now = meta.get("found", 0) - meta.get("duplicates", 0), len(listing) + len(listing.unreadable)
    return f"{source} changed since it was converted ({then} files then, {now} now)"


def warn_if_source_changed(beton: Path, split: str) -> None:
    """A given .beton whose source folder (known from its metadata, if it still exists) changed."""
    meta = read_metadata(beton)
    source = Path(meta["source"]) if meta and meta.get("source") else None
    if source is None or not source.is_dir() or "fingerprint" not in meta:
        return
    change = folder_change(meta, source)
    if change:
        print(f"warning: data.ffcv.{split}_beton={beton}: {change}; it is used as it is (reconvert with "
              f"tools/convert_ffcv.py --overwrite to train on the folder as it is now)", flush=True)


def converted_copy(folder: Path, cache_dir: Path, settings: StorageSettings) -> Path:
    """folder converted with these settings under cache_dir, named by them (reused while current)."""
    name = (f"{folder.name}-r{settings.max_resolution}-{settings.write_mode}"
            f"-p{settings.compress_probability:g}-q{settings.jpeg_quality}.beton")
    beton = cache_dir / name
    if not is_current(beton, folder, settings):
        convert_imagefolder(folder, beton, settings)
    return beton


# ---------------------------------------------------------------------------------------------
# Tar shards

def shard_fingerprint(shards: ShardSplit, classes: list[str]) -> str:
    """The shards as they are now (each one's path, size and mtime) with the classes."""
    digest = hashlib.blake2b("\n".join(classes).encode(), digest_size=8)
    digest.update(np.array([file_stamp(url, os.stat(url)) for url in shards.urls], dtype=np.uint64).tobytes())
    return digest.hexdigest()


def shard_staleness(beton: Path, shards: ShardSplit, classes: list[str], settings: StorageSettings) -> str:
    """'' when the .beton was made from these shards, as they are now, with these settings; else why not."""
    why = made_as_asked(beton, shards.source, settings)
    if why:
        return why.split(" (--limit")[0]
    if read_metadata(beton).get("fingerprint") != shard_fingerprint(shards, classes):
        return f"the shards of {shards.source} changed since they were converted"
    return ""


def shard_images(shards: ShardSplit, classes: list[str], *, workers: int = 0, limit: int = 0) -> SourceImages:
    """The split's images for the writer: (ShardMember, label) per sample; unreadable labels
    apart. limit > 0 keeps that many samples, evenly spaced."""
    if shards.remote:
        raise ConversionError(f"{shards.source}: remote shards cannot be converted here; copy them first")
    table = split_table(shards, workers)
    picks = spread_subset(np.arange(len(table)), limit)
    labels = read_labels(ShardReader(table, len(classes)), f"read {shards.split} labels")
    keys = [split_name(sample[0][3])[0] for path in table.index_files for sample in read_index(path)]
    images, unreadable = [], []
    for index in picks:
        (offset, size), ext = table.image[index].tolist(), IMAGE_EXTENSIONS[int(table.image_ext[index])]
        member = ShardMember(table.shards[table.locate(index)[0]], keys[index], ext, offset, size)
        if isinstance(labels[index], Unreadable):
            unreadable.append((str(member), labels[index].reason))
        else:
            images.append((member, labels[index]))
    check_no_empty_class(shards.source, classes, {label for _, label in images})  # the loaders' rule, up front
    problems = decode_all([member for member, _ in images], workers)  # the image check's rule, not cached
    return SourceImages(shards.source, list(classes), shard_fingerprint(shards, classes), images, problems,
                        found=len(images) + len(unreadable), unreadable=unreadable, limit=limit)


def convert_shards(shards: ShardSplit, classes: list[str], out: str | Path, settings: StorageSettings, *,
                   workers: int = 0, limit: int = 0) -> dict:
    """convert_imagefolder's conversion and summary, from shards."""
    images = shard_images(shards, classes, workers=workers, limit=limit)
    return convert_imagefolder(shards.source, out, settings, workers=workers, limit=limit, images=images)
