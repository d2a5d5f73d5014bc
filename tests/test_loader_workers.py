"""Samples as arrays, read by workers that persist: a DataLoader worker reads every sample of a
listing without copying it (pytorch/pytorch#13246: indexing Python objects writes their reference
counts into the pages it shares with the training process), and workers kept across epochs give
the images of (seed, epoch), after an abandoned epoch and from a resumed position too."""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.loading import build_loader
from pipelines.sources.folder.listing import FolderListing
from pipelines.sources.folder.source import FolderSource
from pipelines.sources.samples import PathTable

SAMPLES = 200_000


def private_dirty_kb() -> int:
    """This process's private dirty memory: the pages it wrote since it was forked, and its own."""
    text = Path("/proc/self/smaps_rollup").read_text()
    return int(re.search(r"^Private_Dirty:\s+(\d+) kB", text, re.M).group(1))


def growth_while_reading(read, n: int) -> int:
    """KiB of private memory a forked child (a DataLoader worker's situation) writes reading n samples."""
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: read everything, report, leave without cleaning up
        before = private_dirty_kb()
        for index in range(n):
            read(index)
        os.write(writer, str(private_dirty_kb() - before).encode())
        os._exit(0)
    os.close(writer)
    os.waitpid(pid, 0)
    with os.fdopen(reader) as result:
        return int(result.read())


def big_listing(n: int) -> FolderListing:
    paths = PathTable.from_strings(f"n{i % 1000:08d}/n{i % 1000:08d}_{i}.JPEG" for i in range(n))
    zeros = np.zeros(n, dtype=np.int64)
    return FolderListing(Path("/data/imagenet/train"), [f"n{c:08d}" for c in range(1000)], paths,
                         np.arange(n, dtype=np.int64) % 1000, np.ones(n, dtype=bool), zeros.astype(np.uint64),
                         zeros, zeros, PathTable.from_strings([""]), np.zeros(1, dtype=np.int64))


@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists(), reason="needs Linux's /proc")
def test_a_forked_worker_reads_every_sample_without_copying_the_listing():
    source = FolderSource(big_listing(SAMPLES))
    arrays = growth_while_reading(lambda i: (source.path(i), int(source.labels[i])), SAMPLES)
    tuples = [(source.path(i), int(source.labels[i])) for i in range(SAMPLES)]  # what a list of samples costs
    objects = growth_while_reading(lambda i: tuples[i], SAMPLES)
    assert objects > 8_000  # KiB: the page of each tuple written (its reference count: 64 B a sample)
    assert arrays < 2_000, arrays  # the arrays are only read


def batches(loader, epoch: int, start_batch: int = 0):
    loader.set_epoch(epoch, start_batch)
    return [(images.clone(), labels.clone()) for images, labels in loader]


def same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) and torch.equal(u, v) for (x, u), (y, v) in zip(a, b))


def test_persistent_workers_give_the_images_of_seed_and_epoch(demo_cfg, few_digits):
    """Workers kept across epochs: each epoch as without workers, after an abandoned epoch too, and
    from a resumed position."""
    common = (f"data.root={few_digits}", "data.image_size=16", "batch_size=16")
    reference = build_loader(demo_cfg(*common, "data.workers=0"), "train")
    loader = build_loader(demo_cfg(*common, "data.workers=2"), "train")
    assert loader.loader.persistent_workers
    assert same(batches(loader, 0), batches(reference, 0))
    workers = loader.loader._iterator._workers  # kept for the next epoch
    loader.set_epoch(1)
    next(iter(loader))  # an epoch abandoned after its first batch
    assert same(batches(loader, 1), batches(reference, 1))
    assert same(batches(loader, 2, start_batch=4), batches(reference, 2)[4:])
    assert loader.loader._iterator._workers == workers and all(worker.is_alive() for worker in workers)
