"""The two calls a run makes: prepare_dataset once, then build_loader per split and process.

    prepare_dataset(cfg)                                       # main process first, others after
    loader = build_loader(cfg, "train", rank=r, world_size=w, device=d)

A loader is a source (pipelines/sources/, by cfg.data.dataset: an ImageFolder, tar shards) read
by a backend (pipelines/backends/, by cfg.loader: a record naming what it reads and needs), in
pipelines/sampling.py's order, yielding pipelines/batches.py's batches.

Bad images (the backends that decode the source's files: torchvision, DALI): every image of a
folder is decoded once before training (pipelines/sources/folder/image_check.py, cached by the
folder's contents); those that fail are left out with one line naming them. One that fails later
anyway is replaced as pipelines/substitution.py says. `loader.left_out` lists both kinds for the
run's report; FFCV's converter leaves bad files out of the .beton and its list comes from there.
"""
from __future__ import annotations

import torch

from pipelines.backends import BACKENDS, backend_of, implementation
from pipelines.batches import Loader
from pipelines.sources import open_source, prepare_sources


def streaming_backends() -> list[str]:
    return [name for name, backend in BACKENDS.items() if backend.streams]


def build_loader(cfg, split: str, *, rank: int = 0, world_size: int = 1,
                 device: torch.device | str = "cpu") -> Loader:
    """The loader named by cfg.loader for split "train" or "val" of cfg.data."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    backend = backend_of(cfg)
    module = implementation(backend)  # a missing backend: one clear error before any work
    source = open_source(cfg, split, rank=rank, check=backend.decodes_files,
                         streaming=streaming_backends()) if backend.reads_sources else None
    return module.make_loader(cfg, split, source, rank=rank, world_size=world_size, device=torch.device(device))


def prepare_dataset(cfg) -> None:
    """One-time work before loaders exist: the demo set built, the source listed, checked or
    indexed, then the backend's own (FFCV's .beton files). Call on the main process first (others
    then reuse what it cached)."""
    backend = backend_of(cfg)
    module = implementation(backend)  # a missing backend: one clear error before any indexing
    prepare_sources(cfg, check=backend.decodes_files, streaming=streaming_backends())
    if hasattr(module, "prepare"):
        module.prepare(cfg)
