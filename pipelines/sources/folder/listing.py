"""The one walk of an ImageFolder (ROOT/<class>/.../<file>) that every backend and the FFCV
converter share, so they agree on the classes, the files, their order and their labels.

    listing = list_image_folder("data/imagenet/train")
    listing.classes    sorted class sub-folder names (torchvision's rule)
    listing.paths      every file's path under ROOT, in torchvision's order: classes sorted, then
                       folders sorted by path, then file names sorted (one byte buffer: samples.py)
    listing.labels     their class indices (int64); listing.path(i) is file i's whole path and
                       listing.files shows the (path, label) pairs
    listing.skipped    [(path, reason)]: what the walk reached but did not list (duplicates: second
                       paths to a folder or file; unreadable: broken links)
    listing.stamps     one 64-bit key per file: a hash of (path under root, size, mtime), from the
                       stat the walk makes anyway; listing.fingerprint() hashes them with the classes,
                       so any file fixed, added or removed changes it (the image check's cache key,
                       and what makes FFCV reconvert)
    listing.kept()     the indices of the files with an image extension (torchvision's IMG_EXTENSIONS)
                       that are not left_out (set by the image check), every class holding one at least

Symbolic links are followed once. A link to a folder already walked (a loop such as `ln -s .
ROOT/1/self`, a class folder, ROOT itself) and a second path to a file already listed (a link, a
hard link) are skipped and reported, so each real file counts once and under one class. A broken
link is reported too. torchvision's own walk follows loops until the path is too long, listing
each image dozens of times.

The walk also records each file's size and mtime and each folder's mtime: what
listing_cache.py compares to tell, without walking again, that the folder is as it was.
"""
from __future__ import annotations

import functools
import hashlib
import os
from array import array
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from torchvision.datasets.folder import IMG_EXTENSIONS

from common.errors import UserInputError
from pipelines.sources.samples import PathTable, SampleView


class EmptyClasses(UserInputError):
    """A class folder with no usable image: every backend refuses it (a model would get an output
    that no image trains)."""


@dataclass
class FolderListing:
    root: Path
    classes: list[str]
    paths: PathTable  # under root
    labels: np.ndarray  # int64, one per path
    is_image: np.ndarray  # bool: an image extension
    stamps: np.ndarray  # uint64, one per path: see file_stamp
    sizes: np.ndarray  # int64 bytes, one per path
    mtimes: np.ndarray  # int64 ns, one per path
    folders: PathTable  # every folder walked, under root ("" is root itself)
    folder_mtimes: np.ndarray  # int64 ns, one per folder
    duplicates: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): loops, second paths
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): broken links
    left_out: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): images that do not decode

    def __len__(self) -> int:
        return len(self.paths)

    @functools.cached_property
    def prefix(self) -> str:
        return os.path.join(str(self.root), "")

    def path(self, index: int) -> str:
        return self.prefix + self.paths[index]

    @property
    def files(self) -> SampleView:
        """[(path, class index)] of every file, made on demand."""
        return SampleView(len(self), lambda i: (self.path(i), int(self.labels[i])))

    @property
    def skipped(self) -> list[tuple[str, str]]:
        return self.duplicates + self.unreadable

    def fingerprint(self) -> str:
        """The folder's contents in 16 hex digits: classes and every file's path, size and mtime."""
        digest = hashlib.blake2b("\n".join(self.classes).encode(), digest_size=8)
        digest.update(np.ascontiguousarray(self.stamps, dtype=np.uint64).tobytes())
        return digest.hexdigest()

    def image_indices(self) -> np.ndarray:
        """Indices of the files with an image extension."""
        return np.flatnonzero(self.is_image).astype(np.int64)

    def non_images(self) -> list[str]:
        """Files without an image extension (notes.txt, .DS_Store): no backend reads them."""
        return [self.path(i) for i in np.flatnonzero(~self.is_image)]

    def index_of(self, path: str) -> int | None:
        """The index of a file given by its whole path (None: not listed). Looked for among its
        class's files only: the files are listed class after class."""
        relative = path[len(self.prefix):] if path.startswith(self.prefix) else None
        name = relative.split("/", 1)[0] if relative else None
        if name not in self.classes:
            return None
        label = self.classes.index(name)
        first, last = np.searchsorted(self.labels, [label, label + 1])
        wanted = os.fsencode(relative)
        return next((i for i in range(first, last) if self.paths.encoded(i) == wanted), None)

    def kept(self) -> np.ndarray:
        """Indices of the image files no check left out, each class needing one at least."""
        keep = self.is_image.copy()
        for path, _ in self.left_out:
            index = self.index_of(path)
            if index is not None:
                keep[index] = False
        kept = np.flatnonzero(keep).astype(np.int64)
        check_no_empty_class(self.root, self.classes, set(np.unique(self.labels[kept]).tolist()),
                             bool(self.left_out))
        return kept

    def images(self) -> list[tuple[str, int]]:
        """[(path, label)] of kept(): for small folders and reports."""
        return [(self.path(i), int(self.labels[i])) for i in self.kept()]

    def skipped_summary(self) -> str:
        """One line for a warning: how many entries were skipped, and the first few."""
        examples = "; ".join(f"{path}: {reason}" for path, reason in self.skipped[:3])
        return f"{self.root}: {len(self.skipped)} entries skipped ({examples}{'; …' if len(self.skipped) > 3 else ''})"


def check_no_empty_class(root, classes: list[str], labels_used: set[int], some_left_out: bool = False) -> None:
    """The one rule for empty class folders, on every backend and the FFCV converter: refuse them."""
    empty = [name for label, name in enumerate(classes) if label not in labels_used]
    if empty:
        also = " that decodes" if some_left_out else ""
        raise EmptyClasses(f"image folder {root}: no image file ({', '.join(IMG_EXTENSIONS)}){also} in the class "
                           f"folders {', '.join(empty[:10])}{' …' if len(empty) > 10 else ''}: every class needs "
                           f"one (remove the empty folders, or add images)")


def find_classes(folder: str | Path) -> list[str]:
    """Sorted class sub-folder names of an ImageFolder, with a clear error for a bad folder."""
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} is a file, not a folder (expected {folder}/<class>/<image>)")
    classes = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())
    if not classes:
        raise FileNotFoundError(f"image folder {folder} has no class sub-folders")
    return classes


def identity(status: os.stat_result) -> tuple[int, int]:
    """What a path really is (device, inode), whatever links led to it."""
    return status.st_dev, status.st_ino


def file_stamp(relative_path: str, status: os.stat_result) -> int:
    """A 64-bit key for a file's path under root, size and modification time: a file fixed, replaced
    or renamed gets a new one."""
    text = f"{relative_path}\0{status.st_size}\0{status.st_mtime_ns}".encode("utf-8", "surrogateescape")
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")


class Walk:
    """What the walk gathers, kept as arrays while it goes (no Python object per file survives it)."""

    def __init__(self, root: Path):
        self.root, self.prefix = root, len(str(root)) + 1
        self.paths, self.offsets = bytearray(), array("q", [0])
        self.labels, self.stamps, self.sizes, self.mtimes = array("q"), array("Q"), array("q"), array("q")
        self.is_image = bytearray()
        self.folders, self.folder_mtimes = [""], array("q", [os.stat(root).st_mtime_ns])
        self.duplicates, self.unreadable = [], []

    def add_file(self, path: str, label: int, status: os.stat_result) -> None:
        relative = path[self.prefix:]
        self.paths += os.fsencode(relative)
        self.offsets.append(len(self.paths))
        self.labels.append(label)
        self.stamps.append(file_stamp(relative, status))
        self.sizes.append(status.st_size)
        self.mtimes.append(status.st_mtime_ns)
        self.is_image.append(relative.lower().endswith(IMG_EXTENSIONS))

    def add_folder(self, path: str, status: os.stat_result) -> None:
        self.folders.append(path[self.prefix:])
        self.folder_mtimes.append(status.st_mtime_ns)

    def listing(self, classes: list[str]) -> FolderListing:
        def arr(values, dtype):
            return np.frombuffer(values, dtype=dtype).copy() if len(values) else np.zeros(0, dtype)
        return FolderListing(self.root, classes, PathTable(arr(self.paths, np.uint8), arr(self.offsets, np.int64)),
                             arr(self.labels, np.int64), arr(self.is_image, np.bool_), arr(self.stamps, np.uint64),
                             arr(self.sizes, np.int64), arr(self.mtimes, np.int64),
                             PathTable.from_strings(self.folders), arr(self.folder_mtimes, np.int64),
                             self.duplicates, self.unreadable)


def list_image_folder(root: str | Path) -> FolderListing:
    """Every file under every class folder of root, each real file once (see the module doc)."""
    root = Path(root)
    classes = find_classes(root)
    found = Walk(root)
    # Class folders and root count as walked from the start: a link to one of them is a loop or
    # another class's images, never a second copy to label.
    walked = {identity(os.stat(root))} | {identity(os.stat(root / name)) for name in classes}
    seen_files: dict[tuple[int, int], str] = {}
    for label, name in enumerate(classes):
        for folder, names in sorted(walk(str(root / name), walked, found)):
            for file_name in sorted(names):
                path = os.path.join(folder, file_name)
                try:
                    status = os.stat(path)
                except OSError as error:  # a broken link, or a file gone since it was listed
                    found.unreadable.append((path, f"unreadable entry: {error.strerror}"))
                    continue
                real = identity(status)
                if real in seen_files:
                    found.duplicates.append((path, f"same file as {seen_files[real]}"))
                    continue
                seen_files[real] = path
                found.add_file(path, label, status)
    return found.listing(classes)


def walk(top: str, walked: set, found: Walk) -> list[tuple[str, list[str]]]:
    """(folder, names of non-folder entries) for top and every folder below it, links followed
    once; folders reached a second time are recorded as duplicates instead of walked again. Each
    folder's mtime is taken before it is read: a change while it is read shows as a change later."""
    result, pending = [], [top]
    while pending:
        folder = pending.pop()
        found.add_folder(folder, os.stat(folder))
        names = []
        with os.scandir(folder) as entries:
            for entry in entries:
                if not entry.is_dir():  # follows links: a link to a file is a file here
                    names.append(entry.name)
                    continue
                real = identity(os.stat(entry.path))
                if real in walked:
                    found.duplicates.append((entry.path, "link to a folder already listed (a loop or a second path)"))
                    continue
                walked.add(real)
                pending.append(entry.path)
        result.append((folder, names))
    return result
