#!/usr/bin/env python
"""Loader throughput, every backend through pipelines.loader.build_loader, in one run.

    python tools/bench_loaders.py                          # builds data/bench/photos (1,800 real photo JPEGs)
    python tools/bench_loaders.py --data ~/imagenet/train --workers 1 2 --json
    python tools/bench_loaders.py --photos 18000 --workers 16 --backends torchvision dali
    python tools/bench_loaders.py --backends ffcv --ffcv-max-resolution 500 --ffcv-write-mode jpg
    python tools/bench_loaders.py --auto-augment v0 --workers 2   # + timm's TF EfficientNet AutoAugment
    python tools/bench_loaders.py --shards --workers 2 --backends torchvision dali   # folder vs. tar shards
    python tools/bench_loaders.py --first-batch-shards 1000       # seconds to a first batch on 1,000 shards

Train pipeline (random-resized-crop 224 + flip, uint8 out, on the device), batch 64; with
--auto-augment NAME every backend that can applies timm's policy NAME too (FFCV cannot: skipped). Each backend
runs --epochs epochs; the first is excluded (numba compiles, caches warm); img/s is the mean over
the rest (± std). Ratios are to torchvision at the same worker count, measured in the same run;
with --shards each backend also reads the same images from tar shards (tools/convert_wds.py's, made
once under --cache-dir), and "× folder" is shards ÷ folder for that backend (FFCV reads shards by
converting them, so its speed from shards is its .beton speed: not repeated).
A backend that cannot be imported here is skipped with the reason. --json prints one JSON
object on the last line: {"torchvision": img_s, "ffcv": img_s, "ffcv_ratio": x, ...} for the last
worker count, with every measurement under "runs".

On this project's 2-core CPU machine (2 workers, 1,800 photos): torchvision ≈ 800 img/s; FFCV
proportion 0.5 / max resolution 500 ≈ 2.8× (256: ≈ 8×); DALI CPU ≈ 1.5×. README has the table.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from common.errors import UserInputError
from pipelines.ffcv_writer import WRITE_MODES, StorageSettings
from pipelines.loader import BACKENDS, build_loader, prepare_dataset
from tools.wds_bench import first_batch_report, shard_copy, shard_overrides
from train.config import load_config

STORAGE = StorageSettings()


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, help="ImageFolder to read (default: build --cache-dir/photos[-N])")
    parser.add_argument("--photos", type=int, default=1800, help="photo JPEGs to build when --data is not given")
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=list(BACKENDS))
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 2], help="decode workers/threads per backend")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per measurement, the first not timed")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cache-dir", type=Path, default=Path("data/bench"),
                        help="where the photo set and the .beton files are kept between runs")
    # .beton storage: the converter's defaults (ffcv-imagenet's); a lower max resolution is faster
    # but makes 224 px random-resized crops upsample small stored images (an accuracy trade)
    parser.add_argument("--ffcv-max-resolution", type=int, default=STORAGE.max_resolution)
    parser.add_argument("--ffcv-write-mode", default=STORAGE.write_mode, choices=WRITE_MODES)
    parser.add_argument("--ffcv-compress-probability", type=float, default=STORAGE.compress_probability)
    parser.add_argument("--ffcv-jpeg-quality", type=int, default=STORAGE.jpeg_quality)
    parser.add_argument("--auto-augment", default="", metavar="NAME",
                        help="timm AutoAugment/RandAugment policy after crop and flip (v0, original, rand-m9-mstd0.5)")
    parser.add_argument("--shards", action="store_true",
                        help="also read the same images as WebDataset shards; report shards ÷ folder per backend")
    parser.add_argument("--first-batch-shards", type=int, default=0, metavar="N",
                        help="only time the first batch after start on a synthetic set of N shards (per backend, "
                             "with and without index files)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON on the last line")
    args = parser.parse_args(argv)
    if args.epochs < 2:
        parser.error("--epochs must be ≥ 2 (the first is not timed)")
    return args


def bench_config(args, folder: Path, backend: str, workers: int, shards: Path | None = None):
    """The demo recipe pointed at `folder` (as the train split), with an ImageNet-style train crop;
    at its shard copy instead when `shards` is given."""
    overrides = [
        f"loader={backend}", "data.dataset=imagefolder", f"data.root={folder.parent}",
        f"data.train_dir={folder.name}", f"data.val_dir={folder.name}", f"data.image_size={args.image_size}",
        "data.min_scale=0.08", "data.hflip=true", f"data.workers={workers}", f"data.dali.threads={workers}",
        f"batch_size={args.batch_size}", "tracker=none",
        f"data.ffcv.max_resolution={args.ffcv_max_resolution}", f"data.ffcv.write_mode={args.ffcv_write_mode}",
        f"data.ffcv.compress_probability={args.ffcv_compress_probability}",
        f"data.ffcv.jpeg_quality={args.ffcv_jpeg_quality}", f"data.auto_augment='{args.auto_augment}'",
    ]
    if shards is not None:
        overrides += shard_overrides(shards)
    if backend == "ffcv":
        load_config(overrides)  # refuses what FFCV cannot do (AutoAugment) before converting anything
        beton = ffcv_beton(args, folder)
        overrides += [f"data.ffcv.train_beton={beton}", f"data.ffcv.val_beton={beton}"]
    return load_config(overrides)


def ffcv_beton(args, folder: Path) -> Path:
    """The folder converted with the benchmark's storage settings (reused while current)."""
    from pipelines.ffcv_loader import is_current
    from pipelines.ffcv_writer import convert_imagefolder

    settings = StorageSettings(max_resolution=args.ffcv_max_resolution, write_mode=args.ffcv_write_mode,
                               compress_probability=args.ffcv_compress_probability,
                               jpeg_quality=args.ffcv_jpeg_quality)
    name = (f"{folder.name}-r{settings.max_resolution}-{settings.write_mode}"
            f"-p{settings.compress_probability:g}-q{settings.jpeg_quality}.beton")
    beton = args.cache_dir / name
    if not is_current(beton, folder, settings):
        convert_imagefolder(folder, beton, settings)
    return beton


def time_epochs(loader, epochs: int, device: str) -> list[float]:
    """img/s of each epoch after the first."""
    speeds = []
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        start, images = time.perf_counter(), 0
        for batch, _ in loader:
            images += len(batch)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if epoch > 0:
            speeds.append(images / (time.perf_counter() - start))
    return speeds


KEEP_ALIVE = []  # freeing an ffcv Loader makes numba print a harmless KeyError from a finalizer


def measure(args, folder: Path, backend: str, workers: int, shards: Path | None = None) -> dict:
    cfg = bench_config(args, folder, backend, workers, shards)
    if shards is not None:
        prepare_dataset(cfg)  # index and check the shards before the clock starts
    loader = build_loader(cfg, "train", device=args.device)
    KEEP_ALIVE.append(loader)
    speeds = time_epochs(loader, args.epochs, args.device)
    return {"backend": backend, "workers": workers, "source": "shards" if shards else "folder",
            "img_s": statistics.mean(speeds),
            "std": statistics.stdev(speeds) if len(speeds) > 1 else 0.0, "images_per_epoch": loader.num_samples}


def main(argv) -> int:
    args = parse_args(argv)
    if args.first_batch_shards:  # its own synthetic set; no folder needed
        args.cache_dir.mkdir(parents=True, exist_ok=True)
        rows = first_batch_report(args)
        if args.json:
            print(json.dumps({"first_batch": rows}))
        return 0
    if args.data is None:
        from pipelines.photo_data import build_photo_imagefolder
        name = "photos" if args.photos == 1800 else f"photos-{args.photos}"
        args.data = build_photo_imagefolder(args.cache_dir / name, count=args.photos)
    folder = args.data.resolve()
    if not folder.is_dir():
        print(f"error: --data {folder} is not a folder", file=sys.stderr)
        return 2
    shards = shard_copy(folder, args.cache_dir) if args.shards else None
    runs, skipped = [], {}
    for backend in args.backends:
        for workers in args.workers:
            for source in [None] + ([shards] if shards and backend != "ffcv" else []):
                if backend in skipped:
                    continue
                try:
                    run = measure(args, folder, backend, workers, source)
                except UserInputError as error:  # build_loader: backend not importable here
                    skipped[backend] = str(error).splitlines()[0]
                    print(f"{backend:12s} skipped: {skipped[backend]}")
                    continue
                runs.append(run)
                print(f"{backend:12s} {workers} workers, {run['source']}: {run['img_s']:8.0f} ± {run['std']:.0f} img/s",
                      flush=True)
    print_table(runs)
    if args.json:
        last = [r for r in runs if r["workers"] == args.workers[-1] and r["source"] == "folder"]
        from_shards = {r["backend"]: r for r in runs if r["workers"] == args.workers[-1] and r["source"] == "shards"}
        summary = {"workers": args.workers[-1], "data": str(folder), "image_size": args.image_size,
                   "auto_augment": args.auto_augment,
                   "ffcv_storage": {"max_resolution": args.ffcv_max_resolution, "write_mode": args.ffcv_write_mode,
                                    "compress_probability": args.ffcv_compress_probability,
                                    "jpeg_quality": args.ffcv_jpeg_quality},
                   **{r["backend"]: r["img_s"] for r in last},
                   **{f"{r['backend']}_ratio": r["ratio"] for r in last if r["backend"] != "torchvision" and "ratio" in r},
                   **{f"{name}_shards_ratio": r["shards_ratio"] for name, r in from_shards.items()},
                   "runs": runs, "skipped": skipped}
        print(json.dumps(summary))
    return 0


def print_table(runs: list[dict]) -> None:
    """Each run beside torchvision's (same workers, folder) and, from shards, beside its own folder run."""
    baseline = {r["workers"]: r["img_s"] for r in runs if r["backend"] == "torchvision" and r["source"] == "folder"}
    folder = {(r["backend"], r["workers"]): r["img_s"] for r in runs if r["source"] == "folder"}
    print(f"\n{'backend':12s} {'source':>7s} {'workers':>7s} {'img/s':>8s} {'× torchvision':>14s} {'× folder':>9s}")
    for run in runs:
        if run["workers"] in baseline and run["source"] == "folder":
            run["ratio"] = run["img_s"] / baseline[run["workers"]]
        if run["source"] == "shards" and (run["backend"], run["workers"]) in folder:
            run["shards_ratio"] = run["img_s"] / folder[run["backend"], run["workers"]]
        print(f"{run['backend']:12s} {run['source']:>7s} {run['workers']:7d} {run['img_s']:8.0f} "
              f"{run.get('ratio', float('nan')):14.2f} {run.get('shards_ratio', float('nan')):9.2f}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
