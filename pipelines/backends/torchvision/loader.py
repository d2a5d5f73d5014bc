"""Baseline backend: PIL decoding in DataLoader workers, torchvision's transforms, uint8 out.

Reads any map-style source (a folder, local tar shards: pipelines/sources/): a sample's bytes come
from the source (a file, or two preads from a shard) and are decoded by the one PIL rule
(pipelines/sources/image_decode.py: DALI's pixels for 16-bit, float, EXIF-rotated files). A
sample that fails mid-run is replaced as pipelines/substitution.py says. Remote shards are
streamed instead (stream.py). The dataset holds the source's arrays, not Python objects per
sample, so its workers copy nothing while they read (pipelines/sources/samples.py); they persist
across epochs, each told the epoch with its batches (EpochKeys).
"""
from __future__ import annotations

import atexit
import functools
import itertools
import weakref

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from pipelines.backends.torchvision.stream import StreamingLoader
from pipelines.backends.torchvision.workers import ignore_interrupts, image_transform, seeded_by_sample
from pipelines.batches import to_device_batch
from pipelines.sampling import ShardSampler
from pipelines.sources.image_decode import decode_bytes
from pipelines.substitution import LeftOut, first_readable


class SeededImages(Dataset):
    """A source's samples, each one's random augmentation a function of (seed, epoch, index).

    So an epoch's images are the same whatever the worker count, and a resumed run skipping the
    consumed batches sees exactly the images the uninterrupted run saw. Keys are (epoch, index,
    copy) (EpochKeys): under repeated augmentation copies other than the first get draws of their
    own. Items are (image, label, failures): a sample that fails to read or decode (changed since its
    check) is replaced by its substitute, with the same augmentation draws; failures says which, a
    "where<TAB>reason" line each ("" when none did).
    """

    def __init__(self, source, transform, seed: int):
        self.source, self.transform, self.seed = source, transform, seed
        self.classes, self.left_out = source.classes, source.left_out

    def __len__(self) -> int:
        return len(self.source)

    @property
    def samples(self):
        """[(path, label)] of a folder source (for reports and tests)."""
        return self.source.samples

    def __getitem__(self, key: tuple[int, int, int]):
        epoch, index, copy = key
        (image, label), failures = first_readable(index, len(self.source), self.decode)
        lines = "\n".join("\t".join(failure).replace("\n", " ") for failure in failures)
        load = functools.partial(self.transform, image)
        return seeded_by_sample(self.seed, epoch, index, load, copy), label, lines

    def decode(self, index: int):
        sample = self.source.read(index)
        try:
            return decode_bytes(sample.image), sample.label
        except Exception as error:  # PIL raises many types for a bad file; each means the same here
            raise self.source.unreadable(index, error) from None


class EpochKeys(Sampler):
    """A ShardSampler's indices as (epoch, index, copy) keys: the epoch travels with each key, so
    persistent workers need no word of a new epoch."""

    def __init__(self, shard: ShardSampler):
        self.shard = shard

    def __iter__(self):
        epoch = self.shard.epoch
        return zip(itertools.repeat(epoch), map(int, self.shard.index_array()), map(int, self.shard.copy_array()))

    def __len__(self) -> int:
        return len(self.shard)


class TorchvisionLoader:
    def __init__(self, cfg, split: str, source, *, rank: int, world_size: int, device: torch.device):
        self.source = source
        self.dataset = SeededImages(source, image_transform(cfg, split), cfg.seed)
        self.classes = self.dataset.classes
        self.left_out = LeftOut(source.left_out, source.failure_line)  # + those that fail mid-run, as they do
        self.train = split == "train"
        self.batch_size, self.device = cfg.batch_size, device
        self.sampler = ShardSampler(len(self.dataset), shuffle=self.train, seed=cfg.seed, rank=rank,
                                    world_size=world_size, batch_size=self.batch_size, repeats=cfg.data.repeated_aug)
        workers = cfg.data.workers
        self.loader = DataLoader(
            self.dataset, batch_size=self.batch_size, sampler=EpochKeys(self.sampler),  # train: whole batches only
            num_workers=workers, pin_memory=device.type == "cuda",
            persistent_workers=workers > 0, worker_init_fn=ignore_interrupts,
            # Its own generator: making an iterator draws a seed, which must not come from the
            # global RNG (a resumed run makes one more iterator mid-epoch than the original did).
            generator=torch.Generator().manual_seed(cfg.seed))
        if workers:  # before multiprocessing's own exit handler, which would kill them mid-exit (SIGTERM)
            atexit.register(close_at_exit, weakref.ref(self))
    @property
    def num_samples(self) -> int:
        return len(self.sampler)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.sampler.set_epoch(epoch, start_batch)

    def __len__(self) -> int:
        return self.sampler.num_batches

    def __iter__(self):
        for images, labels, failures in self.loader:
            for failure in filter(None, "\n".join(failures).splitlines()):
                self.left_out.failed_mid_run(*failure.split("\t", 2))
            yield to_device_batch(images, labels, self.device)

    def close(self) -> None:
        """Ends the persistent workers; a closed loader is not iterated again."""
        self.loader = None  # the DataLoader's iterator, freed with it, shuts its workers down


def close_at_exit(loader_ref) -> None:
    """At interpreter exit (atexit runs it before multiprocessing's handler, registered earlier):
    a loader still alive (held by a traceback's frames, say) ends its workers in order. Else
    multiprocessing kills them with SIGTERM and torch's SIGCHLD handler turns that into an error."""
    loader = loader_ref()
    if loader is not None:
        loader.close()


def make_loader(cfg, split, source, *, rank, world_size, device):
    if source.kind == "stream":
        return StreamingLoader(cfg, split, source, rank=rank, world_size=world_size, device=device)
    return TorchvisionLoader(cfg, split, source, rank=rank, world_size=world_size, device=device)
