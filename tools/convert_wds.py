#!/usr/bin/env python
"""Convert an ImageFolder split to WebDataset tar shards (what `data.dataset=webdataset` reads).

    python tools/convert_wds.py data/imagenet/train data/imagenet-wds --split train
    python tools/convert_wds.py data/imagenet/val data/imagenet-wds --split validation --shard-size 500
    train/run.py data.dataset=webdataset data.root=data/imagenet-wds

OUT gets <prefix><split>-0000.tar, ... (--shard-size images each, in a seeded random order), a DALI
index file beside each (.idx), _info.json in timm's layout (timm's `--dataset wds/...` reads it too)
naming the splits, their shards and lengths and the classes (sorted folder names), and
<split>.skipped.txt listing the files left out. Images that do not decode (truncated, empty, not
images) are skipped with their reason, files without an image extension and second paths to a file
or folder (symlink loops) are listed too: found = written + skipped + files without an image
extension. Shards appear only when complete and the info file lists them only then. Exit 0 when the
split is written; 2 with a one-line error (nothing written) when the source cannot give one (a class
folder without an image, too), OUT is a file or cannot be written (tools/output_guard.py), lies
inside SRC or a checkpoint, or already holds the split (replace it with --overwrite); 128 + N when
stopped by signal N (nothing written).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common.exit_status import run_entry_point
from pipelines.writers.shards import convert_folder
from tools.conversion_report import run_conversion, summary_line
from tools.output_guard import check_output_folder


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path, help="ImageFolder of one split: SRC/<class>/<image>")
    parser.add_argument("out", type=Path, help="the shard set's folder (created; other splits in it are kept)")
    parser.add_argument("--split", help="split name in _info.json (default: SRC's folder name; the Hugging Face "
                                        "sets call val 'validation')")
    parser.add_argument("--shard-size", type=int, default=1000, help="images per shard (default %(default)s)")
    parser.add_argument("--prefix", default="", help="shard file name prefix, e.g. 'imagenet1k-' (default none)")
    parser.add_argument("--name", default="", help="the set's name in _info.json (default: SRC's parent folder)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample order (default %(default)s)")
    parser.add_argument("--workers", type=int, default=0, help="processes checking images (default: all cores)")
    parser.add_argument("--limit", type=int, default=0,
                        help="convert only N files, evenly spaced over the sorted list (a quick subset)")
    parser.add_argument("--overwrite", action="store_true", help="replace the split if OUT already has it")
    parser.add_argument("--json", action="store_true", help="also print the summary as JSON on the last line")
    return parser.parse_args(argv)


def main(argv) -> int:
    args = parse_args(argv)
    split = args.split or args.src.name
    def convert() -> dict:
        check_output_folder(args.out, inputs=[args.src])
        return convert_folder(args.src, args.out, split=split, shard_size=args.shard_size, prefix=args.prefix,
                              name=args.name, workers=args.workers, seed=args.seed, limit=args.limit,
                              overwrite=args.overwrite)

    summary = run_conversion(convert, args.out)
    if isinstance(summary, int):
        return summary
    print(f"{summary_line(summary, args.out / f'{split}.skipped.txt')}, {summary['shards']} shards "
          f"→ {args.out} (split {split})")
    if args.json:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(run_entry_point(main, sys.argv[1:]))
