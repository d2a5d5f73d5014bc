"""Every image of a folder decoded once, up front, so a bad file is named before a run instead of
killing it at the batch that holds it: the images that fail are left out, with their reasons.

    left_out = check_images(list_image_folder("data/imagenet/train"))   # [(path, reason)]

The check is the loaders' and the FFCV writer's own decode rule (pipelines/sources/image_decode.py), JPEGs
at 1/8 DCT scale (every byte is still read: a truncated file fails), on every core with a progress
bar. Its result is cached outside the folder, so data on read-only shared storage works:
$XDG_CACHE_HOME/advprop-trainer/image-check/ (default ~/.cache/...), two files per folder, named
by a hash of the folder's real path:
  <folder>.good.npy               the stamps (path, size, mtime) of the files that decoded
  <folder>.<fingerprint>.txt      the files these contents leave out: path <TAB> reason
Contents whose fingerprint has a report are not checked again; after a change (a file fixed,
added, removed) only the files whose stamp is not among the good ones are decoded. A damaged
cache file is checked anew, after a one-line warning (pipelines/cache_files.py). The folder's
listing is cached beside these (listing_cache.py).
"""
from __future__ import annotations

import gc
import io
import multiprocessing
import os
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from pipelines.cache_files import cache_folder as kind_folder, folder_key, warn_damaged, write_bytes
from pipelines.sources.folder.listing import FolderListing
from pipelines.sources.image_decode import decode_problem

IN_PROCESS_BELOW = 64  # files: fewer are checked here, without starting worker processes
REPORT_HEADER = "# images that do not decode, left out by every loader: path <TAB> reason\n"


def cache_folder() -> Path:
    return kind_folder("image-check")


def report_path(listing: FolderListing) -> Path:
    """The file listing what this folder, as it is now, leaves out (once it was checked)."""
    return cache_folder() / f"{folder_key(listing.root)}.{listing.fingerprint()}.txt"


def check_images(listing: FolderListing, workers: int = 0) -> list[tuple[str, str]]:
    """(path, reason) of the listing's image files that do not decode (see the module doc)."""
    report = report_path(listing)
    known = read_report(report)
    if known is not None:
        return known
    good_file = report.parent / f"{folder_key(listing.root)}.good.npy"
    stamps = listing.stamps
    images = listing.image_indices()
    decoded_before = np.isin(stamps[images], read_stamps(good_file))
    todo = images[~decoded_before]
    reasons = decode_all([listing.path(i) for i in todo], workers)
    failed = todo[np.array([bool(reason) for reason in reasons], dtype=bool)]
    left_out = [(listing.path(i), reason) for i, reason in zip(todo, reasons) if reason]
    write_cache(good_file, np.setdiff1d(stamps[images], stamps[failed]), report, left_out)
    return left_out


def decode_all(paths: list[str], workers: int = 0) -> list[str]:
    """decode_problem's reason ('' = fine) for each path."""
    return [reason for reason, _ in parallel_map(decode_problem, paths, workers, desc="checking images")]


def parallel_map(function, items: list, workers: int = 0, *, desc: str, chunk_size: int = 256) -> list:
    """[function(item) for item in items] on `workers` processes (0: every core), with a progress bar."""
    if len(items) < IN_PROCESS_BELOW:
        return [function(item) for item in items]
    workers = workers or len(os.sched_getaffinity(0))
    gc.collect()  # garbage holding threads (an old loader's) is ended here, not in a forked copy without them
    with multiprocessing.Pool(workers) as pool:
        results = pool.imap(function, items, chunksize=max(1, min(chunk_size, len(items) // (4 * workers))))
        return list(tqdm(results, total=len(items), desc=desc, unit="img"))


# ---------------------------------------------------------------------------------------------
# The cache

def read_stamps(path: Path) -> np.ndarray:
    """The stamps of the files known to decode; none when there is no file or a damaged one."""
    if not path.is_file():
        return np.zeros(0, dtype=np.uint64)
    try:
        stamps = np.load(path, allow_pickle=False)
        if stamps.dtype != np.uint64 or stamps.ndim != 1:
            raise ValueError(f"{stamps.dtype} array of {stamps.ndim} dimensions, not stamps")
        return stamps
    except Exception as error:  # numpy raises many types for a damaged file; each means the same here
        warn_damaged(path, f"{type(error).__name__}: {error}")
        return np.zeros(0, dtype=np.uint64)


def read_report(path: Path) -> list[tuple[str, str]] | None:
    """The report's (path, reason) lines; None when there is none or it is damaged (with a warning)."""
    try:
        text = path.read_bytes().decode("utf-8", "surrogateescape")
    except OSError:
        return None
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    if not text.startswith(REPORT_HEADER) or not all("\t" in line for line in lines):
        warn_damaged(path, "not a report of path <TAB> reason lines")
        return None
    return [tuple(line.split("\t", 1)) for line in lines]


def write_cache(good_file: Path, good: np.ndarray, report: Path, left_out: list[tuple[str, str]]) -> None:
    """Stamps first, then the report that makes the folder count as checked; each replaced whole.
    A cache that cannot be written (no home, a full disk) costs a check next time, nothing more."""
    stamps = io.BytesIO()
    np.save(stamps, good.astype(np.uint64))
    text = REPORT_HEADER + "".join(f"{path}\t{reason}".replace("\n", " ") + "\n" for path, reason in left_out)
    if write_bytes(good_file, stamps.getvalue()) and write_bytes(report, text.encode("utf-8", "surrogateescape")):
        for older in report.parent.glob(f"{good_file.name.split('.')[0]}.*.txt"):
            if older != report:  # reports of this folder's earlier contents
                older.unlink(missing_ok=True)

