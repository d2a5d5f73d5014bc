"""A sample that fails while training costs neither the run nor its order: the next sample of the
source that reads stands in for it, on every backend and source.

What fails: an image changed since the up-front check, a kind one backend cannot decode (DALI and
1-bit TIFFs), a shard cut short or gone. The stand-in is a function of the source alone (the next
index that has not failed, wrapping around), so batches stay full, every process keeps its step
count, the epoch's order stays a function of (seed, epoch), and every process and a resumed run
agree. Each failure is named once per process, in one warning line — a shard that cannot be read
at all once, not once per sample — and each failed sample is listed in the loader's left_out (the
run's report), after what the up-front check left out.

    value, failures = first_readable(index, len(source), read)   # read(i) raises Unreadable
"""
from __future__ import annotations

from typing import Callable

from common.errors import DataError

MAX_SUBSTITUTES = 16  # samples failing mid-run at one place before a loader gives up (the data is gone?)


class Unreadable(Exception):
    """A sample that cannot be used: where it is (a path, or shard and key) and why. `also`: the
    other indices that fail with it, and `unit` what fails as a whole (a shard that cannot be read
    at all: every sample of it; by default the sample itself)."""

    def __init__(self, where: str, reason: str, also: range = range(0), unit: str = ""):
        super().__init__(where, reason, also, unit)
        self.where, self.reason, self.also, self.unit = where, reason, also, unit or where

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"


def substitute(index: int, n: int, failed) -> int:
    """The sample used in place of sample `index`: the next one in the source's order that has not
    failed."""
    for step in range(1, n):
        if (index + step) % n not in failed:
            return (index + step) % n
    raise DataError("no sample of the data set reads any more: has it been moved or deleted?")


def first_readable(index: int, n: int, read: Callable[[int], object]) -> tuple[object, list[tuple[str, str, str]]]:
    """(read(i) for i = index or, if it raises Unreadable, for its substitutes in turn; [(where,
    reason, unit)] of the samples that failed on the way)."""
    failures, failed = [], set()
    while True:
        try:
            return read(index), failures
        except Unreadable as bad:
            failures.append((bad.where, bad.reason, bad.unit))
            failed.update(bad.also)
        failed.add(index)
        if len(failures) > MAX_SUBSTITUTES:
            raise DataError(f"{failures[0][0]} and the next {MAX_SUBSTITUTES} samples tried in its place cannot be "
                            f"read ({failures[-1][1]}): has the data set been moved or changed?")
        index = substitute(index, n, failed)


class LeftOut(list):
    """[(where, reason)] of the source's samples a loader does not yield: those left out before
    training, then each that fails mid-run. A warning line names each failure once per process as
    it happens: a sample, or the unit it failed with (a whole shard: one line for all its samples).
    line(where, reason): the source's warning about a failed sample."""

    def __init__(self, before, line: Callable[[str, str], str]):
        super().__init__(before)
        self.line = line
        self.known = {where for where, _ in self}
        self.warned: set[str] = set()

    def failed_mid_run(self, where: str, reason: str, unit: str = "") -> None:
        if where not in self.known:
            self.known.add(where)
            self.append((where, f"failed mid-run: {reason}"))
        unit = unit or where
        if unit not in self.warned:
            self.warned.add(unit)
            shared = "; each of its samples is replaced by the next that reads" if unit != where else ""
            print(f"warning: {self.line(unit, reason)}{shared}", flush=True)
