"""Evaluation folders through our val loader, with labels in the model's class space.

A loader numbers an ImageFolder's classes by its own sorted sub-folders; the model numbers them by
the classes it was trained on. Two ways to line them up, as the data sets' authors do:
  - RelabeledLoader (val, ImageNet-C, Stylized-ImageNet): labels → the model's indices, all logits;
  - SubsetLogits (ImageNet-A, ImageNet-R: 200 WordNet ids of the 1000): the model's logits restricted
    to the folder's classes, in the folder's order, so the prediction is the argmax among those.
"""
from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import torch
from omegaconf import OmegaConf
from torch import nn

from common.errors import UserInputError
from pipelines.loading import build_loader
from pipelines.sources.folder.listing import find_classes
from pipelines.sources.shards.source import dataset_classes
from pipelines.sources.shards.spec import shard_data, shard_split
from tools.robustness.load import imagenet_wnids


def folder_loader(folder: Path, cfg, accelerator, *, batch_size: int, workers: int,
                  model_classes: list[str] | None = None):
    """The torchvision val loader of `cfg` (the model's resize + center crop) over any ImageFolder,
    or over WebDataset shards (a folder with _info.json, its val split; or a .tar pattern)."""
    shards = shard_data(str(folder), "val")
    if shards is not None:
        return shard_loader(shards, cfg, accelerator, batch_size=batch_size, workers=workers,
                            model_classes=model_classes)
    folder = Path(folder).resolve()
    find_classes(folder)  # a clear error for a missing folder or one without class sub-folders
    cfg = OmegaConf.merge(cfg, {"loader": "torchvision", "batch_size": batch_size, "data": {
        "dataset": "imagefolder", "root": str(folder.parent), "val_dir": folder.name, "workers": workers}})
    return build_loader(cfg, "val", rank=accelerator.process_index, world_size=accelerator.num_processes,
                        device=accelerator.device)


def shard_loader(shards: dict, cfg, accelerator, *, batch_size: int, workers: int, model_classes: list[str] | None):
    """A shard set's val loader. Without class names in the set, its labels are the model's indices."""
    named = shard_split(SimpleNamespace(**shards), "val").classes is not None
    data = {**shards, "workers": workers, "num_classes": 0 if named else len(model_classes or [])}
    cfg = OmegaConf.merge(cfg, {"loader": "torchvision", "batch_size": batch_size, "data": data})
    loader = build_loader(cfg, "val", rank=accelerator.process_index, world_size=accelerator.num_processes,
                          device=accelerator.device)
    if model_classes and loader.classes == [str(i) for i in range(len(model_classes))]:
        loader.classes = list(model_classes)
    return loader


def data_classes(source: Path) -> list[str]:
    """The class names of an evaluation set: an ImageFolder's folders, a shard set's classes."""
    shards = shard_data(str(source), "val")
    if shards is None:
        return find_classes(source)
    return dataset_classes(SimpleNamespace(data=SimpleNamespace(**shards, num_classes=0, workers=0)), "val")


def class_indices(folder_classes: list[str], model_classes: list[str], folder: Path) -> list[int]:
    """The model's output index of each of the folder's classes (matched by name)."""
    position = {name: i for i, name in enumerate(model_classes)}
    unknown = [name for name in folder_classes if name not in position]
    if unknown:
        raise UserInputError(f"{folder}: {len(unknown)} class folder(s) are not classes of the model, e.g. "
                             f"{unknown[:5]} (the model's: {model_classes[:5]}…)")
    return [position[name] for name in folder_classes]


def imagenet_subset_indices(folder_classes: list[str], model_classes: list[str], folder: Path) -> list[int]:
    """ImageNet-A/-R folder names (WordNet ids) → ImageNet-1k indices; the model must be a 1k model."""
    wnids = imagenet_wnids()
    if list(model_classes) != wnids:
        raise UserInputError(f"{folder}: ImageNet-A/-R need a model whose outputs are the 1000 ImageNet-1k "
                             f"classes (WordNet ids in timm's order); this one has {len(model_classes)} "
                             f"classes ({list(model_classes)[:3]}…)")
    return class_indices(folder_classes, wnids, folder)


class LoaderWrapper:
    """Another loader (pipelines/loading.py interface) whose batches a subclass's __iter__ changes."""

    def __init__(self, loader):
        self.loader, self.classes = loader, loader.classes

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.loader.set_epoch(epoch, start_batch)


class RelabeledLoader(LoaderWrapper):
    """Another loader's batches with labels translated to the model's class indices."""

    def __init__(self, loader, model_classes: list[str], folder: Path):
        super().__init__(loader)
        self.classes = model_classes
        self.to_model = torch.tensor(class_indices(loader.classes, model_classes, folder))

    def __iter__(self):
        for images, labels in self.loader:
            yield images, self.to_model.to(labels.device)[labels]


class LimitedLoader(LoaderWrapper):
    """About `limit` images of another loader: whole batches spread evenly over it (a quick look;
    the skipped batches are still decoded, but neither corrupted, attacked nor classified)."""

    def __init__(self, loader, limit: int, batch_size: int):
        super().__init__(loader)
        self.batches = min(len(loader), math.ceil(limit / batch_size))
        self.stride = max(1, len(loader) // self.batches)

    def __len__(self) -> int:
        return self.batches

    def __iter__(self):
        kept = 0
        for index, batch in enumerate(self.loader):
            if kept < self.batches and index % self.stride == 0:
                kept += 1
                yield batch


class SubsetLogits(nn.Module):
    """model(x)[:, indices]: a 1000-class model evaluated on a class subset (ImageNet-A, -R)."""

    def __init__(self, model: nn.Module, indices: list[int]):
        super().__init__()
        self.model = model
        self.register_buffer("indices", torch.tensor(indices), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[:, self.indices]
