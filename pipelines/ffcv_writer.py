"""ImageFolder → FFCV .beton, robust to the bad files a 1.2 M-image folder always holds.

    from pipelines.ffcv_writer import StorageSettings, convert_imagefolder
    summary = convert_imagefolder("data/imagenet/train", "data/ffcv/train.beton", StorageSettings())

Two passes, both parallel with a progress bar:
  1. check: open and decode every file (JPEGs at 1/8 DCT scale: cheap, yet a truncated file still
     fails) and predict its stored size. A file that fails is skipped with its reason.
  2. write: ffcv's DatasetWriter on the good files only. A worker that raises inside DatasetWriter
     leaves its main loop waiting forever, so nothing that can fail may reach it (pass 1 is why).
The .beton is written under a temporary name and renamed when complete. Beside it:
  OUT.json          classes (sorted folder names, as torchvision), settings, counts — the loader
                    reads the classes from here so train and val agree
  OUT.skipped.txt   one line per skipped file or duplicate path (symlink loop): path <TAB> reason
"""
from __future__ import annotations

import json
import multiprocessing
import os
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from pipelines.errors import UserInputError
from pipelines.image_folder import FolderListing, list_image_folder
from pipelines.wds_read import image_file, image_file_size  # a path, or an image inside a tar shard

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

def list_imagefolder(src: Path, limit: int = 0) -> FolderListing:
    """The shared walk's listing of src (classes, files, duplicate and unreadable entries).

    Every regular file counts, not just image extensions: a stray file is reported, not hidden.
    limit > 0 keeps that many files, evenly spaced over the sorted list (so every class shows up).
    """
    if not src.is_dir():
        raise ConversionError(f"source {src} is a file, not a folder (expected SRC/<class>/<image>)"
                              if src.exists() else f"source folder {src} does not exist")
    try:
        listing = list_image_folder(src)
    except FileNotFoundError:
        raise ConversionError(f"source folder {src} has no class sub-folders (expected SRC/<class>/<image>)") from None
    files = listing.files
    if not files:
        raise ConversionError(f"source folder {src} has {len(listing.classes)} class folders but no files")
    if 0 < limit < len(files):
        listing.files = [files[i] for i in np.linspace(0, len(files) - 1, limit).round().astype(int)]
    return listing


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
    try:
        if image_file_size(path) == 0:
            return "empty file (0 bytes)"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # palette transparency, large-image warnings
            with Image.open(image_file(path)) as image:
                width, height = image.size
                image.draft("RGB", (1, 1))  # JPEG: decode at 1/8 scale, still reads every byte
                image.convert("RGB")
    except Image.DecompressionBombError as error:
        return f"too large to decode safely: {error}"
    except Exception as error:  # PIL raises many types for bad files; each is a skip, not a crash
        return f"not a readable image: {type(error).__name__}: {error}"
    width, height = stored_size(width, height, settings.max_resolution)
    if max(width, height) > MAX_STORED_SIDE:
        return f"{width}×{height} px is too large for .beton (max {MAX_STORED_SIDE}); set a max resolution"
    if min(width, height) < settings.min_side:
        return f"too small: stored at {width}×{height} px, shorter side < {settings.min_side} px"
    return ""


def _check_job(args):
    path, settings = args
    return check_image(path, settings)


def check_all(files: list[tuple[str, int]], settings: StorageSettings, workers: int, chunk_size: int) -> list[str]:
    jobs = [(path, settings) for path, _ in files]
    with multiprocessing.Pool(workers) as pool:
        results = pool.imap(_check_job, jobs, chunksize=max(1, min(chunk_size, len(jobs) // (4 * workers))))
        return list(tqdm(results, total=len(jobs), desc="check", unit="img"))


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
                    pixels = np.asarray(image.convert("RGB"))
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


def atomic_write_text(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        temporary.write_text(text)
        os.replace(temporary, path)
    finally:  # a full disk or a folder at `path`: no temporary file left behind
        temporary.unlink(missing_ok=True)


def convert_imagefolder(src: str | Path, out: str | Path, settings: StorageSettings, *,
                        workers: int = 0, chunk_size: int = 100, limit: int = 0,
                        listing: FolderListing | None = None) -> dict:
    """Converts; returns the summary: found (real files, each once), written, skipped (unreadable),
    duplicates (second paths to a file or folder, not converted), empty_classes, bytes, seconds.
    listing: the files to convert when they are not src's walk (tar shards: pipelines/wds_ffcv.py)."""
    start = time.perf_counter()
    src, out = Path(src), Path(out)
    settings.check()
    workers = workers or os.cpu_count() or 1
    listing = listing or list_imagefolder(src, limit)
    classes, files = listing.classes, listing.files
    reasons = check_all(files, settings, workers, chunk_size)
    good = [file for file, reason in zip(files, reasons) if not reason]
    skipped = listing.unreadable + [(path, reason) for (path, _), reason in zip(files, reasons) if reason]
    if not good:
        raise ConversionError(f"none of the {len(files)} files under {src} is a readable image "
                              f"(first: {skipped[0][0]}: {skipped[0][1]})")

    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    images = CheckedImages(good, settings)
    try:
        write_beton(temporary, images, workers, chunk_size)
        if images.failures.value:
            raise ConversionError(f"{images.failures.value} files failed while writing (changed since "
                                  f"they were checked?); nothing written, run again")
        summary = {
            "found": len(files) + len(listing.unreadable), "written": len(good), "skipped": len(skipped),
            "duplicates": len(listing.duplicates),
            "empty_classes": [classes[i] for i in sorted(set(range(len(classes))) - {label for _, label in files})],
            "bytes": temporary.stat().st_size, "seconds": round(time.perf_counter() - start, 2),
        }
        metadata = {"source": str(src.resolve()), "classes": classes, "settings": asdict(settings),
                    "limit": limit, **summary}
        atomic_write_text(sidecar(out, ".skipped.txt"), "".join(f"{p}\t{r}\n" for p, r in skipped + listing.duplicates))
        atomic_write_text(sidecar(out, ".json"), json.dumps(metadata, indent=1))
        os.replace(temporary, out)  # last: a .beton that exists is complete
    finally:
        temporary.unlink(missing_ok=True)
    return summary
