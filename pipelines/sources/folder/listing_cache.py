"""A folder's walk kept beside the image check's cache, so that a start reads it instead of walking.

    listing = folder_listing("data/imagenet/train")     # walked the first time, read after that

$XDG_CACHE_HOME/advprop-trainer/image-check/<folder>.listing.npz holds the listing's arrays (paths,
labels, stamps, sizes and mtimes; the folders walked and their mtimes) and what the walk skipped.
It stands for the folder while the folder is as it was, judged by the stamps the image check's
cache is keyed by, compared without hashing: every folder walked keeps its mtime (a file added,
removed or renamed changes it), every file its size and mtime (a file changed in place changes
them), every unreadable entry stays unreadable. That costs one os.stat per file (~3 µs on a local
disk, against ~7 µs for the walk and its hashes); anything else is walked again and rewritten.

Within one process a listing already checked is reused while its folders' mtimes hold, unless the
caller asks for every file to be stat'ed again (prepare_dataset does; the build_loader calls after
it do not: one listing per start).
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np

from pipelines.cache_files import cache_folder, folder_key, read_arrays, warn_damaged, write_arrays
from pipelines.sources.folder.listing import FolderListing, list_image_folder
from pipelines.sources.samples import PathTable

FORMAT = 1  # of the cache file; another number: built again
ARRAYS = ("paths", "offsets", "labels", "is_image", "stamps", "sizes", "mtimes", "folders", "folder_offsets",
          "folder_mtimes", "about")
_CHECKED: dict[str, FolderListing] = {}  # folder key → a listing checked in this process


def listing_path(root: Path) -> Path:
    return cache_folder("image-check") / f"{folder_key(root)}.listing.npz"


def folder_listing(root: str | Path, *, recheck_files: bool = True) -> FolderListing:
    """root's listing (list_image_folder's), from the cache when the folder is unchanged."""
    root = Path(root)
    key = folder_key(root)
    known = _CHECKED.get(key)
    if known is not None and not recheck_files and folders_unchanged(known):
        return fresh_copy(known)
    cached = read_listing(listing_path(root), root)
    if cached is not None and folders_unchanged(cached) and files_unchanged(cached):
        listing = cached
    else:
        listing = list_image_folder(root)
        write_listing(listing_path(root), listing)
    _CHECKED[key] = listing
    return fresh_copy(listing)


def fresh_copy(listing: FolderListing) -> FolderListing:
    """The listing with its own left_out (set by each caller's check); the arrays are shared."""
    return dataclasses.replace(listing, left_out=[])


# ---------------------------------------------------------------------------------------------
# Is the folder as it was?

CHUNK = 65_536  # paths stat'ed at a time: the comparison's memory stays small at any size


def stamps_hold(prefix: bytes, paths: PathTable, mtimes: np.ndarray, sizes: np.ndarray | None = None) -> bool:
    """Every path (under prefix) still has its mtime (and size): one os.stat each, chunk by chunk."""
    data = paths.data.tobytes()
    for start in range(0, len(paths), CHUNK):
        end = min(start + CHUNK, len(paths))
        bounds = paths.offsets[start:end + 1].tolist()
        found_mtimes, found_sizes = np.empty(end - start, np.int64), np.empty(end - start, np.int64)
        for position in range(end - start):
            try:
                status = os.stat(prefix + data[bounds[position]:bounds[position + 1]])
            except OSError:  # gone
                return False
            found_mtimes[position], found_sizes[position] = status.st_mtime_ns, status.st_size
        if not np.array_equal(found_mtimes, mtimes[start:end]) or (
                sizes is not None and not np.array_equal(found_sizes, sizes[start:end])):
            return False
    return True


def folders_unchanged(listing: FolderListing) -> bool:
    return stamps_hold(os.fsencode(listing.prefix), listing.folders, listing.folder_mtimes)


def files_unchanged(listing: FolderListing) -> bool:
    return (stamps_hold(os.fsencode(listing.prefix), listing.paths, listing.mtimes, listing.sizes)
            and not any(os.path.exists(path) for path, _ in listing.unreadable))  # a broken link mended


# ---------------------------------------------------------------------------------------------
# The file

def write_listing(path: Path, listing: FolderListing) -> None:
    about = {"format": FORMAT, "root": str(listing.root), "classes": listing.classes,
             "duplicates": listing.duplicates, "unreadable": listing.unreadable}
    write_arrays(path, paths=listing.paths.data, offsets=listing.paths.offsets, labels=listing.labels,
                 is_image=listing.is_image, stamps=listing.stamps, sizes=listing.sizes, mtimes=listing.mtimes,
                 folders=listing.folders.data, folder_offsets=listing.folders.offsets,
                 folder_mtimes=listing.folder_mtimes,
                 about=np.frombuffer(json.dumps(about).encode("utf-8", "surrogateescape"), dtype=np.uint8))


def read_listing(path: Path, root: Path) -> FolderListing | None:
    """The cached listing of root, or None (missing, damaged, another format or another folder)."""
    arrays = read_arrays(path, ARRAYS)
    if arrays is None:
        return None
    try:
        about = json.loads(arrays["about"].tobytes().decode("utf-8", "surrogateescape"))
        if about.get("format") != FORMAT or about.get("root") != str(root):
            return None  # another version's, or the same folder by another path: walk
        listing = FolderListing(root, about["classes"], PathTable(arrays["paths"], arrays["offsets"]),
                                arrays["labels"], arrays["is_image"], arrays["stamps"], arrays["sizes"],
                                arrays["mtimes"], PathTable(arrays["folders"], arrays["folder_offsets"]),
                                arrays["folder_mtimes"], [tuple(x) for x in about["duplicates"]],
                                [tuple(x) for x in about["unreadable"]])
        n = len(listing.paths)
        if not (len(listing.labels) == len(listing.stamps) == len(listing.sizes) == len(listing.mtimes)
                == len(listing.is_image) == n and len(listing.folder_mtimes) == len(listing.folders)
                and listing.paths.offsets[-1] == len(listing.paths.data)):
            raise ValueError("its arrays do not agree in length")
    except (ValueError, KeyError, TypeError, IndexError) as error:
        warn_damaged(path, str(error))
        return None
    return listing
