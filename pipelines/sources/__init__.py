"""Where images come from, by cfg.data.dataset: an ImageFolder (folder/: digits, the offline demo
set, is one), or WebDataset tar shards (shards/).

A source is what a backend reads (pipelines/backends/): its classes, its length, what it left out
before training (left_out), and per sample where(i) (a path, or shard and key, for reports) and
read(i) (the image's encoded bytes and its label; Unreadable when it cannot be read), with
unreadable(i, error) and failure_line(where, reason) for a sample whose bytes do not decode.
Kinds: "folder" (FolderSource, which also gives paths), "shards" (ShardSource), "stream"
(StreamSource: remote shards, which only a backend that `streams` reads, whole).

    prepare_sources(cfg, check=..., streaming=[...])     # once, main process first
    source = open_source(cfg, "train", rank=0, check=..., streaming=[...])
"""
from __future__ import annotations

from pipelines.sources.folder.source import FolderSource, open_folder, prepare_folders
from pipelines.sources.shards.source import ShardSource, StreamSource, open_shards, prepare_shards

Source = FolderSource | ShardSource | StreamSource


def prepare_sources(cfg, *, check: bool, streaming: list[str]) -> None:
    """One-time work before loaders exist: the demo set built, folders listed and (with `check`:
    the backend decodes their files) checked, shards indexed. check and streaming come from the
    backend's record."""
    if cfg.data.dataset == "webdataset":
        prepare_shards(cfg, streaming)
        return
    if cfg.data.dataset == "digits":
        from pipelines.sources.offline.digits import build_digits_imagefolder
        build_digits_imagefolder(cfg.data.root)
    prepare_folders(cfg, check=check)


def open_source(cfg, split: str, *, rank: int = 0, check: bool, streaming: list[str]) -> Source:
    if cfg.data.dataset == "webdataset":
        return open_shards(cfg, split, streaming)
    return open_folder(cfg, split, rank=rank, check=check)
