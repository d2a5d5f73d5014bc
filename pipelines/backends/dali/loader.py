"""DALI backend: NVIDIA DALI decodes and augments; nvJPEG on the GPU ("mixed"), or a CPU pipeline.

    python train/run.py loader=dali data.dali.threads=4 data.dali.prefetch=2

On CUDA the JPEGs are decoded by nvJPEG (device="mixed") and resized/flipped on the GPU, so a box
with few CPU cores per GPU still feeds its GPUs; without CUDA the same graph runs on CPU threads
(device_id=None). Images come out HWC uint8 and are handed on as an NCHW *view*, which has
channels-last strides: no copy, no transpose.

One pipeline per loader, built on first use and kept for every later epoch: building one costs
nvJPEG state and ~350 MB of padded decoder buffers, which dominated short epochs when it was
rebuilt for each. The epoch's samples are ours, not DALI's shuffler's: an external source feeds
the pipeline this process's shard in the order of the shared ShardSampler, one batch at a time —
a folder's file paths, which DALI's threads read (fn.io.file.read), or the encoded images of tar
shards, read from their shards here. (Not fn.readers.webdataset: it shards and shuffles by its own
rule, contiguous ranges per shard_id and a shuffle buffer, which cannot give the one order every
backend shares, nor skip a resumed epoch's consumed batches without reading them.) So
  - the order is a function of (seed, epoch), shards are disjoint, equally long for train;
  - mid-epoch resume starts the list after the consumed batches instead of decoding them;
  - val counts every image once: the last batch is simply shorter (no padding to cut off).
An image that fails to decode mid-run (changed since the up-front check, or a kind DALI cannot
decode: 1-bit or 32-bit integer TIFF) stops DALI's pipeline; DALI reports errors in batch order, so
the failing batch is known, its images are decoded one by one to find the culprit, which is
reported, counted in left_out and replaced by pipelines/substitution.py's rule from then on, and
a new pipeline continues from that batch (its crops freshly drawn, as after a resume). A shard's
encoded image is checked before DALI sees it (signature and end marker: decodable_by_dali), so
most bad samples are replaced without stopping the pipeline.
AutoAugment/RandAugment (data.auto_augment) runs inside the train pipeline, on the GPU after
nvJPEG or on the CPU: pipelines/backends/dali/auto_augment.py.
Random crops, flips and AutoAugment draws come from the pipeline's generator, seeded by (seed, rank) and the position
the pipeline was built at: a run from scratch is reproducible; a resumed epoch sees the right images
in the right order, with freshly drawn crops (DALI's RNG cannot skip the consumed samples). An
epoch abandoned half-way (DALI cannot reset mid-epoch) makes the next pass build afresh.
"""
from __future__ import annotations

import io
import warnings

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
from PIL import Image

from common.errors import DataError
from pipelines.backends.dali.auto_augment import DaliAutoAugment
from pipelines.batches import to_device_batch
from pipelines.sampling import ShardSampler
from pipelines.sources.image_decode import decode_problem
from pipelines.sources.samples import SampleView
from pipelines.substitution import MAX_SUBSTITUTES, LeftOut, Unreadable, first_readable, substitute

# nvJPEG scratch buffers reserved up front so the first large images do not trigger reallocations
# (the values of DALI's own ResNet-50 example).
MIXED_DECODER_MEMORY = dict(device_memory_padding=211_025_920, host_memory_padding=140_544_512)
# What DALI's image decoders read (GIF, for one, is not among them).
DALI_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "PPM", "JPEG2000")


class EpochSamples:
    """The external source: batches of (encoded path or image, label) over the epoch's sample
    indices. DALI calls iter() on it at every pipeline reset and stops the epoch at StopIteration.
    It holds what it reads, not the loader: the loader holds the pipeline, which holds this; a
    cycle would leave a dead pipeline to the garbage collector of whichever process runs it next
    (a forked worker, whose copy of DALI's threads is gone: it would wait for them forever)."""

    def __init__(self, source, batch_size: int, left_out: LeftOut):
        self.source, self.batch_size, self.left_out = source, batch_size, left_out
        self.reads_files = source.kind == "folder"  # paths, read by DALI; else encoded images, read here
        self.indices, self.position = np.zeros(0, dtype=np.int64), 0

    def set(self, indices: np.ndarray) -> None:
        self.indices = indices

    def __iter__(self):
        self.position = 0
        return self

    def __next__(self):
        if self.position >= len(self.indices):
            raise StopIteration
        batch = self.indices[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        return self.encoded_batch(batch)

    def encoded_batch(self, batch: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """(encoded paths or images, labels) of a batch of sample indices."""
        if self.reads_files:
            return ([np.frombuffer(self.source.encoded_path(i), dtype=np.uint8) for i in batch.tolist()],
                    [np.array([label], dtype=np.int64) for label in self.source.labels[batch].tolist()])
        images, labels = [], []
        for index in batch.tolist():
            sample, failures = first_readable(index, len(self.source), self.read_checked)
            for where, reason, unit in failures:
                self.left_out.failed_mid_run(where, reason, unit)
            images.append(np.frombuffer(sample.image, dtype=np.uint8))
            labels.append(np.array([sample.label], dtype=np.int64))
        return images, labels

    def read_checked(self, index: int):
        """Sample index, unless its image will stop DALI's pipeline (as far as can be told cheaply)."""
        sample = self.source.read(index)
        problem = decodable_by_dali(sample.image)
        if problem:
            raise Unreadable(self.source.where(index), problem)
        return sample


# ---------------------------------------------------------------------------------------------
# Pipelines: one graph per split; `decode_device` is "mixed" on CUDA, "cpu" otherwise. Every op
# after the decoder runs where its input lives, so the GPU graph resizes and flips on the GPU.

def read_samples(source: EpochSamples, read_files: bool, gpu: bool):
    items, labels = fn.external_source(source=source, num_outputs=2, batch=True, cycle="raise",
                                       dtype=[types.UINT8, types.INT64])
    encoded = fn.io.file.read(items) if read_files else items
    return encoded, labels.gpu() if gpu else labels


@pipeline_def(enable_conditionals=True)  # AutoAugment draws operations per image with `if`
def train_pipeline(source, *, size, min_scale, hflip, auto_augment, decode_device, read_files):
    encoded, labels = read_samples(source, read_files, gpu=decode_device == "mixed")
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
def val_pipeline(source, *, size, resize_to, decode_device, read_files):
    encoded, labels = read_samples(source, read_files, gpu=decode_device == "mixed")
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
    def __init__(self, cfg, split: str, source, *, rank: int, world_size: int, device: torch.device):
        self.source, self.classes = source, source.classes
        self.reads_files = source.kind == "folder"  # paths, read by DALI; else encoded images, read here
        self.left_out = LeftOut(source.left_out, source.failure_line)  # + those that fail mid-run, as they do
        self.failed: set[int] = set()  # indices that failed mid-run: substitutes stand in for them
        self.cfg, self.train, self.device, self.rank = cfg, split == "train", device, rank
        self.batch_size = cfg.batch_size
        self.sampler = ShardSampler(len(source), shuffle=self.train, seed=cfg.seed, rank=rank,
                                    world_size=world_size, batch_size=self.batch_size, repeats=cfg.data.repeated_aug)
        self.external, self.iterator = None, None  # built on first use, then kept
        self.pipelines_built = 0
        self.at_epoch_end = False  # the iterator finished its last epoch: it can be reset for the next

    @property
    def files(self) -> SampleView:
        """What the source names each sample (a folder's paths)."""
        return SampleView(len(self.source), self.source.where)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.sampler.set_epoch(epoch, start_batch)

    @property
    def num_samples(self) -> int:
        return len(self.sampler)

    def __len__(self) -> int:
        return self.sampler.num_batches

    def __iter__(self):
        indices = self.sampler.index_array()
        done = 0  # batches of this epoch yielded
        while done * self.batch_size < len(indices):  # more than once only after a failed image
            rest = self.stand_ins(indices[done * self.batch_size:])
            batches = iter(self.iterator_for_new_epoch(rest, start_batch=self.sampler.start_batch + done))
            self.at_epoch_end, here = False, 0
            while True:
                try:
                    (batch,) = next(batches)
                except StopIteration:
                    self.at_epoch_end = True
                    return
                except RuntimeError as error:  # DALI's pipeline is dead: find the image, then go on anew
                    self.iterator = None
                    self.replace_failed(error, rest[here * self.batch_size:(here + 1) * self.batch_size].tolist())
                    break
                images = batch["images"].permute(0, 3, 1, 2)  # NHWC → NCHW view with channels-last strides
                done, here = done + 1, here + 1
                yield to_device_batch(images, batch["labels"].squeeze(1), self.device)

    def stand_ins(self, indices: np.ndarray) -> np.ndarray:
        """indices, each that failed mid-run replaced by its substitute."""
        if not self.failed:
            return indices
        indices = indices.copy()
        failed = np.isin(indices, list(self.failed))
        indices[failed] = [substitute(i, len(self.source), self.failed) for i in indices[failed].tolist()]
        return indices

    def replace_failed(self, error: RuntimeError, batch: list[int]) -> None:
        """Find which of the failed batch's images DALI cannot decode; report them, replace them."""
        message = str(error)
        if "fn.decoders" not in message and "fn.io.file.read" not in message:
            raise error  # not about an image (out of memory...): not ours to hide
        reasons = {index: reason for index in batch if (reason := self.probe(index))}
        if not reasons or len(reasons) > MAX_SUBSTITUTES:
            what = "none of them fails alone" if not reasons else f"{len(reasons)} fail: has the data changed?"
            raise DataError(f"DALI failed on a batch of {len(batch)} images from {self.source.where(batch[0])} "
                            f"({dali_reason(message)}); {what}") from None
        for index, reason in reasons.items():
            self.failed.add(index)
            self.left_out.failed_mid_run(self.source.where(index), reason)

    def probe(self, index: int) -> str:
        """'' if DALI decodes sample index alone, else why not (a folder's file: in the words of the
        PIL check, which the user met up front, where it has them)."""
        try:
            encoded = self.source.read(index).image
        except Unreadable as bad:
            return bad.reason
        reason = dali_decode_problem(encoded)
        if reason and self.reads_files:
            return decode_problem(self.source.path(index))[0] or f"DALI cannot decode it ({reason})"
        return reason and f"DALI cannot decode it ({reason})"

    def iterator_for_new_epoch(self, indices: np.ndarray, start_batch: int) -> DALIGenericIterator:
        """The kept iterator, reset once its source holds the new list (a reset makes DALI prefetch
        from the source at once), or a new one on first use or after an abandoned epoch."""
        if self.iterator is not None and self.at_epoch_end:
            self.external.set(indices)
            self.iterator.reset()
            return self.iterator
        self.iterator = None  # free an abandoned pipeline's threads and buffers before building anew
        self.external = EpochSamples(self.source, self.batch_size, self.left_out)  # its own: nothing of the old pipeline reads it
        self.external.set(indices)
        policy = LastBatchPolicy.DROP if self.train else LastBatchPolicy.PARTIAL
        self.iterator = DALIGenericIterator(self.build_pipeline(start_batch), ["images", "labels"],
                                            last_batch_policy=policy,
                                            auto_reset=False, prepare_first_batch=False)
        return self.iterator

    def build_pipeline(self, start_batch: int):
        cfg, data = self.cfg, self.cfg.data
        cuda = self.device.type == "cuda"
        common = dict(batch_size=self.batch_size, num_threads=data.dali.threads,
                      prefetch_queue_depth=data.dali.prefetch,
                      device_id=cuda_index(self.device) if cuda else None,  # None: a CPU-only pipeline
                      seed=pipeline_seed(cfg.seed, self.rank, self.sampler.epoch, start_batch),
                      decode_device="mixed" if cuda else "cpu", read_files=self.reads_files)
        if self.train:
            policy = DaliAutoAugment(data.auto_augment, data.image_size) if data.auto_augment else None
            pipe = train_pipeline(self.external, size=data.image_size, min_scale=data.min_scale, hflip=data.hflip,
                                  auto_augment=policy, **common)
        else:
            size = data.val_image_size or data.image_size
            pipe = val_pipeline(self.external, size=size, resize_to=round(size / data.crop_ratio), **common)
        pipe.build()
        self.pipelines_built += 1
        return pipe


# ---------------------------------------------------------------------------------------------
# One image alone, to find which of a failed batch's images DALI cannot decode

@pipeline_def(batch_size=1, num_threads=1, device_id=None, prefetch_queue_depth=1)
def probe_pipeline(encoded: np.ndarray):
    return fn.decoders.image(fn.external_source(source=lambda: [encoded], batch=True, dtype=types.UINT8),
                             device="cpu", output_type=types.RGB)


def dali_decode_problem(encoded: bytes) -> str:
    """'' if DALI's CPU decoder decodes the image, else its reason (~25 ms: a pipeline each)."""
    try:
        pipe = probe_pipeline(np.frombuffer(encoded, dtype=np.uint8))
        pipe.build()
        pipe.run()
    except RuntimeError as error:
        return dali_reason(str(error))
    return ""


def dali_reason(message: str) -> str:
    """The line of a DALI pipeline error that says what went wrong (after "encountered:")."""
    lines = [line.strip() for line in message.split("encountered:", 1)[-1].splitlines()]
    return next((line for line in lines if line and not line.startswith("Current pipeline")), "unknown error")


def decodable_by_dali(data: bytes) -> str:
    """'' when the bytes look like a whole image DALI can decode, else the reason. Cheap (signature and
    end marker, no decoding; PIL's header parse for formats other than JPEG, PNG and WebP): DALI stops
    the pipeline on an image it cannot decode, so what can be caught before it is caught here."""
    if data[:3] == b"\xff\xd8\xff":
        return "" if b"\xff\xd9" in data[-64:] else "truncated JPEG (no end-of-image marker)"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "" if b"IEND" in data[-16:] else "truncated PNG (no IEND chunk)"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "" if int.from_bytes(data[4:8], "little") + 8 <= len(data) else "truncated WebP"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as image:
                kind = image.format
    except Exception as error:  # PIL raises many types for bad bytes
        return f"not an image ({type(error).__name__}: {error})"
    return "" if kind in DALI_FORMATS else f"{kind} images are not decoded by DALI"


def cuda_index(device: torch.device) -> int:
    """This process's CUDA device (Accelerate gives cuda:<local rank>; bare "cuda" is the current one)."""
    return device.index if device.index is not None else torch.cuda.current_device()


def make_loader(cfg, split, source, *, rank, world_size, device):
    return DaliLoader(cfg, split, source, rank=rank, world_size=world_size, device=device)
