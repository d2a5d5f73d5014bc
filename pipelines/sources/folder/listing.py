"""The one walk of an ImageFolder (ROOT/<class>/.../<file>) that every backend and the FFCV
converter share, so they agree on the classes, the files, their order and their labels.

    listing = list_image_folder("data/imagenet/train")
    listing.classes    sorted class sub-folder names (torchvision's rule)
    listing.files      [(path, class index)], in torchvision's order: classes sorted, then folders
                       sorted by path, then file names sorted
    listing.skipped    [(path, reason)]: what the walk reached but did not list (duplicates: second
                       paths to a folder or file; unreadable: broken links)
    listing.stamps     one 64-bit key per file: a hash of (path under root, size, mtime), from the
                       stat the walk makes anyway; listing.fingerprint() hashes them with the classes,
                       so any file fixed, added or removed changes it (the image check's cache key,
                       and what makes FFCV reconvert)
    listing.images()   the files with an image extension (torchvision's IMG_EXTENSIONS) that are not
                       left_out (set by pipelines/sources/folder/image_check.py), every class holding one at least

Symbolic links are followed once. A link to a folder already walked (a loop such as `ln -s .
ROOT/1/self`, a class folder, ROOT itself) and a second path to a file already listed (a link, a
hard link) are skipped and reported, so each real file counts once and under one class. A broken
link is reported too. torchvision's own walk follows loops until the path is too long, listing
each image dozens of times.
"""
from __future__ import annotations

import hashlib
import os
from array import array
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from torchvision.datasets.folder import IMG_EXTENSIONS

from common.errors import UserInputError


class EmptyClasses(UserInputError):
    """A class folder with no usable image: every backend refuses it (a model would get an output
    that no image trains)."""


@dataclass
class FolderListing:
    root: Path
    classes: list[str]
    files: list[tuple[str, int]] = field(default_factory=list)
    duplicates: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): loops, second paths
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): broken links
    stamps: array = field(default_factory=lambda: array("Q"))  # one per file: see file_stamp
    left_out: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): images that do not decode

    @property
    def skipped(self) -> list[tuple[str, str]]:
        return self.duplicates + self.unreadable

    def fingerprint(self) -> str:
        """The folder's contents in 16 hex digits: classes and every file's path, size and mtime."""
        digest = hashlib.blake2b("\n".join(self.classes).encode(), digest_size=8)
        digest.update(np.frombuffer(self.stamps, dtype=np.uint64).tobytes())
        return digest.hexdigest()

    def image_indices(self) -> np.ndarray:
        """Indices into files of those with an image extension."""
        return np.array([i for i, (path, _) in enumerate(self.files) if path.lower().endswith(IMG_EXTENSIONS)],
                        dtype=np.int64)

    def non_images(self) -> list[str]:
        """Files without an image extension (notes.txt, .DS_Store): no backend reads them."""
        return [path for path, _ in self.files if not path.lower().endswith(IMG_EXTENSIONS)]

    def images(self) -> list[tuple[str, int]]:
        """The image files no check left out, each class needing one at least."""
        left_out = {path for path, _ in self.left_out}
        kept = [(path, label) for path, label in self.files
                if path.lower().endswith(IMG_EXTENSIONS) and path not in left_out]
        check_no_empty_class(self.root, self.classes, {label for _, label in kept}, bool(left_out))
        return kept

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


def identity(path: str) -> tuple[int, int]:
    """What a path really is (device, inode), whatever links led to it."""
    status = os.stat(path)
    return status.st_dev, status.st_ino


def file_stamp(relative_path: str, status: os.stat_result) -> int:
    """A 64-bit key for a file's path under root, size and modification time: a file fixed, replaced
    or renamed gets a new one."""
    text = f"{relative_path}\0{status.st_size}\0{status.st_mtime_ns}".encode("utf-8", "surrogateescape")
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")


def list_image_folder(root: str | Path) -> FolderListing:
    """Every file under every class folder of root, each real file once (see the module doc)."""
    root = Path(root)
    listing = FolderListing(root, find_classes(root))
    # Class folders and root count as walked from the start: a link to one of them is a loop or
    # another class's images, never a second copy to label.
    walked = {identity(root)} | {identity(root / name) for name in listing.classes}
    seen_files: dict[tuple[int, int], str] = {}
    prefix = len(str(root)) + 1
    for label, name in enumerate(listing.classes):
        for folder, names in sorted(walk(str(root / name), walked, listing.duplicates)):
            for file_name in sorted(names):
                path = os.path.join(folder, file_name)
                try:
                    status = os.stat(path)
                except OSError as error:  # a broken link, or a file gone since it was listed
                    listing.unreadable.append((path, f"unreadable entry: {error.strerror}"))
                    continue
                real = status.st_dev, status.st_ino
                if real in seen_files:
                    listing.duplicates.append((path, f"same file as {seen_files[real]}"))
                    continue
                seen_files[real] = path
                listing.files.append((path, label))
                listing.stamps.append(file_stamp(path[prefix:], status))
    return listing


def walk(top: str, walked: set, skipped: list) -> list[tuple[str, list[str]]]:
    """(folder, names of non-folder entries) for top and every folder below it, links followed
    once; folders reached a second time are recorded in skipped instead of walked again."""
    result, pending = [], [top]
    while pending:
        folder = pending.pop()
        names = []
        with os.scandir(folder) as entries:
            for entry in entries:
                if not entry.is_dir():  # follows links: a link to a file is a file here
                    names.append(entry.name)
                    continue
                real = identity(entry.path)
                if real in walked:
                    skipped.append((entry.path, "link to a folder already listed (a loop or a second path)"))
                    continue
                walked.add(real)
                pending.append(entry.path)
        result.append((folder, names))
    return result
