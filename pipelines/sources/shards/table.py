"""Every sample of a split's local shards in one table: where its image and label lie.

SampleTable joins a split's shards into one index space 0..N-1 (shard by shard, samples in tar
order): ShardSampler's permutation of it is the order every backend reads. Checked when it is
built, before any training, each one a one-line error: a missing shard, a truncated tar (a file
ending inside a sample), a sample without an image (jpg, jpeg, png, webp) or without its `cls`
label, and shard lengths that contradict the info file.

Built from the shards' index files (index.py), then kept as numpy arrays under
$XDG_CACHE_HOME/advprop-trainer/shard-tables/, named by every shard's path, size and mtime: a
start on shards it has seen reads one file instead of parsing every index again. A damaged one
is built again after a one-line warning.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np

from pipelines.cache_files import cache_folder, read_arrays, warn_damaged, write_arrays
from pipelines.sources.samples import PathTable
from pipelines.sources.shards.index import Sample, index_all, index_for, read_index, split_name
from pipelines.sources.shards.spec import IMAGE_EXTENSIONS, LABEL_EXTENSION, ShardSetError, ShardSplit, local_path

TABLE_ARRAYS = ("starts", "image", "label", "image_ext", "index_files", "index_offsets")


@dataclass
class SampleTable:
    """Every sample of a split's local shards, numbered 0..N-1 shard after shard."""
    source: str
    shards: list[str]  # paths
    index_files: list[str]  # one per shard, for a sample's key in reports
    starts: np.ndarray  # (shards + 1,) first global index of each shard, then N
    image: np.ndarray  # (N, 2) byte offset, size of the image file
    label: np.ndarray  # (N, 2) byte offset, size of the cls file
    image_ext: np.ndarray  # (N,) index into IMAGE_EXTENSIONS

    def __len__(self) -> int:
        return int(self.starts[-1])

    def locate(self, index: int) -> tuple[int, int]:
        """(shard number, position in the shard) of a global index."""
        shard = int(np.searchsorted(self.starts, index, side="right")) - 1
        return shard, index - int(self.starts[shard])

    def key(self, index: int) -> str:
        """The sample's key (from its shard's index file: read only when a report needs it)."""
        shard, position = self.locate(index)
        try:
            samples = read_index(self.index_files[shard])
        except (OSError, ShardSetError, ValueError):  # its cached index is gone since: index it again
            samples = index_for(self.shards[shard])[1]
        return split_name(samples[position][0][3])[0]

    def where(self, index: int) -> str:
        """'shard <path> key <key>' for reports."""
        return f"shard {self.shards[self.locate(index)[0]]} key {self.key(index)}"


def sample_fields(sample: Sample) -> tuple[int, int, int, int, int] | str:
    """(image offset, size, extension number, cls offset, size), or what the sample lacks."""
    by_ext = {ext.lower(): (offset, size) for ext, offset, size, _ in sample}
    image = next((i for i, ext in enumerate(IMAGE_EXTENSIONS) if ext in by_ext), None)
    if image is None:
        return f"no image file ({', '.join(IMAGE_EXTENSIONS)})"
    if LABEL_EXTENSION not in by_ext:
        return "no label file (cls)"
    return (*by_ext[IMAGE_EXTENSIONS[image]], image, *by_ext[LABEL_EXTENSION])


def build_table(shards: ShardSplit, workers: int = 0) -> SampleTable:
    """The split's table, from the cache or the index files; one ShardSetError for all problems."""
    tars = [local_path(url) for url in shards.urls]
    missing = [t for t in tars if not os.path.isfile(t)]
    if missing:
        raise ShardSetError(f"{shards.source}: {len(missing)} of {len(tars)} shards do not exist "
                            f"(first: {missing[0]})")
    path = cache_folder("shard-tables") / f"{table_key(tars)}.npz"
    table = read_table(path, shards.source, tars)
    if table is None:
        table = index_table(shards.source, tars, workers)
        write_table(path, table)
    check_lengths(shards, table)
    return table


def table_key(tars: list[str]) -> str:
    """16 hex digits naming the shards as they are now: each one's real path, size and mtime."""
    digest = hashlib.blake2b(digest_size=8)
    for tar in tars:
        status = os.stat(tar)
        digest.update(f"{os.path.realpath(tar)}\0{status.st_size}\0{status.st_mtime_ns}\n".encode(
            "utf-8", "surrogateescape"))
    return digest.hexdigest()


def index_table(source: str, tars: list[str], workers: int) -> SampleTable:
    """The table read from every shard's index (built where missing), each shard checked."""
    indexed = index_all(tars, workers)
    rows, problems, counts = [], [], []
    for tar, (_, samples) in zip(tars, indexed):
        size = os.path.getsize(tar)
        end = max((offset + length for sample in samples for _, offset, length, _ in sample), default=0)
        if end > size:
            raise ShardSetError(f"shard {tar} is truncated: its index has data up to byte {end}, the file "
                                f"has {size} bytes (an interrupted copy? copy it again)")
        counts.append(len(samples))
        for sample in samples:
            fields = sample_fields(sample)
            if isinstance(fields, str):
                problems.append(f"shard {tar} key {split_name(sample[0][3])[0]}: {fields}")
            else:
                rows.append(fields)
    if problems:
        raise ShardSetError(f"{source}: {len(problems)} samples cannot be trained on ({'; '.join(problems[:3])}"
                            f"{'; …' if len(problems) > 3 else ''}); every sample needs an image and a cls label")
    if not rows:
        raise ShardSetError(f"{source}: the shards hold no samples")
    array = np.asarray(rows, dtype=np.int64).reshape(-1, 5)
    return SampleTable(source, tars, [path for path, _ in indexed],
                       np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
                       array[:, 0:2], array[:, 3:5], array[:, 2].astype(np.int8))


def check_lengths(shards: ShardSplit, table: SampleTable) -> None:
    """The shard lengths the info file gives, against the shards."""
    if not shards.lengths:
        return
    counts = np.diff(table.starts).tolist()
    miscounted = [f"shard {tar} holds {count} samples but {shards.source} says {said}"
                  for tar, count, said in zip(table.shards, counts, shards.lengths) if count != said]
    if miscounted:
        raise ShardSetError(f"{miscounted[0]}{f' (and {len(miscounted) - 1} more shards)' if len(miscounted) > 1 else ''}"
                            f": an info file from another version of the set?")


# ---------------------------------------------------------------------------------------------
# The cache file

def write_table(path, table: SampleTable) -> None:
    indexes = PathTable.from_strings(table.index_files)
    write_arrays(path, starts=table.starts, image=table.image, label=table.label, image_ext=table.image_ext,
                 index_files=indexes.data, index_offsets=indexes.offsets)


def read_table(path, source: str, tars: list[str]) -> SampleTable | None:
    """The cached table of these shards, or None (missing, or damaged: said once)."""
    arrays = read_arrays(path, TABLE_ARRAYS)
    if arrays is None:
        return None
    index_files = list(PathTable(arrays["index_files"], arrays["index_offsets"]))
    table = SampleTable(source, tars, index_files, arrays["starts"], arrays["image"], arrays["label"],
                        arrays["image_ext"])
    n = len(table.image)
    if not (len(table.starts) == len(tars) + 1 == len(index_files) + 1 and table.starts[-1] == n
            and table.image.shape == table.label.shape == (n, 2) and table.image_ext.shape == (n,)):
        warn_damaged(path, "its arrays do not fit these shards")
        return None
    return table
