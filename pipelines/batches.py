"""What every loader is and yields, whatever its source and backend.

A loader yields batches `(images, labels)` already on the training device:
  images: uint8, shape (N, 3, H, W), channels-last strides (the loop turns them into float [0, 1])
  labels: int64, shape (N,)
Class indices follow the sorted sub-folder names of the ImageFolder, as torchvision does, so every
backend (and every converted .beton or shard set) agrees on them. The order of an epoch is
pipelines/sampling.py's; a sample that fails mid-run is replaced as pipelines/substitution.py says.
"""
from __future__ import annotations

from typing import Iterator, Protocol

import torch


class Loader(Protocol):
    classes: list[str]
    num_samples: int  # images this process yields per epoch
    left_out: list[tuple[str, str]]  # (path, reason): images of the source this loader does not yield

    def __len__(self) -> int:  # batches this process yields per epoch
        ...

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Fix the epoch's order (a function of seed and epoch); skip the first start_batch batches."""

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


def to_device_batch(images: torch.Tensor, labels: torch.Tensor, device: torch.device):
    """uint8 NCHW → device, channels-last; labels → int64 on device."""
    images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    return images, labels.to(device, non_blocking=True).long()
