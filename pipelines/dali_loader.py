"""DALI backend: NVIDIA DALI decodes and augments; nvJPEG on the GPU ("mixed"), or a CPU pipeline.

    python train/run.py loader=dali data.dali.threads=4 data.dali.prefetch=2

On CUDA the JPEGs are decoded by nvJPEG (device="mixed") and resized/flipped on the GPU, so a box
with few CPU cores per GPU still feeds its GPUs; without CUDA the same graph runs on CPU threads
(device_id=None). Images come out HWC uint8 and are handed on as an NCHW *view*, which has
channels-last strides: no copy, no transpose.

One pipeline per loader, built on first use and kept for every later epoch: building one costs
nvJPEG state and ~350 MB of padded decoder buffers, which dominated short epochs when it was
rebuilt for each. The epoch's file list is ours, not DALI's shuffler's: an external source feeds
the pipeline this process's shard in the order of the shared ShardSampler, one batch of paths at a
time, and DALI's threads read and decode them. So
  - the order is a function of (seed, epoch), shards are disjoint, equally long for train;
  - mid-epoch resume starts the list after the consumed batches instead of decoding them;
  - val counts every image once: the last batch is simply shorter (no padding to cut off).
AutoAugment/RandAugment (data.auto_augment) runs inside the train pipeline, on the GPU after
nvJPEG or on the CPU: pipelines/dali_auto_augment.py.
Random crops, flips and AutoAugment draws come from the pipeline's generator, seeded by (seed, rank) and the position
the pipeline was built at: a run from scratch is reproducible; a resumed epoch sees the right images
in the right order, with freshly drawn crops (DALI's RNG cannot skip the consumed samples). An
epoch abandoned half-way (DALI cannot reset mid-epoch) makes the next pass build afresh.
"""
from __future__ import annotations

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from pipelines.dali_auto_augment import DaliAutoAugment
from pipelines.image_folder import list_image_folder
from pipelines.loader import ShardSampler, report_skipped, split_folder, to_device_batch

# nvJPEG scratch buffers reserved up front so the first large images do not trigger reallocations
# (the values of DALI's own ResNet-50 example).
MIXED_DECODER_MEMORY = dict(device_memory_padding=211_025_920, host_memory_padding=140_544_512)


class EpochFiles:
    """The external source: batches of (encoded path, label) over the list of the current epoch.
    DALI calls iter() on it at every pipeline reset and stops the epoch at StopIteration."""

    yields_bytes = False  # paths, read by DALI; a subclass may give encoded images (pipelines/wds_dali.py)

    def __init__(self, batch_size: int):
        self.batch_size, self.paths, self.labels, self.position = batch_size, [], [], 0

    def set(self, paths: list[str], labels: list[int]) -> None:
        self.paths = [np.frombuffer(path.encode(), dtype=np.uint8) for path in paths]
        self.labels = [np.array([label], dtype=np.int64) for label in labels]

    def __iter__(self):
        self.position = 0
        return self

    def __next__(self):
        if self.position >= len(self.paths):
            raise StopIteration
        batch = slice(self.position, self.position + self.batch_size)
        self.position += self.batch_size
        return self.paths[batch], self.labels[batch]


# ---------------------------------------------------------------------------------------------
# Pipelines: one graph per split; `decode_device` is "mixed" on CUDA, "cpu" otherwise. Every op
# after the decoder runs where its input lives, so the GPU graph resizes and flips on the GPU.

def read_files(source: EpochFiles, gpu: bool):
    paths, labels = fn.external_source(source=source, num_outputs=2, batch=True, cycle="raise",
                                       dtype=[types.UINT8, types.INT64])
    encoded = paths if source.yields_bytes else fn.io.file.read(paths)
    return encoded, labels.gpu() if gpu else labels


@pipeline_def(enable_conditionals=True)  # AutoAugment draws operations per image with `if`
def train_pipeline(source, *, size, min_scale, hflip, auto_augment, decode_device):
    encoded, labels = read_files(source, gpu=decode_device == "mixed")
    extra = MIXED_DECODER_MEMORY if decode_device == "mixed" else {}
    # Decodes only the random crop window (torchvision's RandomResizedCrop rule: area, aspect 3/4–4/3).
    images = fn.decoders.image_random_crop(encoded, device=decode_device, output_type=types.RGB,
                                           random_area=[min_scale, 1.0], random_aspect_ratio=[3 / 4, 4 / 3],
                                           num_attempts=10, **extra)
    images = fn.resize(images, resize_x=size, resize_y=size, interp_type=types.INTERP_LINEAR, antialias=True)
    if hflip:
        images = fn.flip(images, horizontal=fn.random.coin_flip(probability=0.5))
    if auto_augment is not None:  # after crop and flip, as timm's transforms order them
        images = auto_augment(images)
    return images, labels


@pipeline_def
def val_pipeline(source, *, size, resize_to, decode_device):
    encoded, labels = read_files(source, gpu=decode_device == "mixed")
    extra = MIXED_DECODER_MEMORY if decode_device == "mixed" else {}
    images = fn.decoders.image(encoded, device=decode_device, output_type=types.RGB, **extra)
    images = fn.resize(images, resize_shorter=resize_to, interp_type=types.INTERP_LINEAR, antialias=True)
    images = fn.crop(images, crop=(size, size))  # centred by default
    return images, labels


# ---------------------------------------------------------------------------------------------
# The loader

def pipeline_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([abs(p) for p in parts]).generate_state(1)[0] >> 1)  # fits int32


class DaliLoader:
    def __init__(self, cfg, split: str, *, rank: int, world_size: int, device: torch.device):
        self.classes, self.files, self.labels = self.list_samples(cfg, split, rank)
        self.cfg, self.train, self.device, self.rank = cfg, split == "train", device, rank
        self.batch_size = cfg.batch_size
        self.sampler = ShardSampler(len(self.files), shuffle=self.train, seed=cfg.seed, rank=rank,
                                    world_size=world_size, batch_size=self.batch_size)
        self.source, self.iterator = None, None  # built on first use, then kept
        self.pipelines_built = 0
        self.at_epoch_end = False  # the iterator finished its last epoch: it can be reset for the next

    def list_samples(self, cfg, split: str, rank: int) -> tuple[list[str], list, list]:
        """(classes, files, labels) of the split: what the external source is given, by index."""
        listing = list_image_folder(split_folder(cfg, split))
        report_skipped(listing, rank)
        samples = listing.images()
        return listing.classes, [path for path, _ in samples], [label for _, label in samples]

    def new_source(self) -> EpochFiles:
        return EpochFiles(self.batch_size)

    def epoch_indices(self) -> list[int]:
        return self.sampler.indices()

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.sampler.set_epoch(epoch, start_batch)

    @property
    def num_samples(self) -> int:
        return len(self.sampler)

    def __len__(self) -> int:
        return self.sampler.num_batches

    def __iter__(self):
        indices = self.epoch_indices()
        if not indices:  # a shard smaller than one batch (train) or than one image (val)
            return
        iterator = self.iterator_for_new_epoch([self.files[i] for i in indices], [self.labels[i] for i in indices])
        self.at_epoch_end = False
        for (batch,) in iterator:
            images = batch["images"].permute(0, 3, 1, 2)  # NHWC → NCHW view with channels-last strides
            yield to_device_batch(images, batch["labels"].squeeze(1), self.device)
        self.at_epoch_end = True

    def iterator_for_new_epoch(self, paths: list[str], labels: list[int]) -> DALIGenericIterator:
        """The kept iterator, reset once its source holds the new list (a reset makes DALI prefetch
        from the source at once), or a new one on first use or after an abandoned epoch."""
        if self.iterator is not None and self.at_epoch_end:
            self.source.set(paths, labels)
            self.iterator.reset()
            return self.iterator
        self.iterator = None  # free an abandoned pipeline's threads and buffers before building anew
        self.source = self.new_source()  # its own: nothing of the old pipeline reads it
        self.source.set(paths, labels)
        policy = LastBatchPolicy.DROP if self.train else LastBatchPolicy.PARTIAL
        self.iterator = DALIGenericIterator(self.build_pipeline(), ["images", "labels"], last_batch_policy=policy,
                                            auto_reset=False, prepare_first_batch=False)
        return self.iterator

    def build_pipeline(self):
        cfg, data = self.cfg, self.cfg.data
        cuda = self.device.type == "cuda"
        common = dict(batch_size=self.batch_size, num_threads=data.dali.threads,
                      prefetch_queue_depth=data.dali.prefetch,
                      device_id=cuda_index(self.device) if cuda else None,  # None: a CPU-only pipeline
                      seed=pipeline_seed(cfg.seed, self.rank, self.sampler.epoch, self.sampler.start_batch),
                      decode_device="mixed" if cuda else "cpu")
        if self.train:
            policy = DaliAutoAugment(data.auto_augment, data.image_size) if data.auto_augment else None
            pipe = train_pipeline(self.source, size=data.image_size, min_scale=data.min_scale, hflip=data.hflip,
                                  auto_augment=policy, **common)
        else:
            size = data.val_image_size or data.image_size
            pipe = val_pipeline(self.source, size=size, resize_to=round(size / data.crop_ratio), **common)
        pipe.build()
        self.pipelines_built += 1
        return pipe


def cuda_index(device: torch.device) -> int:
    """This process's CUDA device (Accelerate gives cuda:<local rank>; bare "cuda" is the current one)."""
    return device.index if device.index is not None else torch.cuda.current_device()


def make_loader(cfg, split, *, rank, world_size, device):
    return DaliLoader(cfg, split, rank=rank, world_size=world_size, device=device)
