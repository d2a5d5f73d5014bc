"""ImageFolder → FFCV .beton, robust to the bad files a 1.2 M-image folder always holds.

    from pipelines.writers.beton import StorageSettings, convert_imagefolder
    summary = convert_imagefolder("data/imagenet/train", "data/ffcv/train.beton", StorageSettings())

The files are those every loader reads (pipelines/sources/folder/listing.py's walk: image extensions only,
the others reported), decoded by the loaders' rule (pipelines/sources/image_decode.py: the same pixels as
DALI and torchvision); a class folder without a usable image is refused, as every loader does.
Two passes, both parallel with a progress bar:
  1. check: decode every image (the shared check: JPEGs at 1/8 DCT scale, cheap, yet a truncated
     file still fails) and predict its stored size. A file that fails is skipped with its reason.
  2. write: ffcv's DatasetWriter on the good files only. A worker that raises inside DatasetWriter
     leaves its main loop waiting forever, so nothing that can fail may reach it (pass 1 is why).
The .beton is written under a temporary name and renamed when complete; a conversion stopped by
Ctrl-C, SIGTERM or SIGHUP removes it, and one killed outright has it removed by the next
(pipelines/atomic_files.py). Beside it:
  OUT.json          classes (sorted folder names, as torchvision), settings, counts, the source
                    folder's fingerprint (the loader reconverts when it changes) and the images left
                    out — the loader reads the classes from here so train and val agree
  OUT.skipped.txt   one line per image skipped, non-image file or duplicate path: path <TAB> reason
"""
from __future__ import annotations

import json
import multiprocessing
import os
import time
from functools import partial
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pipelines.atomic_files import write_whole, written_whole
from common.errors import UserInputError
from pipelines.sources.folder.image_check import parallel_map
from pipelines.sources.image_decode import decode_problem, to_rgb
from pipelines.sources.folder.listing import FolderListing, check_no_empty_class, list_image_folder
from pipelines.sources.shards.member import image_file  # a path, or an image inside a tar shard

WRITE_MODES = ("raw", "jpg", "smart", "proportion")
MAX_STORED_SIDE = 65_535  # .beton keeps width and height as uint16


class ConversionError(UserInputError):
    """The source folder or the settings cannot give a .beton; nothing was written."""


@dataclass
class StorageSettings:
    """How images are stored (ffcv-imagenet's writer options). Defaults: ffcv-imagenet's ResNet-50 set."""
    max_resolution: int = 500  # longer side cap in px (0 = keep); the loader crops from this
    write_mode: str = "proportion"  # raw | jpg | smart | proportion
    compress_probability: float = 0.5  # proportion: share of images stored as JPEG (rest raw)
    jpeg_quality: int = 90
    smart_threshold: int = 256 * 256 * 3  # smart: images with more raw bytes than this go JPEG
    min_side: int = 8  # shorter stored side below this → skipped (crops of 0 px crash the decoder)

    def check(self) -> None:
        problems = [
            (self.write_mode in WRITE_MODES, f"write mode {self.write_mode!r} is not one of {WRITE_MODES}"),
            (0 <= self.compress_probability <= 1, f"compress probability {self.compress_probability} is not in [0, 1]"),
            (1 <= self.jpeg_quality <= 100, f"JPEG quality {self.jpeg_quality} is not in [1, 100]"),
            (self.max_resolution == 0 or self.max_resolution >= self.min_side,
             f"max resolution {self.max_resolution} is below the minimum side {self.min_side}"),
            (self.min_side >= 1, f"minimum side {self.min_side} must be ≥ 1"),
        ]
        for ok, problem in problems:
            if not ok:
                raise ConversionError(problem)


def sidecar(beton: str | Path, suffix: str) -> Path:
    return Path(f"{beton}{suffix}")


def read_metadata(beton: str | Path) -> dict | None:
    """The OUT.json written with a .beton, or None if missing or not from this writer."""
    try:
        return json.loads(sidecar(beton, ".json").read_text())
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------
# Finding files

def list_imagefolder(src: Path) -> FolderListing:
    """The shared walk's listing of src (classes, files, duplicate and unreadable entries)."""
    if not src.is_dir():
        raise ConversionError(f"source {src} is a file, not a folder (expected SRC/<class>/<image>)"
                              if src.exists() else f"source folder {src} does not exist")
    try:
        listing = list_image_folder(src)
    except FileNotFoundError:
        raise ConversionError(f"source folder {src} has no class sub-folders (expected SRC/<class>/<image>)") from None
    if not listing.files:
        raise ConversionError(f"source folder {src} has {len(listing.classes)} class folders but no files")
    return listing


def spread_subset(files: list, limit: int) -> list:
    """limit > 0: that many files, evenly spaced over the sorted list (so every class shows up)."""
    if 0 < limit < len(files):
        return [files[i] for i in np.linspace(0, len(files) - 1, limit).round().astype(int)]
    return files


# ---------------------------------------------------------------------------------------------
# Pass 1: check every file

def stored_size(width: int, height: int, max_resolution: int) -> tuple[int, int]:
    """(width, height) after ffcv's resizer (longer side capped at max_resolution, truncating)."""
    if not max_resolution or max(width, height) <= max_resolution:
        return width, height
    ratio = max_resolution / max(width, height)
    return int(ratio * width), int(ratio * height)


def check_image(path: str, settings: StorageSettings) -> str:
    """'' for a file the writer can store, else the reason it cannot."""
    problem, (width, height) = decode_problem(path)
    if problem:
        return problem
    width, height = stored_size(width, height, settings.max_resolution)
    if max(width, height) > MAX_STORED_SIDE:
        return f"{width}×{height} px is too large for .beton (max {MAX_STORED_SIDE}); set a max resolution"
    if min(width, height) < settings.min_side:
        return f"too small: stored at {width}×{height} px, shorter side < {settings.min_side} px"
    return ""


def check_all(files: list[tuple[str, int]], settings: StorageSettings, workers: int, chunk_size: int) -> list[str]:
    return parallel_map(partial(check_image, settings=settings), [path for path, _ in files], workers,
                        desc="check", chunk_size=chunk_size)


# ---------------------------------------------------------------------------------------------
# Pass 2: write

class CheckedImages:
    """(RGB uint8 array, label) for the files that passed check_image, for ffcv's DatasetWriter.

    Resizes itself (PIL draft + OpenCV INTER_AREA, as ffcv would) so JPEG decoding can skip DCT
    detail that max_resolution throws away anyway. A file that fails now (changed since pass 1)
    gives a gray placeholder and is counted in `failures`: convert_imagefolder then deletes the
    output rather than hang ffcv's writer or keep a wrong sample.
    """

    def __init__(self, files: list[tuple[str, int]], settings: StorageSettings):
        self.files, self.settings = files, settings
        self.failures = multiprocessing.Value("i", 0)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        import cv2
        path, label = self.files[index]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with Image.open(image_file(path)) as image:
                    target = stored_size(*image.size, self.settings.max_resolution)
                    image.draft("RGB", target)
                    drafted = image.size
                    rgb = to_rgb(image)
            if rgb.size != drafted:  # EXIF rotated it by 90°
                target = target[::-1]
            pixels = np.asarray(rgb)
            if (pixels.shape[1], pixels.shape[0]) != target:
                pixels = cv2.resize(pixels, target, interpolation=cv2.INTER_AREA)
        except Exception as error:
            with self.failures.get_lock():
                self.failures.value += 1
            print(f"error: {path} failed during writing: {error}", flush=True)
            pixels = np.full((self.settings.min_side,) * 2 + (3,), 128, np.uint8)
        return np.ascontiguousarray(pixels), label


def write_beton(path: Path, images: CheckedImages, workers: int, chunk_size: int) -> None:
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    s = images.settings
    fields = {
        "image": RGBImageField(write_mode=s.write_mode, max_resolution=s.max_resolution or None,
                               smart_threshold=s.smart_threshold, jpeg_quality=s.jpeg_quality,
                               compress_probability=s.compress_probability),
        "label": IntField(),
    }
    DatasetWriter(str(path), fields, num_workers=workers).from_indexed_dataset(images, chunksize=chunk_size)


def convert_imagefolder(src: str | Path, out: str | Path, settings: StorageSettings, *,
                        workers: int = 0, chunk_size: int = 100, limit: int = 0,
                        listing: FolderListing | None = None) -> dict:
    """Converts; returns the summary: found (files, each real one once), written, skipped (images
    that cannot be stored), non_images (files without an image extension), duplicates (second
    paths to a file or folder, not converted), bytes, seconds. listing: the files to convert when
    they are not src's walk (tar shards' images: pipelines/backends/ffcv/betons.py)."""
    start = time.perf_counter()
    src, out = Path(src), Path(out)
    settings.check()
    workers = workers or len(os.sched_getaffinity(0))
    listing = list_imagefolder(src) if listing is None else listing
    classes, non_images = listing.classes, listing.non_images()
    images = [listing.files[i] for i in listing.image_indices()]
    check_no_empty_class(src, classes, {label for _, label in images})  # the loaders' rule, before any work
    images = spread_subset(images, limit)
    reasons = check_all(images, settings, workers, chunk_size)
    good = [file for file, reason in zip(images, reasons) if not reason]
    skipped = listing.unreadable + [(path, reason) for (path, _), reason in zip(images, reasons) if reason]
    if not good:
        raise ConversionError(f"none of the {len(images)} image files under {src} can be stored "
                              f"(first: {skipped[0][0]}: {skipped[0][1]})")
    if not limit:  # a class whose every image failed the check
        check_no_empty_class(src, classes, {label for _, label in good}, some_left_out=True)

    out.parent.mkdir(parents=True, exist_ok=True)
    with written_whole(out) as temporary:
        checked = CheckedImages(good, settings)
        write_beton(temporary, checked, workers, chunk_size)
        if checked.failures.value:
            raise ConversionError(f"{checked.failures.value} files failed while writing (changed since "
                                  f"they were checked?); nothing written, run again")
        summary = {"found": len(listing.files) + len(listing.unreadable), "written": len(good),
                   "skipped": len(skipped), "non_images": len(non_images), "duplicates": len(listing.duplicates),
                   "bytes": temporary.stat().st_size, "seconds": round(time.perf_counter() - start, 2)}
        metadata = {"source": str(src.resolve()), "fingerprint": listing.fingerprint(), "classes": classes,
                    "settings": asdict(settings), "limit": limit, **summary, "left_out": skipped}
        listed = skipped + [(path, "not an image file (no image extension)") for path in non_images]
        write_whole(sidecar(out, ".skipped.txt"), "".join(f"{p}\t{r}\n" for p, r in listed + listing.duplicates)
                    .encode("utf-8", "surrogateescape"))
        write_whole(sidecar(out, ".json"), json.dumps(metadata, indent=1).encode("utf-8", "surrogateescape"))
    return summary  # the .beton is renamed into place last: one that exists is complete
