#!/usr/bin/env python
"""Decode every image of an ImageFolder split now, as a run with loader=torchvision or dali would
before training (pipelines/sources/folder/image_check.py), and say what it leaves out and what the check cost.

    python tools/check_images.py data/imagenet/train --workers 16     # fills the cache for later runs
    python tools/check_images.py --photos 1800 --again                # time a full check of data/bench/photos

The result is cached by the folder's contents (under $XDG_CACHE_HOME/advprop-trainer/image-check/):
a run on the same contents does not check again. --again checks every image even so (for timing).
--photos N builds (once) the benchmark set of tools/bench_loaders.py: N photo JPEGs of ImageNet size.
Exit 0 when checked (bad images are reported, not an error), 2 with one line for a bad folder.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

from common.exit_status import run_entry_point
from pipelines.sources.folder.image_check import cache_folder, check_images, folder_key, report_path
from pipelines.sources.folder.listing import list_image_folder
from tools.output_guard import check_output_folder


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, nargs="?", help="an ImageFolder split: FOLDER/<class>/<image>")
    parser.add_argument("--photos", type=int, default=0, help="check data/bench/photos[-N] (built if missing)")
    parser.add_argument("--workers", type=int, default=0, help="processes (default: all cores)")
    parser.add_argument("--again", action="store_true", help="ignore what the cache knows: decode every image")
    args = parser.parse_args(argv)
    if (args.folder is None) == (not args.photos):
        parser.error("give a FOLDER or --photos N")
    return args


def main(argv) -> int:
    args = parse_args(argv)
    check_output_folder(cache_folder())  # what the check is for: kept for later runs
    if args.photos:
        check_output_folder(Path("data/bench"))
        from pipelines.sources.offline.photos import build_photo_imagefolder
        name = "photos" if args.photos == 1800 else f"photos-{args.photos}"  # tools/bench_loaders.py's names
        args.folder = build_photo_imagefolder(Path("data/bench") / name, count=args.photos)
    listing = list_image_folder(args.folder)
    if args.again:
        for cached in cache_folder().glob(f"{folder_key(args.folder)}.*"):
            cached.unlink()
    images = len(listing.image_indices())
    workers = args.workers or len(os.sched_getaffinity(0))
    cached = report_path(listing).is_file()
    start, cpu_start = time.perf_counter(), cpu_seconds()
    left_out = check_images(listing, workers)
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu_start
    listed = f" (listed in {report_path(listing)})" if left_out else ""
    cost = " (these contents were checked before: --again to decode them anew)" if cached else \
        f": {cpu / images * 1e3:.2f} ms of CPU per image"
    print(f"{args.folder}: {images:,} images, {len(left_out):,} left out{listed}; checked in {seconds:.1f} s "
          f"with {workers} processes{cost}")
    return 0


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the check's workers): a cost that
    other programs on the machine do not inflate, unlike wall time."""
    return sum(resource.getrusage(who).ru_utime + resource.getrusage(who).ru_stime
               for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))


if __name__ == "__main__":
    sys.exit(run_entry_point(main, sys.argv[1:]))
