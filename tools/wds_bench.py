"""The WebDataset parts of tools/bench_loaders.py: the bench folder as shards, and the time to a
first batch on a set of many shards.

    python tools/bench_loaders.py --shards                    # each backend: folder vs. shards of the same images
    python tools/bench_loaders.py --first-batch-shards 1000   # seconds to the first batch, 1,000 shards
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from pipelines.backends import BACKENDS
from pipelines.loading import build_loader, prepare_dataset
from pipelines.writers.shards import convert_folder
from train.config import load_config


def shard_copy(folder: Path, cache_dir: Path, shard_size: int = 500) -> Path:
    """folder converted by tools/convert_wds.py's converter into cache_dir/<name>-wds (split "train"),
    made once and reused."""
    out = cache_dir / f"{folder.name}-wds"
    if not (out / "_info.json").is_file():
        convert_folder(folder, out, split="train", shard_size=shard_size)
    return out


def shard_overrides(shards: Path) -> list[str]:
    """The bench config's data keys for reading a shard copy (its "train" split for both splits)."""
    return ["data.dataset=webdataset", f"data.root={shards}", "data.train_dir=train", "data.val_dir=train"]


def synthetic_shards(cache_dir: Path, count: int, per_shard: int = 2) -> Path:
    """A set of `count` shards of per_shard 64 px JPEGs (10 classes of noise), with index files."""
    out = cache_dir / f"synthetic-{count}-wds"
    if (out / "_info.json").is_file():
        return out
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(dir=cache_dir) as folder:
        for index in range(count * per_shard):
            (Path(folder) / str(index % 10)).mkdir(exist_ok=True)
            pixels = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(Path(folder) / str(index % 10) / f"{index}.jpg", quality=90)
        convert_folder(folder, out, split="train", shard_size=per_shard)
    return out


def first_batch_seconds(root: Path, backend: str, batch_size: int) -> float:
    """Seconds from the config to the first train batch: the info file, every shard's index (read, or
    built when missing), the up-front checks, the loader, its first batch (imports not counted)."""
    from pipelines.sources.shards import source as webdataset_source
    webdataset_source._TABLES.clear()  # nothing kept from an earlier measurement in this process
    start = time.perf_counter()
    cfg = load_config([f"loader={backend}", *shard_overrides(root), "data.image_size=64", "data.num_classes=10",
                       f"batch_size={batch_size}", "data.workers=2", "data.dali.threads=2", "tracker=none"])
    prepare_dataset(cfg)
    loader = build_loader(cfg, "train")
    loader.set_epoch(0)
    next(iter(loader))
    return time.perf_counter() - start


def without_index_files(root: Path, into: Path) -> Path:
    """A view of the set with its tars (links) and info file but no index files: a first use."""
    into.mkdir(parents=True, exist_ok=True)
    for path in root.iterdir():
        if path.suffix != ".idx":
            (into / path.name).symlink_to(path)
    return into


def first_batch_report(args) -> list[dict]:
    root = synthetic_shards(args.cache_dir, args.first_batch_shards)
    rows = []
    cache = os.environ.get("XDG_CACHE_HOME")
    for backend in [b for b in args.backends if BACKENDS[b].reads_sources]:  # FFCV reads its .beton instead
        with tempfile.TemporaryDirectory() as scratch:
            for name, folder in (("index files", root), ("no index files (built now)",
                                                         without_index_files(root, Path(scratch) / "view"))):
                os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(dir=scratch)  # cold caches: a first start
                seconds = first_batch_seconds(folder, backend, args.batch_size)
                rows.append({"backend": backend, "shards": args.first_batch_shards, "case": name, "seconds": seconds})
                print(f"{backend:12s} {args.first_batch_shards} shards, {name}: first batch after {seconds:.2f} s",
                      flush=True)
    if cache is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = cache
    return rows
