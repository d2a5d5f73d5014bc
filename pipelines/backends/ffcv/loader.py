"""FFCV backend (`loader=ffcv`): .beton files decoded by ffcv's JIT pipeline on CPU threads.

prepare(cfg) makes the .beton files from the source, once (betons.py). The loader reads only them:
the classes come from the .beton's metadata (not from the source folder), and the images the
converter left out are named at every start and counted in the run's report (loader.left_out).

Per batch: decode + random-resized-crop (train) or center-crop at the 224/256 ratio (val), flip,
→ uint8 NHWC tensor → device → NCHW view with channels-last strides. Normalisation stays on the
device (in the model): an ffcv pipeline going JIT op → torch op → JIT op hangs the Loader constructor.

Sample order is ours, not ffcv's: the shards of every backend (pipelines/sampling.py's ShardSampler),
so each process reads its own shard, train order is a function of (seed, epoch), train drops the
incomplete batch, val yields every image exactly once over processes, and a mid-epoch resume skips
the consumed batches without decoding them.
"""
from __future__ import annotations

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
from pipelines.backends.ffcv.betons import beton_path, prepare  # noqa: F401 (prepare: this backend's, see its record)
from pipelines.batches import to_device_batch
from pipelines.sampling import ShardSampler
from pipelines.sources.folder.listing import check_no_empty_class
from pipelines.writers.beton import read_metadata

# ---------------------------------------------------------------------------------------------
# What the .beton holds

def beton_classes(beton: Path, meta: dict | None) -> list[str]:
    """The classes the converter wrote into the metadata; for a .beton from elsewhere, as many as
    its labels count, named by their numbers."""
    if meta is None:
        reader = Reader(str(beton))
        labels = reader.metadata[f"f{reader.field_names.index('label')}"]
        return [str(i) for i in range(int(labels.max()) + 1)]
    empty = set(meta.get("empty_classes", ()))  # converted before empty class folders were refused
    check_no_empty_class(meta["source"], meta["classes"], {i for i, name in enumerate(meta["classes"])
                                                           if name not in empty})
    return meta["classes"]


def beton_left_out(beton: Path, meta: dict | None, rank: int) -> list[tuple[str, str]]:
    """The images of the source the converter left out (its metadata's list), said once (rank 0)."""
    meta = meta or {}
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
        return self.shard.index_array().astype(np.uint64)


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
            raise UserInputError(f"{beton} does not exist: convert with tools/convert_ffcv.py or leave "
                                 f"data.ffcv.{split}_beton empty to convert the {split} split of {cfg.data.root}")
        meta = read_metadata(beton)
        self.classes = beton_classes(beton, meta)
        self.left_out = beton_left_out(beton, meta, rank)
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


def make_loader(cfg, split, source, *, rank, world_size, device):
    """The backend's loader (its record: reads_sources=False, so source is None: it reads the .beton)."""
    return FfcvLoader(cfg, split, rank=rank, world_size=world_size, device=device)
