#!/usr/bin/env python
"""Seconds from start to the first training step, and the memory a start leaves, as the data set
grows: a benchmark, not a test.

    python tools/bench_startup.py                                   # N = 12,800 and 128,000
    python tools/bench_startup.py --sizes 12800 128000 1281167      # and ImageNet's 1.28 M (~6 GB of disk)
    python tools/bench_startup.py --sizes 128000 --sources folder --batches 500

For each N it builds once, under --cache-dir, a synthetic ImageFolder: 1,000 classes, N distinct JPEG
files (real 96×72 crops of scikit-image's photos; distinct files, not hard links — the listing keeps
one path per inode, so a folder of links would train on a few images), and a val split of 2 images
a class; for --sources shards and ffcv, its tar shards (tools/convert_wds.py's writer) and .beton
files (JPEG, as tools/convert_ffcv.py --write-mode jpg writes them). Then, each in a fresh process,
a start as train/run.py makes one: the config, prepare_dataset, the train and val loaders, the first
batch, the model (test_resnet) and one training step; twice:
  cold  the trainer's caches emptied (the listing, the image check, the shard tables: a first start)
  warm  with them (every later start and every resume)
The OS's page cache is not dropped (that needs root): a cold start here reads a folder the OS has
seen. It prints the seconds to the first step (imports apart), each phase's share, the main
process's RSS at the first step, and each DataLoader worker's private memory (USS) after the first
batch and its growth over --batches batches more (loader=torchvision, 2 workers).
"""
from __future__ import annotations

import argparse
import functools
import io
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLASSES = 1000
VAL_PER_CLASS = 2
DISTINCT_IMAGES = 2000  # JPEG contents, written to as many files as asked
SOURCES = ("folder", "shards", "ffcv")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", type=int, default=[12_800, 128_000], help="train images per set")
    parser.add_argument("--sources", nargs="+", choices=SOURCES, default=list(SOURCES))
    parser.add_argument("--starts", nargs="+", choices=("cold", "warm"), default=["cold", "warm"])
    parser.add_argument("--batches", type=int, default=200, help="batches read after the first, for worker memory")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cache-dir", type=Path, default=Path("data/bench/startup"))
    parser.add_argument("--json", action="store_true", help="print every measurement as JSON on the last line")
    parser.add_argument("--measure", nargs=2, metavar=("ROOT", "SOURCE"), help=argparse.SUPPRESS)  # one start
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# The synthetic sets, built once

@functools.lru_cache(maxsize=None)
def jpeg(index: int) -> bytes:
    """Image `index` of the distinct ones: a 96×72 crop of a scikit-image photo, as a quality-90 JPEG."""
    import numpy as np
    from PIL import Image

    from pipelines.sources.offline.photos import PHOTOS, load_photo
    photo = load_photo(PHOTOS[index % len(PHOTOS)])
    rng = np.random.default_rng(index)
    top, left = rng.integers(0, photo.shape[0] - 72), rng.integers(0, photo.shape[1] - 96)
    buffer = io.BytesIO()
    Image.fromarray(photo[top:top + 72, left:left + 96]).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def write_class(job: tuple[Path, int, int, int]) -> None:
    folder, label, count, first = job
    name = f"n{label:08d}"
    (folder / name).mkdir(parents=True, exist_ok=True)
    for k in range(count):
        (folder / name / f"{name}_{first + k}.JPEG").write_bytes(jpeg((first + k) % DISTINCT_IMAGES))


def build_split(folder: Path, images: int) -> None:
    """folder/<class>/<file>.JPEG: `images` files spread evenly over the classes, by every core."""
    from tqdm.auto import tqdm

    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        jobs = [(staging, label, images // CLASSES + (label < images % CLASSES), label * (images // CLASSES + 1))
                for label in range(CLASSES)]
        with multiprocessing.Pool() as pool:
            for _ in tqdm(pool.imap_unordered(write_class, jobs), total=len(jobs), desc=f"building {folder}",
                          unit="class"):
                pass
        staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def synthetic_set(cache_dir: Path, images: int) -> Path:
    root = cache_dir / f"imagenet-like-{images}"
    root.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", images), ("val", CLASSES * VAL_PER_CLASS)):
        if not (root / split).is_dir():
            build_split(root / split, count)
    return root


def shards_of(root: Path) -> Path:
    from pipelines.writers.shards import convert_folder

    out = root.with_name(f"{root.name}-wds")
    for split in ("train", "val"):
        if not (out / "_info.json").is_file() or split not in json.loads((out / "_info.json").read_text())["splits"]:
            convert_folder(root / split, out, split=split, shard_size=1000)
    return out


def betons_of(root: Path) -> Path:
    from pipelines.backends.ffcv.betons import converted_copy
    from pipelines.writers.beton_storage import StorageSettings

    out = root.with_name(f"{root.name}-ffcv")
    settings = StorageSettings(max_resolution=96, write_mode="jpg")
    for split in ("train", "val"):
        converted_copy(root / split, out, settings)
    return out


# ---------------------------------------------------------------------------------------------
# One start, measured in its own process

def overrides(root: Path, source: str, workers: int) -> list[str]:
    common = ["tracker=none", "model=test_resnet", "method=vanilla", "batch_size=64", "data.image_size=64",
              f"data.workers={workers}", f"data.dali.threads={workers}"]
    if source == "shards":
        return common + ["data.dataset=webdataset", f"data.root={root}-wds"]
    data = ["data.dataset=imagefolder", f"data.root={root}"]
    if source == "ffcv":
        betons = root.with_name(f"{root.name}-ffcv")
        return common + data + ["loader=ffcv", "data.ffcv.max_resolution=96", "data.ffcv.write_mode=jpg",
                                f"data.ffcv.train_beton={betons / 'train-r96-jpg-p0.5-q90.beton'}",
                                f"data.ffcv.val_beton={betons / 'val-r96-jpg-p0.5-q90.beton'}"]
    return common + data


def private_memory_mb(pid: int) -> float:
    """USS: the pages only this process holds (what a worker copied or made)."""
    text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    kib = sum(int(line.split()[1]) for line in text.splitlines() if line.startswith(("Private_Clean", "Private_Dirty")))
    return kib / 1024


def timed(spent: dict, label: str, module, name: str) -> None:
    """module.name, counting its seconds under spent[label]."""
    original = getattr(module, name)

    def counted(*args, **kwargs):
        begin = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            spent[label] = spent.get(label, 0.0) + time.perf_counter() - begin
    setattr(module, name, counted)


def measure(root: Path, source: str, workers: int, batches: int) -> dict:
    """The phases of a start, in seconds, and the memory after it (this process: a fresh one)."""
    begin = time.perf_counter()
    import psutil
    import torch
    import torch.nn.functional as F

    import pipelines.backends.ffcv.betons as betons
    import pipelines.sources.folder.source as folder_source
    from models.factory import create_model
    from pipelines.backends import backend_of, implementation
    from pipelines.loading import build_loader, prepare_dataset
    from train.config import load_config
    imports = time.perf_counter() - begin
    inner = {}  # the listing and the image check, wherever they are called from
    timed(inner, "listing", folder_source, "folder_listing")
    timed(inner, "listing", betons, "folder_listing")
    timed(inner, "image check", folder_source, "check_images")
    phases, last = {}, [time.perf_counter(), 0.0]

    def phase(name: str) -> None:
        now, inside = time.perf_counter(), sum(inner.values())
        phases[name] = now - last[0] - (inside - last[1])
        last[:] = [now, inside]

    torch.set_num_threads(1)
    cfg = load_config(overrides(root, source, workers))
    phase("config")
    implementation(backend_of(cfg))  # FFCV: numba, OpenCV
    phase("backend's imports")
    prepare_dataset(cfg)
    phase("prepare, rest" if source != "shards" else "prepare (shard tables)")
    train = build_loader(cfg, "train")
    build_loader(cfg, "val")  # a start builds both
    phase("loaders")
    train.set_epoch(0)
    epoch = iter(train)
    images, labels = next(epoch)
    phase("first batch")
    model = create_model(cfg, len(train.classes), dual_norm=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    F.cross_entropy(model(images.float() / 255), labels).backward()
    optimizer.step()
    phase("model, first step")
    phases = {**inner, **phases}
    result = {"source": source, "imports_s": imports, "phases_s": phases, "first_step_s": sum(phases.values()),
              "main_rss_mb": psutil.Process().memory_info().rss / 2**20}
    pool = getattr(getattr(getattr(train, "loader", None), "_iterator", None), "_workers", None)
    if pool:
        first = [private_memory_mb(worker.pid) for worker in pool]
        for _ in range(batches):
            try:
                next(epoch)
            except StopIteration:
                epoch = iter(train)
        result.update(worker_uss_mb=first, worker_growth_mb=[private_memory_mb(w.pid) - m for w, m in zip(pool, first)],
                      batches=batches)
    return result


def cache_home(root: Path, args) -> Path:
    """The benchmark's own $XDG_CACHE_HOME for a set (its conversions and its starts share it)."""
    return (args.cache_dir / f"xdg-{root.name}").resolve()


def start(root: Path, source: str, cold: bool, args) -> dict:
    """One start in a fresh process, with the trainer's caches under the benchmark's own folder."""
    xdg = cache_home(root, args)
    if cold:
        for kind in ("image-check", "shard-tables", "wds-index"):
            shutil.rmtree(xdg / "advprop-trainer" / kind, ignore_errors=True)
    env = {**os.environ, "XDG_CACHE_HOME": str(xdg), "PYTHONPATH": str(REPO)}
    command = [sys.executable, str(Path(__file__).resolve()), "--measure", str(root), source,
               "--workers", str(args.workers), "--batches", str(args.batches)]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return {**json.loads(result.stdout.strip().splitlines()[-1]), "start": "cold" if cold else "warm"}


def row(n: int, run: dict) -> str:
    shares = ", ".join(f"{name} {seconds / run['first_step_s']:.0%}" for name, seconds in run["phases_s"].items())
    workers = ""
    if "worker_uss_mb" in run:
        workers = (f" | {' / '.join(f'{m:.0f}' for m in run['worker_uss_mb'])} MB, "
                   f"+{max(run['worker_growth_mb']):.1f} MB after {run['batches']}")
    return (f"| {n:,} | {run['source']} | {run['start']} | {run['first_step_s']:.1f} s | {shares} | "
            f"{run['main_rss_mb']:,.0f} MB{workers or ' | –'} |")


def main(argv) -> int:
    args = parse_args(argv)
    if args.measure:
        print(json.dumps(measure(Path(args.measure[0]), args.measure[1], args.workers, args.batches)))
        return 0
    runs = []
    print("| images | source | start | to the first step | phases | main RSS | workers: USS, growth |")
    print("|---|---|---|---|---|---|---|")
    for n in args.sizes:
        root = synthetic_set(args.cache_dir, n)
        os.environ["XDG_CACHE_HOME"] = str(cache_home(root, args))  # the conversions' image check, kept there
        if "shards" in args.sources:
            shards_of(root)
        if "ffcv" in args.sources:
            betons_of(root)
        for source in args.sources:
            for kind in args.starts:
                run = {"n": n, **start(root, source, kind == "cold", args)}
                runs.append(run)
                print(row(n, run), flush=True)
    if args.json:
        print(json.dumps(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
