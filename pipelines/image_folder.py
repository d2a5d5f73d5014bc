"""The one walk of an ImageFolder (ROOT/<class>/.../<file>) that every backend and the FFCV
converter share, so they agree on the classes, the files, their order and their labels.

    listing = list_image_folder("data/imagenet/train")
    listing.classes    sorted class sub-folder names (torchvision's rule)
    listing.files      [(path, class index)], in torchvision's order: classes sorted, then folders
                       sorted by path, then file names sorted
    listing.skipped    [(path, reason)]: what the walk reached but did not list (duplicates: second
                       paths to a folder or file; unreadable: broken links)

Symbolic links are followed once. A link to a folder already walked (a loop such as `ln -s .
ROOT/1/self`, a class folder, ROOT itself) and a second path to a file already listed (a link, a
hard link) are skipped and reported, so each real file counts once and under one class. A broken
link is reported too. torchvision's own walk follows loops until the path is too long, listing
each image dozens of times.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from torchvision.datasets.folder import IMG_EXTENSIONS


@dataclass
class FolderListing:
    root: Path
    classes: list[str]
    files: list[tuple[str, int]] = field(default_factory=list)
    duplicates: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): loops, second paths
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): broken links

    @property
    def skipped(self) -> list[tuple[str, str]]:
        return self.duplicates + self.unreadable

    def images(self) -> list[tuple[str, int]]:
        """The files with an image extension (torchvision's list), each class needing one at least."""
        kept = [(path, label) for path, label in self.files if path.lower().endswith(IMG_EXTENSIONS)]
        empty = sorted(set(self.classes) - {self.classes[label] for _, label in kept})
        if empty:
            raise FileNotFoundError(f"image folder {self.root}: no image file ({', '.join(IMG_EXTENSIONS)}) "
                                    f"in the class folders {', '.join(empty[:10])}")
        return kept

    def skipped_summary(self) -> str:
        """One line for a warning: how many entries were skipped, and the first few."""
        examples = "; ".join(f"{path}: {reason}" for path, reason in self.skipped[:3])
        return f"{self.root}: {len(self.skipped)} entries skipped ({examples}{'; …' if len(self.skipped) > 3 else ''})"


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


def list_image_folder(root: str | Path) -> FolderListing:
    """Every file under every class folder of root, each real file once (see the module doc)."""
    root = Path(root)
    listing = FolderListing(root, find_classes(root))
    # Class folders and root count as walked from the start: a link to one of them is a loop or
    # another class's images, never a second copy to label.
    walked = {identity(root)} | {identity(root / name) for name in listing.classes}
    seen_files: dict[tuple[int, int], str] = {}
    for label, name in enumerate(listing.classes):
        for folder, names in sorted(walk(str(root / name), walked, listing.duplicates)):
            for file_name in sorted(names):
                path = os.path.join(folder, file_name)
                try:
                    real = identity(path)
                except OSError as error:  # a broken link, or a file gone since it was listed
                    listing.unreadable.append((path, f"unreadable entry: {error.strerror}"))
                    continue
                if real in seen_files:
                    listing.duplicates.append((path, f"same file as {seen_files[real]}"))
                    continue
                seen_files[real] = path
                listing.files.append((path, label))
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
