"""FFCV backend (`loader=ffcv`): .beton files decoded by ffcv's JIT pipeline on CPU threads.

prepare(cfg) converts data.root's train/ and val/ folders to <root>/ffcv/{train,val}.beton once,
and again when the storage settings or the folder's contents change (its fingerprint: every
file's path, size and mtime); data.ffcv.train_beton/val_beton point at betons made with
tools/convert_ffcv.py instead, used as they are, with a warning when their source folder has
changed since. The images the converter left out are named at every start and counted in the
run's report (loader.left_out).

Per batch: decode + random-resized-crop (train) or center-crop at the 224/256 ratio (val), flip,
→ uint8 NHWC tensor → device → NCHW view with channels-last strides. Normalisation stays on the
device (in the model): an ffcv pipeline going JIT op → torch op → JIT op hangs the Loader constructor.

Sample order is ours, not ffcv's: the shards of every backend (pipelines/loading.py's ShardSampler),
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

from common.errors import UserInputError
from pipelines.writers.beton import StorageSettings, convert_imagefolder, read_metadata
from pipelines.sources.folder.listing import check_no_empty_class, list_image_folder
from pipelines.loading import ShardSampler, find_classes, split_folder, to_device_batch

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
    """Made by our writer from this folder, as it is now, with these settings, and complete."""
    return not staleness(beton, source, settings)


def staleness(beton: Path, source: Path, settings: StorageSettings) -> str:
    """'' when the .beton is current (see is_current), else why it is not."""
    meta = read_metadata(beton)
    if not beton.is_file() or meta is None:
        return "none yet"
    if meta.get("bytes") != beton.stat().st_size:
        return "the .beton is incomplete"
    if meta.get("source") != str(source.resolve()) or meta.get("limit") != 0:
        subset = f" (--limit {meta.get('limit')})" if meta.get("limit") else ""
        return f"it was made from {meta.get('source')}{subset}"
    if meta.get("settings") != asdict(settings):
        return "the storage settings changed"
    return folder_change(meta, source)


def folder_change(meta: dict, source: Path) -> str:
    """'' if source holds what it held when the .beton was made, else what changed."""
    listing = list_image_folder(source)
    if meta.get("fingerprint") == listing.fingerprint():
        return ""
    then, now = meta.get("found", 0) - meta.get("duplicates", 0), len(listing.files) + len(listing.unreadable)
    return f"{source} changed since it was converted ({then} files then, {now} now)"


def prepare(cfg) -> None:
    """Converts each split's folder to its default .beton unless an up-to-date one exists."""
    settings = storage_settings(cfg)
    for split in ("train", "val"):
        beton, source = beton_path(cfg, split), split_folder(cfg, split)
        if cfg.data.ffcv.train_beton if split == "train" else cfg.data.ffcv.val_beton:
            if beton.is_file():
                warn_if_source_changed(beton, split)
                continue
        why = staleness(beton, source, settings)
        if not why:
            continue
        print(f"converting {source} → {beton} ({why}; FFCV reads the .beton)")
        convert_imagefolder(source, beton, settings, workers=cfg.data.workers)  # what it left out: beton_left_out


def warn_if_source_changed(beton: Path, split: str) -> None:
    """A given .beton whose source folder (known from its metadata, if it still exists) changed."""
    meta = read_metadata(beton)
    source = Path(meta["source"]) if meta and meta.get("source") else None
    if source is None or not source.is_dir() or "fingerprint" not in meta:
        return
    change = folder_change(meta, source)
    if change:
        print(f"warning: data.ffcv.{split}_beton={beton}: {change}; it is used as it is (reconvert with "
              f"tools/convert_ffcv.py --overwrite to train on the folder as it is now)", flush=True)


def beton_classes(cfg, split: str, beton: Path) -> list[str]:
    meta = read_metadata(beton)
    if meta is None:
        return find_classes(split_folder(cfg, split))  # a .beton from elsewhere: trust the folder
    empty = set(meta.get("empty_classes", ()))  # converted before empty class folders were refused
    check_no_empty_class(meta["source"], meta["classes"], {i for i, name in enumerate(meta["classes"])
                                                           if name not in empty})
    return meta["classes"]


def beton_left_out(beton: Path, rank: int) -> list[tuple[str, str]]:
    """The images of the source the converter left out (its metadata's list), said once (rank 0)."""
    meta = read_metadata(beton) or {}
    left_out = [tuple(entry) for entry in meta.get("left_out", ())]
    if (left_out or meta.get("non_images")) and rank == 0:
        examples = "".join(f"; {path}: {reason}" for path, reason in left_out[:2]) + "; …" * (len(left_out) > 2)
        print(f"warning: {beton}: {len(left_out)} images of {meta['source']} are not in it, nor "
              f"{meta.get('non_images', 0)} files without an image extension{examples} (all listed in "
              f"{beton}.skipped.txt)", flush=True)
    return left_out


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
        self.left_out = beton_left_out(beton, rank)
        self.train, self.batch_size, self.device = split == "train", cfg.batch_size, device
        self.cfg = cfg
        self.sampler = ShardSampler(Reader(str(beton)).num_samples, shuffle=self.train, seed=cfg.seed,
                                    rank=rank, world_size=world_size, batch_size=cfg.batch_size,
                                    repeats=cfg.data.repeated_aug)
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
