"""loader=dali on local tar shards: the DALI loader (its pipelines, nvJPEG or CPU decoding,
AutoAugment, kept iterators, ShardSampler's order) fed encoded images instead of file paths.

The external source reads each batch's samples from their shards (pipelines/sources/shards/read.py) in
ShardSampler's order and hands DALI the bytes, where the folder's source hands it paths for
fn.io.file.read. Why not fn.readers.webdataset: it shards and shuffles by its own rule (contiguous
ranges per shard_id, a shuffle buffer), which cannot give the one order every backend shares, nor
skip a resumed epoch's consumed batches without reading them.

DALI stops a pipeline on an image it cannot decode, so every image is checked first (signature and
end marker, no decoding: wds_read.decodable_by_dali); a bad one is replaced by the next sample that
reads (wds_read.read_or_substitute), reported and listed in left_out. One that passes the check and
still fails is found by the DALI loader's own recovery (its probe here decodes the sample's bytes).
"""
from __future__ import annotations

import numpy as np
import torch

from nvidia.dali import fn, pipeline_def, types

from pipelines.backends.dali.loader import DaliLoader, EpochFiles, dali_reason
from pipelines.sources.shards.read import ShardReader, UnreadableSample, decodable_by_dali, read_or_substitute


class EpochShardSamples(EpochFiles):
    """The external source: batches of (encoded image, label) of this epoch's sample indices."""

    yields_bytes = True

    def __init__(self, loader: "ShardDaliLoader"):
        super().__init__(loader.batch_size)
        self.loader, self.indices = loader, []

    def set(self, indices: list[int], labels: list) -> None:  # labels come with the images
        self.indices = list(indices)

    def __next__(self):
        if self.position >= len(self.indices):
            raise StopIteration
        batch = self.indices[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        images, labels = [], []
        for index in batch:
            sample, failures = read_or_substitute(self.loader.reader, index, checked_by_dali)
            for where, reason in failures:
                self.loader.report_failure(index, where, reason)
            images.append(np.frombuffer(sample.image, dtype=np.uint8))
            labels.append(np.array([sample.label], dtype=np.int64))
        return images, labels


def checked_by_dali(sample):
    problem = decodable_by_dali(sample.image)
    if problem:
        raise ValueError(problem)
    return sample


@pipeline_def(batch_size=1, num_threads=1, device_id=None, prefetch_queue_depth=1)
def probe_pipeline(encoded: np.ndarray):
    return fn.decoders.image(fn.external_source(source=lambda: [encoded], batch=True, dtype=types.UINT8),
                             device="cpu", output_type=types.RGB)


class ShardDaliLoader(DaliLoader):
    def __init__(self, cfg, split: str, reader: ShardReader, classes: list[str], *, rank: int, world_size: int,
                 device: torch.device):
        self.reader, self.shard_classes = reader, classes
        super().__init__(cfg, split, rank=rank, world_size=world_size, device=device)

    def list_samples(self, cfg, split: str, rank: int):
        count = len(self.reader)  # files: the sample indices; the source reads labels with the images
        return self.shard_classes, range(count), [None] * count, []

    def new_source(self) -> EpochShardSamples:
        return EpochShardSamples(self)

    def report_failure(self, index: int, where: str, reason: str) -> None:
        """Once per sample and process: a line, and a place in left_out (the run's report)."""
        if all(where != known for known, _ in self.left_out):
            self.left_out.append((where, f"failed mid-run: {reason}"))
            print(f"warning: {where}: {reason}; the next sample of the set is used in its place", flush=True)

    def probe(self, index: int) -> str:
        """'' if DALI's CPU decoder decodes sample index alone, else why not."""
        try:
            pipe = probe_pipeline(np.frombuffer(self.reader.read(index).image, dtype=np.uint8))
            pipe.build()
            pipe.run()
        except UnreadableSample as bad:
            return bad.reason
        except RuntimeError as error:
            return f"DALI cannot decode it ({dali_reason(str(error))})"
        return ""

    def name(self, index: int) -> str:
        return self.reader.table.where(index)
