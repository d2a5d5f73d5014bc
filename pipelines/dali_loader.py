"""DALI backend: NVIDIA DALI decodes and augments; nvJPEG on the GPU ("mixed"), or a CPU pipeline.

    python train/run.py loader=dali data.dali.threads=4 data.dali.prefetch=2

On CUDA the JPEGs are decoded by nvJPEG (device="mixed") and resized/flipped on the GPU, so a box
with few CPU cores per GPU still feeds its GPUs; without CUDA the same graph runs on CPU threads
(device_id=None). Images come out HWC uint8 and are handed on as an NCHW *view*, which has
channels-last strides: no copy, no transpose.

The epoch's file list is built here, not by DALI's shuffler: the reader gets `files=`/`labels=` for
exactly this process's shard, in the order of ShardSampler (the torchvision backend's rule), so
  - the order is a function of (seed, epoch), shards are disjoint, equally long for train;
  - mid-epoch resume drops the consumed files from the list instead of decoding them;
  - val counts every image once (LastBatchPolicy.PARTIAL: DALI pads the last batch by repeating
    an image, the iterator cuts the padding off; its default, FILL, would count duplicates).
The train pipeline is rebuilt for each pass (~0.1 s on CPU) and seeded by (seed, epoch, rank,
start_batch): a pass over the same epoch gives the same crops; a resumed epoch sees the right images
in the right order, with freshly drawn crops (DALI's RNG cannot skip the consumed samples).
"""
from __future__ import annotations

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from pipelines.image_folder import list_image_folder
from pipelines.loader import report_skipped, split_folder, to_device_batch
from pipelines.torchvision_loader import ShardSampler

READER = "reader"  # the name the iterator uses to ask the reader for the epoch size
# nvJPEG scratch buffers reserved up front so the first large images do not trigger reallocations
# (the values of DALI's own ResNet-50 example).
MIXED_DECODER_MEMORY = dict(device_memory_padding=211_025_920, host_memory_padding=140_544_512)


# ---------------------------------------------------------------------------------------------
# Pipelines: one graph per split; `decode_device` is "mixed" on CUDA, "cpu" otherwise. Every op
# after the decoder runs where its input lives, so the GPU graph resizes and flips on the GPU.

def read_files(files, labels, gpu: bool):
    encoded, labels = fn.readers.file(files=files, labels=labels, name=READER, random_shuffle=False,
                                      pad_last_batch=True)  # pad by repeating: each epoch starts clean
    return encoded, labels.gpu() if gpu else labels


@pipeline_def
def train_pipeline(files, labels, *, size, min_scale, hflip, decode_device):
    encoded, labels = read_files(files, labels, gpu=decode_device == "mixed")
    extra = MIXED_DECODER_MEMORY if decode_device == "mixed" else {}
    # Decodes only the random crop window (torchvision's RandomResizedCrop rule: area, aspect 3/4–4/3).
    images = fn.decoders.image_random_crop(encoded, device=decode_device, output_type=types.RGB,
                                           random_area=[min_scale, 1.0], random_aspect_ratio=[3 / 4, 4 / 3],
                                           num_attempts=10, **extra)
    images = fn.resize(images, resize_x=size, resize_y=size, interp_type=types.INTERP_LINEAR, antialias=True)
    if hflip:
        images = fn.flip(images, horizontal=fn.random.coin_flip(probability=0.5))
    return images, labels


@pipeline_def
def val_pipeline(files, labels, *, size, resize_to, decode_device):
    encoded, labels = read_files(files, labels, gpu=decode_device == "mixed")
    extra = MIXED_DECODER_MEMORY if decode_device == "mixed" else {}
    images = fn.decoders.image(encoded, device=decode_device, output_type=types.RGB, **extra)
    images = fn.resize(images, resize_shorter=resize_to, interp_type=types.INTERP_LINEAR, antialias=True)
    images = fn.crop(images, crop=(size, size))  # centred by default
    return images, labels


# ---------------------------------------------------------------------------------------------
# The loader

def image_files(listing) -> tuple[list[str], list[int]]:
    """(paths, labels) exactly as the torchvision backend lists them (same files, same order)."""
    samples = listing.images()
    return [path for path, _ in samples], [label for _, label in samples]


def pipeline_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([abs(p) for p in parts]).generate_state(1)[0] >> 1)  # fits int32


class DaliLoader:
    def __init__(self, cfg, split: str, *, rank: int, world_size: int, device: torch.device):
        listing = list_image_folder(split_folder(cfg, split))
        report_skipped(listing, rank)
        self.classes = listing.classes
        self.files, self.labels = image_files(listing)
        self.cfg, self.train, self.device, self.rank = cfg, split == "train", device, rank
        self.batch_size = cfg.batch_size
        self.sampler = ShardSampler(len(self.files), shuffle=self.train, seed=cfg.seed,
                                    rank=rank, world_size=world_size)
        self.start_batch = 0
        self.iterator, self.iterator_list, self.iterator_clean = None, None, False

    # -- the epoch's list: everything else follows from it ---------------------------------------
    def epoch_indices(self) -> list[int]:
        indices = self.sampler.indices()
        if self.train:  # drop the incomplete last batch: every process takes the same number of steps
            indices = indices[: len(indices) - len(indices) % self.batch_size]
        return indices[self.start_batch * self.batch_size:]

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.sampler.epoch, self.start_batch = epoch, start_batch

    @property
    def num_samples(self) -> int:
        return len(self.epoch_indices())

    def __len__(self) -> int:
        return -(-self.num_samples // self.batch_size)

    # -- iteration -------------------------------------------------------------------------------
    def __iter__(self):
        indices = self.epoch_indices()
        if not indices:  # a shard smaller than one batch (train) or than one image (val)
            return
        iterator = self.iterator_for(indices)
        self.iterator_clean = False
        for (batch,) in iterator:
            images = batch["images"].permute(0, 3, 1, 2)  # NHWC → NCHW view with channels-last strides
            yield to_device_batch(images, batch["labels"].squeeze(1), self.device)
        iterator.reset()
        self.iterator_clean = True  # finished and reset: the same list can run again (val, each epoch)

    def iterator_for(self, indices: list[int]) -> DALIGenericIterator:
        """A DALI iterator over these files. Val reuses its finished one (same list, no randomness);
        train builds afresh so its augmentation restarts from the (seed, epoch, ...) seed."""
        reusable = not self.train and self.iterator_clean and indices == self.iterator_list
        if self.iterator is not None and reusable:
            return self.iterator
        self.iterator = None  # free the old pipeline's threads and buffers before building anew
        pipe = self.build_pipeline([self.files[i] for i in indices], [self.labels[i] for i in indices])
        policy = LastBatchPolicy.DROP if self.train else LastBatchPolicy.PARTIAL
        self.iterator = DALIGenericIterator(pipe, ["images", "labels"], reader_name=READER,
                                            last_batch_policy=policy, auto_reset=False)
        self.iterator_list = indices
        return self.iterator

    def build_pipeline(self, files: list[str], labels: list[int]):
        cfg, data = self.cfg, self.cfg.data
        cuda = self.device.type == "cuda"
        common = dict(batch_size=self.batch_size, num_threads=data.dali.threads,
                      prefetch_queue_depth=data.dali.prefetch,
                      device_id=cuda_index(self.device) if cuda else None,  # None: a CPU-only pipeline
                      seed=pipeline_seed(cfg.seed, self.sampler.epoch, self.rank, self.start_batch),
                      decode_device="mixed" if cuda else "cpu")
        if self.train:
            pipe = train_pipeline(files, labels, size=data.image_size, min_scale=data.min_scale,
                                  hflip=data.hflip, **common)
        else:
            size = data.val_image_size or data.image_size
            pipe = val_pipeline(files, labels, size=size, resize_to=round(size / data.crop_ratio), **common)
        pipe.build()
        return pipe


def cuda_index(device: torch.device) -> int:
    """This process's CUDA device (Accelerate gives cuda:<local rank>; bare "cuda" is the current one)."""
    return device.index if device.index is not None else torch.cuda.current_device()


def make_loader(cfg, split, *, rank, world_size, device):
    return DaliLoader(cfg, split, rank=rank, world_size=world_size, device=device)
