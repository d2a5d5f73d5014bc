"""ImageFolder → WebDataset tar shards, an _info.json in timm's layout and DALI index files.

    from pipelines.writers.shards import convert_folder
    summary = convert_folder("data/imagenet/train", "data/imagenet-wds", split="train", shard_size=1000)

Three passes:
  1. walk and check: the shared ImageFolder walk (image extensions only; other files and second
     paths to a file or folder are reported) and the loaders' image check (every image decoded by
     the one decode rule, JPEGs at 1/8 scale: truncated, empty and non-image files are skipped
     with their reason), in parallel with a progress bar — cached by the folder's contents, so a
     folder a run or tools/check_images.py checked is not decoded again;
  2. write: the good images in a seeded random order (readers that stream shards, timm's and
     DALI's, then see mixed classes in every shard), `--shard-size` samples a shard, each sample
     `<key>.<jpg|jpeg|png|webp>` with the file's bytes unchanged, not decoded (other formats decoded
     by the one rule and stored as PNG) and `<key>.cls` (the class index, as text), with webdataset's
     TarWriter; each shard's DALI index (train-0000.idx) beside it;
  3. commit: everything is written into OUT/.<split>.tmp-<pid>-<host>/ first (removed on an error,
     Ctrl-C, SIGTERM or SIGHUP; one left by a SIGKILL is removed by the next conversion); only then
     are the shards moved into OUT (an atomic rename each: no half shard is ever visible) and
     _info.json rewritten (atomically) to list them. The info file is what makes them a set: a
     conversion that stops before it leaves the previous set as it was.
OUT/_info.json: {"name", "classes", "num_classes", "splits": {split: {"name", "num_samples",
"filenames", "shard_lengths"}}}; OUT/<split>.skipped.txt: each file not written, path <TAB> reason.
"""
from __future__ import annotations

import glob
import io
import json
import os
import re
import shutil
import socket
import time
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from pipelines.atomic_files import process_exists, signals_end_the_block, temporary_path, write_whole
from pipelines.sources.image_decode import to_rgb
from pipelines.sources.shards.index import dali_index_path, scan_tar, write_index
from pipelines.sources.shards.spec import IMAGE_EXTENSIONS, INFO_FILES
from pipelines.writers.conversion import ConversionError, folder_images

INFO = INFO_FILES[0]


def read_set_info(out: Path) -> dict:
    path = out / INFO
    if not path.is_file():
        return {}
    try:
        info = json.loads(path.read_text())
    except ValueError as error:
        raise ConversionError(f"{path} exists but is not JSON ({error}); remove it or choose another OUT") from None
    if not isinstance(info.get("splits"), dict):
        raise ConversionError(f"{path} exists but has no \"splits\" (not a shard set's info file)")
    return info


def shard_names(prefix: str, split: str, count: int) -> list[str]:
    digits = max(4, len(str(count - 1)))
    return [f"{prefix}{split}-{i:0{digits}d}.tar" for i in range(count)]


def sample_key(position: int, path: str) -> str:
    """Unique, dot-free (webdataset cuts keys at the first dot) and traceable to the source file."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", Path(path).stem)[:60]
    return f"{position:08d}_{stem}"


def encoded_image(path: str) -> tuple[str, bytes]:
    """(extension, bytes): jpg/jpeg/png/webp files as they are, other formats as lossless PNG."""
    ext = Path(path).suffix.lower().lstrip(".")
    if ext in IMAGE_EXTENSIONS:
        return ext, Path(path).read_bytes()
    with Image.open(path) as image:
        buffer = io.BytesIO()
        to_rgb(image).save(buffer, "PNG")  # what every backend would decode the file to
    return "png", buffer.getvalue()


def write_shards(files: list[tuple[str, int]], folder: Path, names: list[str], shard_size: int) -> list[int]:
    """The shards (and their indexes) in folder; returns the samples per shard."""
    from webdataset import TarWriter

    lengths = []
    bar = tqdm(total=len(files), desc="write", unit="img")
    for number, name in enumerate(names):
        chunk = files[number * shard_size:(number + 1) * shard_size]
        with TarWriter(str(folder / name), encoder=False, mtime=0) as writer:
            for offset, (path, label) in enumerate(chunk):
                ext, data = encoded_image(path)
                writer.write({"__key__": sample_key(number * shard_size + offset, path), ext: data,
                              "cls": str(label).encode()})
                bar.update()
        write_index(dali_index_path(str(folder / name)), scan_tar(str(folder / name)))
        lengths.append(len(chunk))
    bar.close()
    return lengths


def convert_folder(src: str | Path, out: str | Path, *, split: str, shard_size: int = 1000, prefix: str = "",
                   name: str = "", workers: int = 0, seed: int = 0, limit: int = 0, overwrite: bool = False) -> dict:
    """Converts; returns the summary: found (files, each real one once), written, skipped (images
    that cannot be stored), non_images (files without an image extension), duplicates, shards,
    bytes, seconds. Refuses (ConversionError, nothing written) an existing split without overwrite,
    and classes that differ from another split's in OUT."""
    start = time.perf_counter()
    src, out = Path(src), Path(out)
    if shard_size < 1:
        raise ConversionError(f"shard size {shard_size} must be ≥ 1")
    info = read_set_info(out)
    if split in info.get("splits", {}) and not overwrite:
        raise ConversionError(f"{out / INFO} already has a split {split!r}; pass --overwrite to replace it")
    present = sorted(out.glob(f"{glob.escape(prefix)}{split}-*.tar"))
    if present and not overwrite:
        raise ConversionError(f"{present[0]} exists (not listed in {out / INFO}); pass --overwrite to replace it")
    source = folder_images(src, limit, workers or len(os.sched_getaffinity(0)))
    if info.get("classes") and info["classes"] != source.classes:
        raise ConversionError(f"{out / INFO} has other classes ({info['classes'][:3]}…) than {src} "
                              f"({source.classes[:3]}…): write this split to another OUT")
    images, reasons = source.images, source.problems
    good = [file for file, reason in zip(images, reasons) if not reason]
    skipped = source.unreadable + [(path, reason) for (path, _), reason in zip(images, reasons) if reason]
    if not good:
        raise ConversionError(f"none of the {len(images)} image files under {src} can be stored "
                              f"(first: {skipped[0][0]}: {skipped[0][1]})")
    good = [good[i] for i in np.random.default_rng(seed).permutation(len(good))]
    names = shard_names(prefix, split, -(-len(good) // shard_size))
    non_images = [(path, "not an image file (no image extension)") for path in source.non_images]

    out.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(out, split)
    staging = temporary_path(out / split)
    try:
        with signals_end_the_block() as raise_if_stopped:
            staging.mkdir()
            lengths = write_shards(good, staging, names, shard_size)
            size = sum(f.stat().st_size for f in staging.iterdir())
            raise_if_stopped()
            commit(out, staging, info, split, names, lengths, source.classes, name or src.resolve().parent.name)
            listed = "".join(f"{p}\t{r}\n" for p, r in skipped + non_images + source.duplicates)
            write_whole(out / f"{split}.skipped.txt", listed.encode("utf-8", "surrogateescape"))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {"found": source.found, "written": len(good), "skipped": len(skipped),
            "non_images": len(non_images), "duplicates": len(source.duplicates), "shards": len(names),
            "bytes": size, "seconds": round(time.perf_counter() - start, 2)}


def remove_stale_staging(out: Path, split: str) -> None:
    """Staging folders of this split left by killed conversions on this host."""
    for folder in out.glob(f".{split}.tmp-*"):
        pid, _, host = folder.name.rsplit(".tmp-", 1)[1].partition("-")
        if pid.isdigit() and host == socket.gethostname() and not process_exists(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def commit(out: Path, staging: Path, info: dict, split: str, names: list[str], lengths: list[int],
           classes: list[str], set_name: str) -> None:
    """Replace the split's old shards (if any) by the staged ones, then list them in the info file."""
    old = info.get("splits", {}).pop(split, None)
    if old is not None:  # unlisted first, then removed: the info file never names a missing shard
        write_whole(out / INFO, json.dumps(info, indent=1).encode())
        for file in old.get("filenames", []):
            for path in (out / file, Path(dali_index_path(str(out / file)))):
                path.unlink(missing_ok=True)
    for tar in names:
        os.replace(staging / tar, out / tar)
        os.replace(dali_index_path(str(staging / tar)), dali_index_path(str(out / tar)))
    info.setdefault("name", set_name)
    info.update(classes=classes, num_classes=len(classes))
    info.setdefault("splits", {})[split] = {"name": split, "num_samples": sum(lengths), "filenames": names,
                                            "shard_lengths": lengths}
    write_whole(out / INFO, json.dumps(info, indent=1).encode())
