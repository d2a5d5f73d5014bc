"""What the shard loaders do with a sample found bad mid-epoch: leave it out, say so, keep the steps.

A sample that cannot be read or decoded (pipelines/wds_read.py's UnreadableSample) is left out of
its batch and reported on the process that met it: one warning line per sample (the first
SHOWN of an epoch), then the epoch's count. Its batch is simply one image shorter. Training never
stops for it, and every process still takes the same number of steps (DDP needs that): a train
batch left with no sample at all is replaced by the process's previous batch (at an epoch's start,
by the next one), reported too. In val a batch left empty is dropped: val counts what it read.
"""
from __future__ import annotations

import sys

from pipelines.wds_spec import ShardSetError

SHOWN = 20  # per epoch and process; the rest are counted


class SkipReport:
    def __init__(self, rank: int, split: str):
        self.rank, self.split = rank, split
        self.epoch_count, self.total = 0, 0
        self.reasons: list[str] = []  # every skip since the loader was made: "shard … key …: reason"

    def add(self, bad) -> None:
        self.epoch_count += 1
        self.total += 1
        self.reasons.append(str(bad))
        if self.epoch_count <= SHOWN:
            print(f"warning: {self.split} sample left out (process {self.rank}): {bad}", file=sys.stderr, flush=True)

    def repeated_batch(self, position: int) -> None:
        print(f"warning: {self.split} batch {position} of process {self.rank} had no readable sample: "
              f"another batch of this process was used in its place", file=sys.stderr, flush=True)

    def end_epoch(self) -> None:
        if self.epoch_count:
            print(f"warning: {self.epoch_count} unreadable {self.split} samples left out this epoch by process "
                  f"{self.rank} (the first {min(self.epoch_count, SHOWN)} named above)", file=sys.stderr, flush=True)
        self.epoch_count = 0


def keep_every_step(batches, report: SkipReport, *, train: bool):
    """batches: an iterator of batches, None where every sample of one was unreadable. Yields one
    batch per position in train (see the module doc), the non-empty ones in val."""
    previous, owed = None, 0
    report.epoch_count = 0  # an epoch abandoned half-way (a stop request) did not report its own
    for position, batch in enumerate(batches):
        if batch is None:
            if train:
                report.repeated_batch(position)
                if previous is None:
                    owed += 1
                else:
                    yield previous
            continue
        for _ in range(owed + 1):
            yield batch
        previous, owed = batch, 0
    if owed:
        raise ShardSetError(f"no {report.split} sample of process {report.rank} could be read this epoch: "
                            f"{report.reasons[-1] if report.reasons else ''}")
    report.end_epoch()
