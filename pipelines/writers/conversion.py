"""What a converter writes: the images of a folder (or of tar shards) every loader would read,
checked, and what it leaves out, in one description both writers take.

    images = folder_images(Path("data/imagenet/train"), limit=0)

The files are those of the shared walk (pipelines/sources/folder/listing.py: image extensions
only, the others reported; second paths to a file or folder reported, not converted); a class
folder without a usable image is refused, as every loader does. Each image is checked by the
loaders' own image check (pipelines/sources/folder/image_check.py: decoded at 1/8 scale by the
one decode rule), whose result is cached by the folder's contents and shared with the loaders: a
folder a run, tools/check_images.py or another conversion checked is not decoded again before it
is written. (A --limit subset, or tar shards, are checked here, without the cache.)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.errors import UserInputError
from pipelines.sources.folder.image_check import check_images, decode_all
from pipelines.sources.folder.listing import FolderListing, check_no_empty_class, list_image_folder


class ConversionError(UserInputError):
    """The source or the settings cannot give a .beton or shards; nothing was written."""


@dataclass
class SourceImages:
    """The images to convert, their check, and what is reported beside them."""
    source: str  # the folder, or the shard set's name, for metadata and messages
    classes: list[str]
    fingerprint: str  # of the whole source: a converted file is current while this holds
    images: list[tuple[str, int]]  # (path, or a shard member: sources/shards/member.py; label)
    problems: list[str]  # one per image: why it does not decode ('' when it does)
    found: int  # entries met: files, each real one once, and unreadable ones
    non_images: list[str] = field(default_factory=list)  # files without an image extension
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): broken links, bad labels
    duplicates: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): second paths, not converted
    limit: int = 0


def list_imagefolder(src: Path) -> FolderListing:
    """The shared walk's listing of src (classes, files, duplicate and unreadable entries)."""
    if not src.is_dir():
        raise ConversionError(f"source {src} is a file, not a folder (expected SRC/<class>/<image>)"
                              if src.exists() else f"source folder {src} does not exist")
    try:
        listing = list_image_folder(src)
    except FileNotFoundError:
        raise ConversionError(f"source folder {src} has no class sub-folders (expected SRC/<class>/<image>)") from None
    if not len(listing):
        raise ConversionError(f"source folder {src} has {len(listing.classes)} class folders but no files")
    return listing


def folder_images(src: Path, limit: int = 0, workers: int = 0) -> SourceImages:
    """The images of folder src (limit > 0: that many, evenly spaced), the empty-class rule applied
    before any work, each checked."""
    listing = list_imagefolder(src)
    indices = listing.image_indices()
    check_no_empty_class(src, listing.classes, set(np.unique(listing.labels[indices]).tolist()))
    images = [(listing.path(i), int(listing.labels[i])) for i in spread_subset(indices, limit)]
    if limit:
        problems = decode_all([path for path, _ in images], workers)
    else:
        bad = dict(check_images(listing, workers))
        problems = [bad.get(path, "") for path, _ in images]
    return SourceImages(str(src), listing.classes, listing.fingerprint(), images, problems,
                        found=len(listing) + len(listing.unreadable), non_images=listing.non_images(),
                        unreadable=listing.unreadable, duplicates=listing.duplicates, limit=limit)


def spread_subset(items, limit: int):
    """limit > 0: that many items, evenly spaced over the sorted list (so every class shows up)."""
    if 0 < limit < len(items):
        return [items[i] for i in np.linspace(0, len(items) - 1, limit).round().astype(int)]
    return items
