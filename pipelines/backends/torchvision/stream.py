"""Remote shards (`pipe:CMD`, http://, https://, ... : whatever webdataset opens), streamed, for
loader=torchvision. They cannot be read by index, so ShardSampler's sample order cannot hold;
whole shards are the unit instead, and this is what holds (tests/test_wds_stream.py):

  - disjoint: each epoch the shard list is permuted by (seed, epoch) (val: kept in order) and
    process r of W reads shards r, r+W, ... of it, whole; no two processes read the same sample.
  - val: every shard is read by one process, so every sample is counted exactly once.
  - train, equal steps: every process reads the same number of shards, S // W (the S mod W left
    over are a different few each epoch), and takes the same number of batches: those the smallest
    S // W shards fill (shard lengths from the info file, which streaming therefore needs). What a
    process reads beyond that is left out of the epoch and counted, never trained twice.
  - order: samples are shuffled in a buffer of SHUFFLE_BUFFER (webdataset's shuffle) seeded by
    (seed, epoch, rank, worker); with the same data.workers an epoch is the same stream, so a
    mid-epoch resume reads the consumed batches again and drops them (slower than by index; change
    data.workers on resume and the order changes).
  - bad input: a sample that does not decode or lacks cls, and a shard that cannot be opened or
    ends early, are skipped (the stream's next samples take their places), reported with the shard
    and key and listed in left_out. A train stream that runs out before its steps (whole shards
    lost) repeats its last batch for the missing ones, reported too, so the processes stay in step.
"""
from __future__ import annotations

import random

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipelines.backends.torchvision.workers import ignore_interrupts, image_transform, seeded_by_sample
from pipelines.batches import to_device_batch
from pipelines.sources.image_decode import decode_bytes
from pipelines.sources.shards.source import StreamSource
from pipelines.sources.shards.spec import IMAGE_EXTENSIONS, LABEL_EXTENSION, ShardSetError
from pipelines.substitution import LeftOut, Unreadable

SHUFFLE_BUFFER = 2_000  # samples; timm's WDS reader uses 8,192 (its initial fill 2,048)


class ShardStream(IterableDataset):
    """The samples of `urls` (set per epoch), split over DataLoader workers by shard: (uint8 tensor,
    label) or Unreadable, each worker's augmentation seeded by (seed, epoch, rank, worker, n)."""

    def __init__(self, transform, num_classes: int, *, train: bool, seed: int, rank: int):
        self.transform, self.num_classes, self.train, self.seed, self.rank = transform, num_classes, train, seed, rank
        self.urls, self.lengths, self.epoch = [], [], 0

    def __iter__(self):
        from webdataset.filters import _shuffle

        worker = get_worker_info()
        number, workers = (worker.id, worker.num_workers) if worker else (0, 1)
        stream_seed = hash((self.seed, self.epoch, self.rank, number)) & 0x7FFF_FFFF
        samples = self.samples(self.urls[number::workers], self.lengths[number::workers])
        if self.train:
            samples = _shuffle(samples, SHUFFLE_BUFFER, SHUFFLE_BUFFER // 4, random.Random(stream_seed))
        stream = (self.rank * 1024 + number) * 2**32  # the n-th sample of this worker: seeded by (seed, epoch, stream + n)
        for count, sample in enumerate(samples):
            yield sample if isinstance(sample, Unreadable) else self.decode(sample, stream + count)

    def samples(self, urls: list[str], lengths: list[int]):
        """Raw samples shard after shard; a shard's failure (open, truncation) as an Unreadable."""
        from webdataset.tariterators import tarfile_samples

        for url, length in zip(urls, lengths):
            errors, seen = [], 0
            for sample in tarfile_samples([{"url": url}], handler=lambda error: errors.append(error) or True):
                seen += 1
                yield sample
            if errors or seen != length:
                reason = f"{type(errors[0]).__name__}: {errors[0].args[0]}" if errors else "no error"
                yield Unreadable(f"shard {url}", f"read {seen} of its {length} samples ({reason})")

    def decode(self, sample: dict, position: int):
        where = f"shard {sample.get('__url__')} key {sample.get('__key__')}"
        image = next((sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample), None)
        try:
            if image is None or LABEL_EXTENSION not in sample:
                raise Unreadable(where, "no image file" if image is None else "no label file (cls)")
            label = int(sample[LABEL_EXTENSION].strip())
            if not 0 <= label < self.num_classes:
                raise Unreadable(where, f"cls {label} is not one of the {self.num_classes} classes")
            picture = decode_bytes(image)
        except Unreadable as bad:
            return bad
        except Exception as error:  # a label that is no integer, an image that does not decode
            return Unreadable(where, f"{type(error).__name__}: {error}")
        return seeded_by_sample(self.seed, self.epoch, position, lambda: self.transform(picture)), label


class StreamingLoader:
    """The loader contract over streamed shards (see the module doc)."""

    def __init__(self, cfg, split: str, source: StreamSource, *, rank: int, world_size: int, device: torch.device):
        shards, classes = source.shards, source.classes
        self.shards, self.classes = shards, classes
        self.train, self.rank, self.world_size, self.seed = split == "train", rank, world_size, cfg.seed
        self.batch_size, self.device = cfg.batch_size, device
        self.per_process = len(shards.urls) // world_size if self.train else -(-len(shards.urls) // world_size)
        if len(shards.urls) < world_size:
            raise ShardSetError(f"{shards.source}: {len(shards.urls)} shards for {world_size} processes: streaming "
                                f"gives each process whole shards, so it needs at least one per process")
        smallest = sorted(shards.lengths)[:self.per_process]
        self.steps = sum(smallest) // self.batch_size  # train: what every process's shards fill
        self.epoch, self.start_batch = 0, 0
        self.left_out = LeftOut([], stream_failure_line)  # (shard and key, reason) met while streaming
        self.dataset = ShardStream(image_transform(cfg, split), len(classes), train=self.train, seed=cfg.seed, rank=rank)
        self.loader = DataLoader(self.dataset, batch_size=None, num_workers=min(cfg.data.workers, self.per_process),
                                 worker_init_fn=ignore_interrupts, persistent_workers=False)

    def epoch_shards(self) -> list[int]:
        """This process's shard numbers this epoch."""
        order = list(range(len(self.shards.urls)))
        if self.train:
            order = torch.randperm(len(order), generator=torch.Generator().manual_seed(
                self.seed * 100_003 + self.epoch)).tolist()[:self.per_process * self.world_size]
        return order[self.rank::self.world_size]

    @property
    def num_samples(self) -> int:
        if self.train:
            return (self.steps - self.start_batch) * self.batch_size
        return sum(self.shards.lengths[i] for i in self.epoch_shards())

    def __len__(self) -> int:
        return self.steps - self.start_batch if self.train else -(-self.num_samples // self.batch_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def batches(self):
        """(images, labels) of batch_size readable samples as they stream; train stops after `steps`
        (the last repeated if the stream runs out first), val yields a last shorter batch."""
        mine = self.epoch_shards()
        self.dataset.urls = [self.shards.urls[i] for i in mine]
        self.dataset.lengths = [self.shards.lengths[i] for i in mine]
        self.dataset.epoch = self.epoch
        pending, made, last, samples = [], 0, None, iter(self.loader)
        for sample in samples:
            if isinstance(sample, Unreadable):
                self.report_failure(sample)
                continue
            pending.append(sample)
            if len(pending) == self.batch_size:
                last = collate(pending)
                yield last
                pending, made = [], made + 1
                if self.train and made == self.steps:
                    left = sum(not isinstance(s, Unreadable) for s in samples)  # to the end: counted
                    if left and self.rank == 0 and self.start_batch == 0:
                        print(f"streaming: {left} samples of process 0's shards left out this epoch to keep "
                              f"the processes in step")
                    return
        if pending and (not self.train or made < self.steps):
            last = collate(pending)
            yield last
            made += 1
        for _ in range(self.steps - made if self.train else 0):  # whole shards lost: keep the steps
            if last is None:
                raise ShardSetError(f"no sample of process {self.rank}'s shards could be read this epoch "
                                    f"({self.left_out[-1][0] if self.left_out else self.shards.source})")
            print(f"warning: the stream of process {self.rank} ran out before its {self.steps} steps: its last "
                  f"batch is used again", flush=True)
            yield last

    def report_failure(self, bad: Unreadable) -> None:
        self.left_out.failed_mid_run(bad.where, bad.reason, bad.unit)

    def __iter__(self):
        for position, (images, labels) in enumerate(self.batches()):
            if position >= self.start_batch:
                yield to_device_batch(images, labels, self.device)


def stream_failure_line(where: str, reason: str) -> str:
    return f"{where}: {reason}; the stream's next sample is used in its place"


def collate(samples: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([image for image, _ in samples]), torch.tensor([label for _, label in samples])
