"""An ImageFolder split as the source of a loader: its files, checked up front, as arrays.

    source = open_folder(cfg, "train")          # the walk (cached), the image check (cached)
    source.read(i)                              # EncodedSample: the file's bytes and its label

The listing is listing_cache.py's (one walk per start at most); the images that do not decode
are left out by the up-front check (image_check.py, cfg.data.check_images) for the backends that
decode the folder's files while training (their record's `decodes_files`). Each kind of file no
batch will hold is said once (rank 0), so none is dropped silently. The kept images are an index
array into the listing: a DataLoader worker reads them without copying (pipelines/sources/samples.py).
"""
from __future__ import annotations

import os
from pathlib import Path

from pipelines.sources.folder.image_check import check_images, report_path
from pipelines.sources.folder.listing import FolderListing, find_classes
from pipelines.sources.folder.listing_cache import folder_listing
from pipelines.sources.image_decode import decode_problem
from pipelines.sources.samples import EncodedSample, SampleView
from pipelines.substitution import Unreadable


class FolderSource:
    kind = "folder"

    def __init__(self, listing: FolderListing):
        self.listing, self.classes = listing, listing.classes
        self.index = listing.kept()  # into the listing's files
        self.labels = listing.labels[self.index]
        self.left_out = list(listing.left_out)

    def __len__(self) -> int:
        return len(self.index)

    def path(self, index: int) -> str:
        return self.listing.path(self.index[index])

    def encoded_path(self, index: int) -> bytes:
        return os.fsencode(self.listing.prefix) + self.listing.paths.encoded(self.index[index])

    def where(self, index: int) -> str:
        return self.path(index)

    @property
    def samples(self) -> SampleView:
        """[(path, label)] of the source, made on demand."""
        return SampleView(len(self), lambda i: (self.path(i), int(self.labels[i])))

    def read(self, index: int) -> EncodedSample:
        path = self.path(index)
        try:
            with open(path, "rb") as file:
                return EncodedSample(file.read(), int(self.labels[index]), Path(path).suffix.lower().lstrip("."))
        except OSError as error:
            raise self.unreadable(index, error) from None

    def unreadable(self, index: int, error: Exception) -> Unreadable:
        """The failure of image index (error: the reading's or the decoder's), in the check's words."""
        path = self.path(index)
        return Unreadable(path, decode_problem(path)[0] or f"{type(error).__name__}: {error}")

    @staticmethod
    def failure_line(where: str, reason: str) -> str:
        return f"{where} does not decode ({reason}); the next image of the folder is used in its place"


def split_folder(cfg, split: str) -> Path:
    return Path(cfg.data.root) / (cfg.data.train_dir if split == "train" else cfg.data.val_dir)


def checked_listing(cfg, split: str, *, check: bool, recheck_files: bool = False) -> FolderListing:
    """The split folder's listing with its undecodable images left out (when `check` and
    cfg.data.check_images)."""
    listing = folder_listing(split_folder(cfg, split), recheck_files=recheck_files)
    if check and cfg.data.check_images:
        listing.left_out = check_images(listing)
    return listing


def open_folder(cfg, split: str, *, rank: int = 0, check: bool = True) -> FolderSource:
    """The split as a source; rank 0 says what it leaves out."""
    source = FolderSource(checked_listing(cfg, split, check=check))
    if rank == 0:
        for line in folder_warnings(source.listing):
            print(f"warning: {line}", flush=True)
    return source


def prepare_folders(cfg, *, check: bool) -> None:
    """Up front, on the main process first: both splits must be class folders; with `check`, each is
    listed and checked (with a progress bar), and an empty class is refused before any work."""
    for split in ("train", "val"):
        find_classes(split_folder(cfg, split))  # a clear error for a missing or empty folder
    if check:
        for split in ("train", "val"):
            checked_listing(cfg, split, check=True, recheck_files=True).kept()


def folder_warnings(listing: FolderListing) -> list[str]:
    lines = [listing.skipped_summary()] if listing.skipped else []
    others = listing.non_images()
    if others:
        names = ", ".join(os.path.basename(path) for path in others[:3])
        lines.append(f"{listing.root}: {len(others)} files without an image extension are not read "
                     f"({names}{', …' if len(others) > 3 else ''})")
    if listing.left_out:
        examples = "; ".join(f"{path}: {reason}" for path, reason in listing.left_out[:2])
        lines.append(f"{listing.root}: {len(listing.left_out)} images do not decode and are left out ({examples}"
                     f"{'; …' * (len(listing.left_out) > 2)}); all listed in {report_path(listing)}")
    return lines
