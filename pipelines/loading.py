"""The one interface every loader backend implements, and the switch that picks a backend.

A loader yields batches `(images, labels)` already on the training device:
  images: uint8, shape (N, 3, H, W), channels-last strides (the loop turns them into float [0, 1])
  labels: int64, shape (N,)
Class indices follow the sorted sub-folder names of the ImageFolder, as torchvision does, so every
backend (and every converted .beton) agrees on them.

Sharding is the loader's job, not Accelerate's (Accelerate cannot prepare DALI/FFCV iterators),
and ShardSampler below is its one rule, used by every backend:
  train: each process gets a disjoint, equally long shard of a permutation seeded by (seed, epoch);
         the incomplete last batch is dropped. With repeated augmentation (DeiT's, data.repeated_aug)
         each image of the permutation comes `repeats` times in a row before the striping, so its
         copies go to different processes, and each process still takes its n / world_size.
  val:   each process gets every world_size-th image; nothing is dropped or duplicated, so summing
         per-process counts gives every image counted exactly once.

Bad images (the backends that read the folder: torchvision, DALI): every image is decoded once
before training (pipelines/sources/folder/image_check.py, cached by the folder's contents); those that fail are
left out with one line naming them. One that fails later anyway (changed since its check) is
replaced by the next image of the folder that decodes (`substitute`), reported and counted, so
the epoch's order stays a function of (seed, epoch). `loader.left_out` lists both kinds for the
run's report; FFCV's converter leaves bad files out of the .beton and its list comes from there.
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Iterator, Protocol

import torch
from torch.utils.data import Sampler

from common.errors import DataError, UserInputError
from pipelines.sources.folder.image_check import check_images, report_path
from pipelines.sources.folder.listing import FolderListing, find_classes, list_image_folder

FOLDER_BACKENDS = ("torchvision", "dali")  # decode the folder's files while training
MAX_SUBSTITUTES = 16  # images failing mid-run at one place before a loader gives up (the folder is gone?)

BACKENDS = {
    "torchvision": "pipelines.backends.torchvision.loader",
    "ffcv": "pipelines.backends.ffcv.loader",
    "dali": "pipelines.backends.dali.loader",
}

INSTALL_HINTS = {
    "ffcv": "FFCV needs system libraries: `apt-get install pkg-config libopencv-dev libturbojpeg0-dev` "
    "then `pip install ffcv==1.0.2` (or rerun ./setup.sh as root).",
    "dali": "`pip install nvidia-dali-cuda130` (or rerun ./setup.sh).",
}


class Loader(Protocol):
    classes: list[str]
    num_samples: int  # images this process yields per epoch
    left_out: list[tuple[str, str]]  # (path, reason): images of the source this loader does not yield

    def __len__(self) -> int:  # batches this process yields per epoch
        ...

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Fix the epoch's order (a function of seed and epoch); skip the first start_batch batches."""

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


class ShardSampler(Sampler[int]):
    """This process's sample indices for one epoch: the shard arithmetic of every backend.

    train: a permutation seeded by (seed, epoch), each index repeated `repeats` times in a row
           (DeiT's RASampler; 1: no repeats), striped over the processes, cut to n // world_size per
           process — an epoch's length stays the data set's, as DeiT's — and cut again to whole
           batches (every process takes the same number of steps);
    val:   range(rank, n, world_size): every image once across processes, nothing padded.
    set_epoch(epoch, start_batch) fixes the epoch and skips its first start_batch batches (resume).
    Iterating gives the indices from there on; len() counts them (torch's Sampler convention);
    copies() gives each one's copy number (0 … repeats − 1), for loaders that seed an image's
    augmentation by its index and must give its copies draws of their own.
    """

    def __init__(self, n: int, *, shuffle: bool, seed: int, rank: int, world_size: int, batch_size: int,
                 repeats: int = 1):
        self.n, self.shuffle, self.seed, self.repeats = n, shuffle, seed, repeats if shuffle else 1
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.epoch, self.start_batch = 0, 0
        self._shard: tuple[int, list[int], list[int]] | None = None  # (epoch, indices, copies), kept

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def shard(self) -> tuple[list[int], list[int]]:
        """The epoch's whole shard, from its first batch: (indices, copy numbers)."""
        if not self.shuffle:
            indices = list(range(self.rank, self.n, self.world_size))
            return indices, [0] * len(indices)
        if self._shard is None or self._shard[0] != self.epoch:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.n, generator=generator)
            # this process's stripe of positions in the repeated order [a, a, a, b, b, b, …]
            positions = self.rank + self.world_size * torch.arange(self.n // self.world_size)
            positions = positions[:len(positions) - len(positions) % self.batch_size]
            self._shard = self.epoch, order[positions // self.repeats].tolist(), (positions % self.repeats).tolist()
        return self._shard[1], self._shard[2]

    def indices(self) -> list[int]:
        """The indices still to come this epoch (after start_batch batches)."""
        return self.shard()[0][self.start_batch * self.batch_size:]

    def copies(self) -> list[int]:
        """The copy number of each of indices(): 0 without repeated augmentation."""
        return self.shard()[1][self.start_batch * self.batch_size:]

    def __iter__(self):
        return iter(self.indices())

    def __len__(self) -> int:
        return len(self.indices())

    @property
    def num_batches(self) -> int:
        return -(-len(self) // self.batch_size)


def build_loader(cfg, split: str, *, rank: int = 0, world_size: int = 1,
                 device: torch.device | str = "cpu") -> Loader:
    """The loader named by cfg.loader for split "train" or "val" of cfg.data.root."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if cfg.loader not in BACKENDS:
        raise ValueError(f"loader={cfg.loader!r} is unknown; choose one of {sorted(BACKENDS)}")
    backend = import_backend(cfg.loader)
    if cfg.data.dataset == "webdataset":  # tar shards, read by every backend: pipelines/sources/shards/source.py
        from pipelines.sources.shards.source import make_loader
        return make_loader(cfg, split, rank=rank, world_size=world_size, device=torch.device(device))
    return backend.make_loader(cfg, split, rank=rank, world_size=world_size, device=torch.device(device))


def import_backend(name: str):
    """The backend module; a missing optional package (DALI, FFCV) is one clear error."""
    try:
        return importlib.import_module(BACKENDS[name])
    except ImportError as error:
        raise UserInputError(f"loader={name} is not available here ({error}). "
                             f"{INSTALL_HINTS.get(name, '')}") from error


def split_folder(cfg, split: str) -> Path:
    return Path(cfg.data.root) / (cfg.data.train_dir if split == "train" else cfg.data.val_dir)


def checked_listing(cfg, split: str, rank: int) -> FolderListing:
    """The split folder's walk with its undecodable images left out (cfg.data.check_images), and
    one line (rank 0) for each kind of file no batch will hold, so none is dropped silently."""
    listing = list_image_folder(split_folder(cfg, split))
    if cfg.data.check_images:
        listing.left_out = check_images(listing)
    if rank == 0:
        for line in folder_warnings(listing):
            print(f"warning: {line}", flush=True)
    return listing


def folder_warnings(listing: FolderListing) -> list[str]:
    lines = [listing.skipped_summary()] if listing.skipped else []
    others = listing.non_images()
    if others:
        names = ", ".join(os.path.basename(path) for path in others[:3])
        lines.append(f"{listing.root}: {len(others)} files without an image extension are not read "
                     f"({names}{', …' if len(others) > 3 else ''})")
    if listing.left_out:
        examples = "; ".join(f"{path}: {reason}" for path, reason in listing.left_out[:2])
        lines.append(f"{listing.root}: {len(listing.left_out)} images do not decode and are left out ({examples}"
                     f"{'; …' * (len(listing.left_out) > 2)}); all listed in {report_path(listing)}")
    return lines


def substitute(index: int, n: int, failed) -> int:
    """The image a loader uses in place of image `index` when it fails to decode mid-run: the next
    one in the folder's order that has not failed (a function of the folder alone, so the epoch's
    order stays a function of (seed, epoch), and every process and a resumed run agree)."""
    for step in range(1, n):
        if (index + step) % n not in failed:
            return (index + step) % n
    raise DataError("no image of the folder decodes any more: has it been moved or deleted?")


def to_device_batch(images: torch.Tensor, labels: torch.Tensor, device: torch.device):
    """uint8 NCHW → device, channels-last; labels → int64 on device."""
    images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    return images, labels.to(device, non_blocking=True).long()


def prepare_dataset(cfg) -> None:
    """One-time work before loaders exist: build the demo set, convert for the backend (if it
    needs it, e.g. FFCV's .beton files). Call on the main process first (others then reuse it)."""
    if cfg.data.dataset == "webdataset":
        import_backend(cfg.loader)  # a missing backend is one clear error, before any indexing
        from pipelines.sources.shards.source import prepare
        return prepare(cfg)
    if cfg.data.dataset == "digits":
        from pipelines.sources.offline.digits import build_digits_imagefolder
        build_digits_imagefolder(cfg.data.root)
    for split in ("train", "val"):
        find_classes(split_folder(cfg, split))  # a clear error for a missing or empty folder
    if cfg.loader in FOLDER_BACKENDS:
        for split in ("train", "val"):
            listing = list_image_folder(split_folder(cfg, split))
            if cfg.data.check_images:  # here, once, with a progress bar (the main process goes first)
                listing.left_out = check_images(listing)
            listing.images()  # an empty class folder: refused before any work
    backend = import_backend(cfg.loader) if cfg.loader in BACKENDS else None
    if backend is not None and hasattr(backend, "prepare"):
        backend.prepare(cfg)
