"""FFCV backend (`loader=ffcv`): .beton files decoded by ffcv's JIT pipeline on CPU threads.

prepare(cfg) converts data.root's train/ and val/ folders to <root>/ffcv/{train,val}.beton once
(again only when the storage settings or the source change); data.ffcv.train_beton/val_beton point
at betons made with tools/convert_ffcv.py instead, which are used as they are.

Per batch: decode + random-resized-crop (train) or center-crop at the 224/256 ratio (val), flip,
→ uint8 NHWC tensor → device → NCHW view with channels-last strides. Normalisation stays on the
device (in the model): an ffcv pipeline going JIT op → torch op → JIT op hangs the Loader constructor.

Sample order is ours, not ffcv's: the shards of every backend (pipelines/loader.py's ShardSampler),
so each process reads its own shard, train order is a function of (seed, epoch), train drops the
incomplete batch, val yields every image exactly once over processes, and a mid-epoch resume skips
the consumed batches without decoding them.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from ffcv.fields.basics import IntDecoder
from ffcv.fields.rgb_image import CenterCropRGBImageDecoder, RandomResizedCropRGBImageDecoder
from ffcv.loader import Loader
from ffcv.reader import Reader
from ffcv.transforms import RandomHorizontalFlip, Squeeze, ToDevice, ToTensor, ToTorchImage
from ffcv.traversal_order.base import TraversalOrder

from pipelines.errors import UserInputError
from pipelines.ffcv_writer import StorageSettings, convert_imagefolder, read_metadata
from pipelines.loader import ShardSampler, find_classes, split_folder, to_device_batch

# ---------------------------------------------------------------------------------------------
# .beton files

def storage_settings(cfg) -> StorageSettings:
    f = cfg.data.ffcv
    return StorageSettings(max_resolution=f.max_resolution, write_mode=f.write_mode,
                           compress_probability=f.compress_probability, jpeg_quality=f.jpeg_quality)


def beton_path(cfg, split: str) -> Path:
    given = cfg.data.ffcv.train_beton if split == "train" else cfg.data.ffcv.val_beton
    return Path(given) if given else Path(cfg.data.root) / "ffcv" / f"{split}.beton"


def is_current(beton: Path, source: Path, settings: StorageSettings) -> bool:
    """Made by our writer from this folder with these settings, and complete."""
    meta = read_metadata(beton)
    return (beton.is_file() and meta is not None and meta.get("bytes") == beton.stat().st_size
            and meta.get("source") == str(source.resolve()) and meta.get("limit") == 0
            and meta.get("settings") == asdict(settings))


def prepare(cfg) -> None:
    """Converts each split's folder to its default .beton unless an up-to-date one exists."""
    settings = storage_settings(cfg)
    for split in ("train", "val"):
        beton, source = beton_path(cfg, split), split_folder(cfg, split)
        user_given = bool(cfg.data.ffcv.train_beton if split == "train" else cfg.data.ffcv.val_beton)
        if (user_given and beton.is_file()) or is_current(beton, source, settings):
            continue
        print(f"converting {source} → {beton} (once; FFCV reads the .beton)")
        summary = convert_imagefolder(source, beton, settings, workers=cfg.data.workers)
        if summary["skipped"]:
            print(f"warning: {summary['skipped']} unreadable files skipped, listed in {beton}.skipped.txt")


def beton_classes(cfg, split: str, beton: Path) -> list[str]:
    meta = read_metadata(beton)
    if meta is not None:
        return meta["classes"]
    return find_classes(split_folder(cfg, split))  # a .beton from elsewhere: trust the folder


# ---------------------------------------------------------------------------------------------
# Order and resolution

class ShardOrder(TraversalOrder):
    """ffcv's order hook, giving this process's indices of the epoch set on its ShardSampler."""

    def __init__(self, shard: ShardSampler):
        self.shard = shard  # not `sampler`: ffcv's base class sets that to None

    def __call__(self, loader):
        # ffcv's Loader accepts a TraversalOrder *instance* but then calls it with the loader
        # (it means a class): being callable lets us pass one holding our state.
        super().__init__(loader)
        return self

    def sample_order(self, epoch: int) -> np.ndarray:  # ffcv's own epoch counter is ignored
        return np.asarray(self.shard.indices(), dtype=np.uint64)


def train_resolution(cfg, epoch: int) -> int:
    """Progressive resizing (ffcv-imagenet): min_res until start_epoch, linear to max_res at
    end_epoch, rounded to a multiple of 8; data.image_size throughout when min_res is 0."""
    p = cfg.data.ffcv.progressive
    if not p.min_res:
        return cfg.data.image_size
    max_res = p.max_res or cfg.data.image_size
    if epoch <= p.start_epoch:
        return p.min_res
    if epoch >= p.end_epoch:
        return max_res
    res = np.interp(epoch, [p.start_epoch, p.end_epoch], [p.min_res, max_res])
    return int(round(res / 8)) * 8


# ---------------------------------------------------------------------------------------------
# The loader

def image_pipeline(cfg, split: str, device: torch.device) -> list:
    data = cfg.data
    if split == "train":
        size = train_resolution(cfg, 0)
        steps = [RandomResizedCropRGBImageDecoder((size, size), scale=(data.min_scale, 1.0))]
        if data.hflip:
            steps.append(RandomHorizontalFlip())
    else:
        size = data.val_image_size or data.image_size
        steps = [CenterCropRGBImageDecoder((size, size), ratio=data.crop_ratio)]
    steps.append(ToTensor())
    if device.type == "cuda":  # ffcv copies on its own CUDA stream, overlapping the decode
        steps.append(ToDevice(device, non_blocking=True))
    return steps + [ToTorchImage(channels_last=True, convert_back_int16=False)]


class FfcvLoader:
    def __init__(self, cfg, split: str, *, rank: int, world_size: int, device: torch.device):
        beton = beton_path(cfg, split)
        if not beton.is_file():
            raise UserInputError(f"{beton} does not exist: convert with tools/convert_ffcv.py "
                                 f"or leave data.ffcv.{split}_beton empty to convert {split_folder(cfg, split)}")
        self.classes = beton_classes(cfg, split, beton)
        self.train, self.batch_size, self.device = split == "train", cfg.batch_size, device
        self.cfg = cfg
        self.sampler = ShardSampler(Reader(str(beton)).num_samples, shuffle=self.train, seed=cfg.seed,
                                    rank=rank, world_size=world_size, batch_size=cfg.batch_size)
        pipeline = image_pipeline(cfg, split, device)
        self.decoder = pipeline[0]
        labels = [IntDecoder(), ToTensor(), Squeeze()] + ([ToDevice(device)] if device.type == "cuda" else [])
        self.loader = Loader(str(beton), batch_size=cfg.batch_size, num_workers=cfg.data.workers,
                             order=ShardOrder(self.sampler), os_cache=cfg.data.ffcv.os_cache, drop_last=self.train,
                             pipelines={"image": pipeline, "label": labels}, seed=cfg.seed)

    @property
    def num_samples(self) -> int:
        return len(self.sampler)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.sampler.set_epoch(epoch, start_batch)
        if self.train:  # ffcv sizes its buffers from the decoder each epoch: no recompilation
            size = train_resolution(self.cfg, epoch)
            self.decoder.output_size = (size, size)

    def __len__(self) -> int:
        return self.sampler.num_batches

    def __iter__(self):
        # A batch lives in ffcv's ring of buffers: valid until the next one is asked for (the
        # loop uses each batch before that; clone one to keep it longer).
        threads = torch.get_num_threads()
        batches = iter(self.loader)  # sets torch's threads to ffcv's workers, each epoch...
        torch.set_num_threads(threads)  # ...but the model computes on the run's
        for images, labels in batches:
            yield to_device_batch(images, labels.reshape(-1), self.device)


def make_loader(cfg, split, *, rank, world_size, device):
    return FfcvLoader(cfg, split, rank=rank, world_size=world_size, device=device)
