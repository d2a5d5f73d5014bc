"""ImageFolder (or tar shards) → FFCV .beton, robust to the bad files a 1.2 M-image folder always
holds.

    from pipelines.writers.beton import convert_imagefolder
    summary = convert_imagefolder("data/imagenet/train", "data/ffcv/train.beton", StorageSettings())

The images are those every loader reads, checked by the loaders' own image check
(writers/conversion.py: cached and shared with the loaders, so an image a run or an earlier
conversion checked is decoded once here, to be written), decoded by the loaders' rule
(pipelines/sources/image_decode.py: the same pixels as DALI and torchvision). Two passes, both
parallel with a progress bar:
  1. check: what the image check leaves out is skipped with its reason; the others' stored size
     is read from their headers (no decoding) and an image too large or too small to store is
     skipped too.
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
import warnings
from dataclasses import asdict
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

from pipelines.atomic_files import write_whole, written_whole
from pipelines.sources.folder.image_check import parallel_map
from pipelines.sources.folder.listing import check_no_empty_class
from pipelines.sources.image_decode import to_rgb
from pipelines.sources.shards.member import image_file  # a path, or an image inside a tar shard
from pipelines.writers.beton_storage import StorageSettings, storage_problem, stored_size
from pipelines.writers.conversion import ConversionError, SourceImages, folder_images


def sidecar(beton: str | Path, suffix: str) -> Path:
    return Path(f"{beton}{suffix}")


def read_metadata(beton: str | Path) -> dict | None:
    """The OUT.json written with a .beton, or None if missing or not from this writer."""
    try:
        return json.loads(sidecar(beton, ".json").read_text())
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------
# Pass 1: what cannot be stored

def size_problem(path: str, settings: StorageSettings) -> str:
    """'' when the image's size (from its header: nothing decoded) can be stored, else why not."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(image_file(path)) as image:
                return storage_problem(*image.size, settings)
    except Exception as error:  # changed since its check: PIL raises many types
        return f"not a readable image: {type(error).__name__}: {error}"


def storable(images: SourceImages, settings: StorageSettings, workers: int, chunk_size: int) -> list[str]:
    """The reason each image cannot be stored ('' when it can): its check's, else its size's."""
    checked = [i for i, problem in enumerate(images.problems) if not problem]
    sizes = parallel_map(partial(size_problem, settings=settings), [images.images[i][0] for i in checked],
                         workers, desc="check sizes", chunk_size=chunk_size)
    reasons = list(images.problems)
    for index, reason in zip(checked, sizes):
        reasons[index] = reason
    return reasons


# ---------------------------------------------------------------------------------------------
# Pass 2: write

class CheckedImages:
    """(RGB uint8 array, label) for the files that passed pass 1, for ffcv's DatasetWriter.

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
                        images: SourceImages | None = None) -> dict:
    """Converts; returns the summary: found (files, each real one once), written, skipped (images
    that cannot be stored), non_images (files without an image extension), duplicates (second
    paths to a file or folder, not converted), bytes, seconds. images: what to convert when it is
    not src's walk (tar shards' images: pipelines/backends/ffcv/betons.py)."""
    start = time.perf_counter()
    src, out = Path(src), Path(out)
    settings.check()
    workers = workers or len(os.sched_getaffinity(0))
    images = folder_images(src, limit, workers) if images is None else images
    reasons = storable(images, settings, workers, chunk_size)
    good = [file for file, reason in zip(images.images, reasons) if not reason]
    skipped = images.unreadable + [(str(path), reason) for (path, _), reason in zip(images.images, reasons) if reason]
    if not good:
        raise ConversionError(f"none of the {len(images.images)} image files under {src} can be stored "
                              f"(first: {skipped[0][0]}: {skipped[0][1]})")
    if not images.limit:  # a class whose every image failed the check
        check_no_empty_class(src, images.classes, {label for _, label in good}, some_left_out=True)

    out.parent.mkdir(parents=True, exist_ok=True)
    with written_whole(out) as temporary:
        checked = CheckedImages(good, settings)
        write_beton(temporary, checked, workers, chunk_size)
        if checked.failures.value:
            raise ConversionError(f"{checked.failures.value} files failed while writing (changed since "
                                  f"they were checked?); nothing written, run again")
        summary = {"found": images.found, "written": len(good), "skipped": len(skipped),
                   "non_images": len(images.non_images), "duplicates": len(images.duplicates),
                   "bytes": temporary.stat().st_size, "seconds": round(time.perf_counter() - start, 2)}
        metadata = {"source": str(Path(images.source).resolve()), "fingerprint": images.fingerprint,
                    "classes": images.classes, "settings": asdict(settings), "limit": images.limit, **summary,
                    "left_out": skipped}
        listed = skipped + [(path, "not an image file (no image extension)") for path in images.non_images]
        write_whole(sidecar(out, ".skipped.txt"), "".join(f"{p}\t{r}\n" for p, r in listed + images.duplicates)
                    .encode("utf-8", "surrogateescape"))
        write_whole(sidecar(out, ".json"), json.dumps(metadata, indent=1).encode("utf-8", "surrogateescape"))
    return summary  # the .beton is renamed into place last: one that exists is complete
