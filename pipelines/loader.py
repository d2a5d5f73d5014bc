"""The one interface every loader backend implements, and the switch that picks a backend.

A loader yields batches `(images, labels)` already on the training device:
  images: uint8, shape (N, 3, H, W), channels-last strides (the loop turns them into float [0, 1])
  labels: int64, shape (N,)
Class indices follow the sorted sub-folder names of the ImageFolder, as torchvision does, so every
backend (and every converted .beton) agrees on them.

Sharding is the loader's job, not Accelerate's (Accelerate cannot prepare DALI/FFCV iterators):
  train: each process gets a disjoint, equally long shard of a permutation seeded by (seed, epoch);
         the incomplete last batch is dropped.
  val:   each process gets every world_size-th image; nothing is dropped or duplicated, so summing
         per-process counts gives every image counted exactly once.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Iterator, Protocol

import torch

from pipelines.image_folder import find_classes  # noqa: F401  (re-exported: the loaders' class rule)
from train.errors import UserInputError

BACKENDS = {
    "torchvision": "pipelines.torchvision_loader",
    "ffcv": "pipelines.ffcv_loader",
    "dali": "pipelines.dali_loader",
}

INSTALL_HINTS = {
    "ffcv": "FFCV needs system libraries: `apt-get install pkg-config libopencv-dev libturbojpeg0-dev` "
    "then `pip install ffcv==1.0.2` (or rerun ./setup.sh as root).",
    "dali": "`pip install nvidia-dali-cuda130` (or rerun ./setup.sh).",
}


class Loader(Protocol):
    classes: list[str]
    num_samples: int  # images this process yields per epoch

    def __len__(self) -> int:  # batches this process yields per epoch
        ...

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Fix the epoch's order (a function of seed and epoch); skip the first start_batch batches."""

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


def build_loader(cfg, split: str, *, rank: int = 0, world_size: int = 1,
                 device: torch.device | str = "cpu") -> Loader:
    """The loader named by cfg.loader for split "train" or "val" of cfg.data.root."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if cfg.loader not in BACKENDS:
        raise ValueError(f"loader={cfg.loader!r} is unknown; choose one of {sorted(BACKENDS)}")
    backend = import_backend(cfg.loader)
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


def report_skipped(listing, rank: int) -> None:
    """Say once (rank 0) what the folder walk left out, so no image is dropped silently."""
    if listing.skipped and rank == 0:
        print(f"warning: {listing.skipped_summary()}", flush=True)


def to_device_batch(images: torch.Tensor, labels: torch.Tensor, device: torch.device):
    """uint8 NCHW → device, channels-last; labels → int64 on device."""
    images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    return images, labels.to(device, non_blocking=True).long()


def prepare_dataset(cfg) -> None:
    """One-time work before loaders exist: build the demo set, convert for the backend (if it
    needs it, e.g. FFCV's .beton files). Call on the main process first (others then reuse it)."""
    if cfg.data.dataset == "digits":
        from pipelines.demo_data import build_digits_imagefolder
        build_digits_imagefolder(cfg.data.root)
    for split in ("train", "val"):
        find_classes(split_folder(cfg, split))  # a clear error for a missing or empty folder
    backend = import_backend(cfg.loader) if cfg.loader in BACKENDS else None
    if backend is not None and hasattr(backend, "prepare"):
        backend.prepare(cfg)
