"""Baseline backend: torchvision ImageFolder + DataLoader, PIL decode on CPU workers, uint8 out.

Images are decoded by pipelines/sources/image_decode.py's rule (DALI's pixels for 16-bit, float, EXIF-rotated
files); bad ones are left out or replaced as pipelines/loading.py says.
"""
from __future__ import annotations

import functools
import random
import signal

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler
from torchvision import datasets, transforms

from pipelines.backends.augment_policy import timm_transform
from common.errors import DataError
from pipelines.sources.image_decode import decode_problem, open_rgb
from pipelines.loading import MAX_SUBSTITUTES, ShardSampler, checked_listing, substitute, to_device_batch


def ignore_interrupts(worker_id: int) -> None:
    """DataLoader worker_init_fn: Ctrl-C is the main process's to handle; a worker that died of it
    would break the step the main process is finishing."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def image_transform(cfg, split: str) -> transforms.Compose:
    data = cfg.data
    if split == "train":
        steps = [transforms.RandomResizedCrop(data.image_size, scale=(data.min_scale, 1.0))]
        if data.hflip:
            steps.append(transforms.RandomHorizontalFlip())
        if data.auto_augment:
            steps.append(timm_transform(data.auto_augment, data.image_size))
    else:
        size = data.val_image_size or data.image_size
        steps = [transforms.Resize(round(size / data.crop_ratio)), transforms.CenterCrop(size)]
    return transforms.Compose([*steps, transforms.PILToTensor()])


class SeededImageFolder(datasets.ImageFolder):
    """ImageFolder whose random augmentation is a function of (seed, epoch, index).

    So an epoch's images are the same whatever the worker count, and a resumed run skipping the
    consumed batches sees exactly the images the uninterrupted run saw. Under repeated augmentation
    the key is (index, copy) and copies other than the first get draws of their own. Items are
    (image, label, failures): an image that fails to decode (changed since its check) is replaced by
    the loaders' `substitute`, with the same augmentation draws; failures says which (see decode).
    """

    seed: int = 0
    epoch: int = 0

    def __init__(self, listing, transform):
        self.listing = listing  # the walk all backends share (symlinks once), bad images left out
        super().__init__(listing.root, transform=transform, loader=open_rgb)  # the one decode rule

    def find_classes(self, directory):
        return self.listing.classes, {name: i for i, name in enumerate(self.listing.classes)}

    def make_dataset(self, directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
        return self.listing.images()

    @property
    def left_out(self) -> list[tuple[str, str]]:
        return self.listing.left_out

    def __getitem__(self, key: int | tuple[int, int]):
        index, copy = sample_key(key)
        image, label, failures = self.decode(index)
        load = functools.partial(self.transform, image)
        return seeded_by_sample(self.seed, self.epoch, index, load, copy), label, failures

    def decode(self, index: int):
        """(RGB image, label, failures) of image index, or of its substitute if it fails to decode;
        failures: a "path<TAB>reason" line for each file that failed ("" when none did)."""
        failed, failures = set(), []
        while True:
            path, label = self.samples[index]
            try:
                return self.loader(path), label, "\n".join(failures)
            except Exception as error:  # PIL raises many types for a bad file; each means the same here
                reason = decode_problem(path)[0] or f"{type(error).__name__}: {error}"  # the check's words
                failures.append(f"{path}\t{reason}".replace("\n", " "))
                failed.add(index)
                if len(failed) > MAX_SUBSTITUTES:
                    raise DataError(f"{self.samples[min(failed)][0]} and the next {MAX_SUBSTITUTES} images do not "
                                    f"decode: has the folder been moved or deleted?") from error
                index = substitute(index, len(self.samples), failed)


def sample_key(key: int | tuple[int, int]) -> tuple[int, int]:
    """(index, copy) of a dataset key: an index, or (index, copy) under repeated augmentation."""
    return key if isinstance(key, tuple) else (key, 0)


def seeded_by_sample(seed: int, epoch: int, index: int, load, copy: int = 0):
    """load() with torch's, python's and numpy's RNG seeded by (seed, epoch, index) — and copy, for
    repeated augmentation's copies after the first — the caller's RNG states left as they were
    (workers=0 runs this in the training process)."""
    sample_seed = (seed * 1_000_003 + epoch) * 10_000_019 + index
    if copy:
        sample_seed = int(np.random.SeedSequence([abs(sample_seed), copy]).generate_state(1, np.uint64)[0])
    # timm's AutoAugment draws from python's random, its RandAugment also from numpy's
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(sample_seed)
        random.seed(sample_seed)
        np.random.seed(sample_seed % 2**32)
        try:
            return load()
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


class CopyKeys(Sampler):
    """A ShardSampler's (index, copy) pairs, under repeated augmentation (SeededImageFolder's keys)."""

    def __init__(self, shard: ShardSampler):
        self.shard = shard

    def __iter__(self):
        return zip(self.shard.indices(), self.shard.copies())

    def __len__(self) -> int:
        return len(self.shard)


class TorchvisionLoader:
    def __init__(self, cfg, split: str, *, rank: int, world_size: int, device: torch.device):
        self.dataset = self.make_dataset(cfg, split, rank)
        self.classes = self.dataset.classes
        self.left_out = list(self.dataset.left_out)  # + those that fail mid-run, as they do
        self.dataset.seed = cfg.seed
        self.train = split == "train"
        self.batch_size, self.device = cfg.batch_size, device
        self.sampler = ShardSampler(len(self.dataset), shuffle=self.train, seed=cfg.seed, rank=rank,
                                    world_size=world_size, batch_size=self.batch_size, repeats=cfg.data.repeated_aug)
        workers = cfg.data.workers
        keys = self.sampler if self.sampler.repeats == 1 else CopyKeys(self.sampler)
        self.loader = DataLoader(
            self.dataset, batch_size=self.batch_size, sampler=keys,  # train: whole batches only
            num_workers=workers, pin_memory=device.type == "cuda",
            # Workers are re-made each epoch so they see the dataset's new epoch (see SeededImageFolder).
            persistent_workers=False, worker_init_fn=ignore_interrupts,
            # Its own generator: making an iterator draws a seed, which must not come from the
            # global RNG (a resumed run makes one more iterator mid-epoch than the original did).
            generator=torch.Generator().manual_seed(cfg.seed))

    def make_dataset(self, cfg, split: str, rank: int):
        """The map-style dataset of the split: (uint8 CHW tensor, label, failures) per index, with
        seed, epoch, classes and left_out attributes (tar shards: pipelines/backends/torchvision/shards.py)."""
        return SeededImageFolder(checked_listing(cfg, split, rank), image_transform(cfg, split))

    @property
    def num_samples(self) -> int:
        return len(self.sampler)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.sampler.set_epoch(epoch, start_batch)
        self.dataset.epoch = epoch

    def __len__(self) -> int:
        return self.sampler.num_batches

    def __iter__(self):
        for images, labels, failures in self.loader:
            for failure in filter(None, "\n".join(failures).splitlines()):
                self.report_failure(*failure.split("\t", 1))
            yield to_device_batch(images, labels, self.device)

    def report_failure(self, path: str, reason: str) -> None:
        """Once per file and process: a line, and a place in left_out (the run's report)."""
        if all(path != known for known, _ in self.left_out):
            self.left_out.append((path, f"failed mid-run: {reason}"))
            print(f"warning: {path} does not decode ({reason}); the next image of the folder is used "
                  f"in its place (changed since it was checked?)", flush=True)


def make_loader(cfg, split, *, rank, world_size, device):
    return TorchvisionLoader(cfg, split, rank=rank, world_size=world_size, device=device)
