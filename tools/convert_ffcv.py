#!/usr/bin/env python
"""Convert an ImageFolder to an FFCV .beton (what `loader=ffcv` reads).

    python tools/convert_ffcv.py data/imagenet/train data/ffcv/train.beton
    python tools/convert_ffcv.py data/imagenet/val data/ffcv/val.beton --limit 5000 --json
    python tools/convert_ffcv.py data/imagenet-wds data/ffcv/val.beton --split validation   # tar shards
    python tools/convert_ffcv.py 'data/x/train-{0000..0099}.tar' data/ffcv/train.beton

The images are those every loader reads (image extensions: torchvision's list), decoded as
every loader decodes them. Bad ones (truncated, empty, not images, too small) are skipped and
listed in OUT.skipped.txt, with files without an image extension and second paths to a file or
folder (symlink loops: each real file is converted once); classes (sorted folder names, as
torchvision) go to OUT.json. Exit 0 when the .beton is written; 2 with a one-line error (and
nothing written) when the source or settings cannot give one (a class folder without a usable
image, too), or OUT is a folder, lies inside SRC, or exists (replace it with --overwrite); 128 + N
when stopped by signal N (the partial file is removed; one left by a SIGKILL is removed by the
next conversion to OUT).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

from common.exit_status import run_entry_point
from pipelines.backends import BACKENDS
from pipelines.backends.ffcv.betons import convert_shards
from pipelines.sources.shards.source import set_classes
from pipelines.sources.shards.spec import named_shards
from pipelines.writers.beton import convert_imagefolder
from pipelines.writers.beton_storage import WRITE_MODES, StorageSettings
from tools.conversion_report import run_conversion, summary_line
from tools.output_guard import check_output_file

DEFAULTS = StorageSettings()


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path, help="ImageFolder: SRC/<class>/<image>; or WebDataset shards: a folder "
                                               "with _info.json, or a brace pattern of .tar files")
    parser.add_argument("--split", default="train", help="shards: the info file's split to convert (default train)")
    parser.add_argument("--num-classes", type=int, default=0,
                        help="shards without a class count in an info file: the number of classes "
                             "(default: one more than the largest label)")
    parser.add_argument("out", type=Path, help="output .beton (written to a temporary name, then renamed)")
    parser.add_argument("--max-resolution", type=int, default=DEFAULTS.max_resolution,
                        help="cap on the longer side in px, 0 = keep (default %(default)s; the loader's "
                             "crops come from this, so keep it above the train/val resolution)")
    parser.add_argument("--write-mode", choices=WRITE_MODES, default=DEFAULTS.write_mode,
                        help="raw: pixels (fastest to load, largest); jpg: all JPEG (smallest, slowest); "
                             "smart: JPEG above --smart-threshold bytes; proportion: JPEG with "
                             "--compress-probability, raw otherwise (default %(default)s)")
    parser.add_argument("--compress-probability", type=float, default=DEFAULTS.compress_probability,
                        help="proportion mode: share stored as JPEG (default %(default)s)")
    parser.add_argument("--jpeg-quality", type=int, default=DEFAULTS.jpeg_quality,
                        help="JPEG quality of re-encoded images (default %(default)s)")
    parser.add_argument("--smart-threshold", type=int, default=DEFAULTS.smart_threshold,
                        help="smart mode: raw size in bytes above which an image is stored as JPEG "
                             "(default %(default)s = 256×256×3)")
    parser.add_argument("--min-side", type=int, default=DEFAULTS.min_side,
                        help="skip images whose stored shorter side is below this (default %(default)s)")
    parser.add_argument("--workers", type=int, default=0, help="processes (default: all cores)")
    parser.add_argument("--chunk-size", type=int, default=100, help="images per work item (default %(default)s)")
    parser.add_argument("--limit", type=int, default=0,
                        help="convert only N files, evenly spaced over the sorted list (a quick subset)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT (and its sidecars) if it exists")
    parser.add_argument("--json", action="store_true", help="also print the summary as JSON on the last line")
    return parser.parse_args(argv)


def main(argv) -> int:
    args = parse_args(argv)
    settings = StorageSettings(max_resolution=args.max_resolution, write_mode=args.write_mode,
                               compress_probability=args.compress_probability, jpeg_quality=args.jpeg_quality,
                               smart_threshold=args.smart_threshold, min_side=args.min_side)
    if importlib.util.find_spec("ffcv") is None:  # checked without importing it (torch, numba: seconds)
        print(f"error: FFCV is not installed here. {BACKENDS['ffcv'].install_hint}", file=sys.stderr)
        return 2
    def convert() -> dict:
        check_output_file(args.out, inputs=[args.src], overwrite=args.overwrite, example="train.beton",
                          beside=(".json", ".skipped.txt"))
        shards = named_shards(str(args.src), "train", args.split)
        if shards is not None:  # WebDataset shards (pipelines/backends/ffcv/betons.py)
            classes = set_classes([shards], args.num_classes, args.workers)
            return convert_shards(shards, classes, args.out, settings, workers=args.workers, limit=args.limit)
        return convert_imagefolder(args.src, args.out, settings, workers=args.workers,
                                   chunk_size=args.chunk_size, limit=args.limit)

    summary = run_conversion(convert, args.out)
    if isinstance(summary, int):
        return summary
    print(f"{summary_line(summary, Path(f'{args.out}.skipped.txt'))} → {args.out}")
    if args.json:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(run_entry_point(main, sys.argv[1:]))
