"""Where every sample of a set of local tar shards lies: one index file per shard, one table per split.

An index file is DALI's (`wds2idx`, version 1.2): a line `v1.2 <samples>`, then one line per sample
listing each of its files as `<ext> <byte offset> <size> <name>`. tools/convert_wds.py writes one
beside each shard (train-0000.tar → train-0000.idx, wds2idx's naming). A shard without one (or
with one that does not fit it) is indexed once by reading its tar headers with Python's tarfile (which
reads GNU and PAX tars alike; DALI 2.4.0 reads both too), and the index is cached under
$XDG_CACHE_HOME/advprop-trainer/wds-index (default ~/.cache), named by the tar's path, size and mtime:
the shards' folder may be read-only shared storage. An index beside a shard is used when the tar
headers before its first and last files carry the names it lists (a rewritten tar is indexed again,
a copied set is not). So a start reads the small index files, never a whole tar again.

SampleTable joins a split's shards into one index space 0..N-1 (shard by shard, samples in tar
order): ShardSampler's permutation of it is the order every backend reads. Checked here, before
any training, each one a one-line error: a missing shard, a truncated tar (a file ending inside a
sample), a sample without an image (jpg, jpeg, png, webp) or without its `cls` label, and shard
lengths that contradict the info file.
"""
from __future__ import annotations

import hashlib
import multiprocessing
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from pipelines.sources.shards.spec import IMAGE_EXTENSIONS, LABEL_EXTENSION, ShardSetError, ShardSplit, local_path

INDEX_VERSION = "v1.2"


def dali_index_path(tar: str) -> str:
    """wds2idx's default name for a shard's index: the path up to the file name's first dot + .idx."""
    return tar[:tar.find(".", tar.rfind("/") + 2)] + ".idx" if "." in tar[tar.rfind("/") + 2:] else tar + ".idx"


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "advprop-trainer" / "wds-index"


def cached_index_path(tar: str, status: os.stat_result) -> Path:
    digest = hashlib.sha1(os.path.abspath(tar).encode()).hexdigest()[:16]
    return cache_root() / f"{digest}-{status.st_size}-{status.st_mtime_ns}-{Path(tar).stem}.idx"


# ---------------------------------------------------------------------------------------------
# One shard's index: read, or build from the tar

Sample = list[tuple[str, int, int, str]]  # [(ext, offset, size, file name)] of one sample


def split_name(name: str) -> tuple[str, str]:
    """webdataset's and wds2idx's rule: the key is the path up to the first dot of the file name."""
    dot = name.find(".", name.rfind("/") + 1)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1:])


def scan_tar(tar: str) -> list[Sample]:
    """The samples of an uncompressed tar, from its headers (data is seeked over, not read)."""
    samples, last_key = [], None
    try:
        with tarfile.open(tar, "r:") as archive:
            for member in archive:
                key, ext = split_name(member.name)
                if not member.isreg() or not key or key.endswith("/") or not ext:
                    continue  # folders, links, hidden files (".x"), files without an extension
                if key != last_key:
                    samples.append([])
                    last_key = key
                samples[-1].append((ext, member.offset_data, member.size, member.name))
    except (tarfile.TarError, OSError) as error:
        raise ShardSetError(f"shard {tar} is not a readable uncompressed tar ({error}): truncated or "
                            f"damaged? (compressed shards cannot be read by index)") from None
    return samples


def write_index(path: str | Path, samples: list[Sample]) -> None:
    """DALI's index format, written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"{INDEX_VERSION} {len(samples)}"]
    lines += [" ".join(f"{ext} {offset} {size} {name}" for ext, offset, size, name in sample) for sample in samples]
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        temporary.write_text("\n".join(lines) + "\n")
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def read_index(path: str | Path) -> list[Sample]:
    lines = Path(path).read_text().splitlines()
    header = lines[0].split() if lines else []
    if len(header) != 2 or header[0] not in ("v1.1", "v1.2") or not header[1].isdigit():
        raise ShardSetError(f"index file {path} is not a DALI index (v1.1/v1.2); delete it to rebuild it")
    width = 4 if header[0] == "v1.2" else 3  # v1.1 has no file names
    samples = []
    for number, line in enumerate(lines[1:]):
        words = line.split()
        if len(words) % width:
            raise ShardSetError(f"index file {path}: line {number + 2} is malformed; delete it to rebuild it")
        samples.append([(w[0], int(w[1]), int(w[2]), w[3] if width == 4 else f"#{number}.{w[0]}")
                        for w in (words[i:i + width] for i in range(0, len(words), width))])
    if len(samples) != int(header[1]):
        raise ShardSetError(f"index file {path} announces {header[1]} samples but lists {len(samples)}")
    return samples


def names_match(tar: str, samples: list[Sample]) -> bool:
    """The index belongs to this tar: the headers before its first and last files carry their names
    (a tar rewritten under an old index fails this; a copied set with new mtimes passes)."""
    if not samples:
        return True
    with open(tar, "rb") as file:
        for _, offset, _, name in (samples[0][0], samples[-1][-1]):
            if offset < 512 or name.startswith("#"):  # v1.1 has no names to compare
                return offset >= 512
            header = os.pread(file.fileno(), 512, offset - 512)
            stored, prefix = header[:100].rstrip(b"\0").decode(errors="replace"), header[345:500].rstrip(b"\0")
            stored = f"{prefix.decode(errors='replace')}/{stored}" if prefix and header[257:262] == b"ustar" else stored
            if not name.startswith(stored[:99]):  # a PAX header may hold the full name, this one a cut
                return False
    return True


def existing_index(tar: str) -> tuple[str, list[Sample]] | None:
    """(index file, samples) from the shard's own index if it fits the tar, else from the cache;
    None when there is neither."""
    beside = dali_index_path(tar)
    if os.path.isfile(beside):
        try:
            samples = read_index(beside)
            if names_match(tar, samples):
                return beside, samples
        except (ShardSetError, OSError, ValueError):
            pass  # an index from elsewhere that does not fit: build our own
    cached = cached_index_path(tar, os.stat(tar))
    return (str(cached), read_index(cached)) if cached.is_file() else None


def index_for(tar: str) -> tuple[str, list[Sample]]:
    """(index file, samples) of one local shard, built into the cache now if it has none."""
    try:
        found = existing_index(tar)
    except OSError as error:
        raise ShardSetError(f"shard {tar} cannot be read: {error.strerror}") from None
    if found is not None:
        return found
    samples = scan_tar(tar)
    path = cached_index_path(tar, os.stat(tar))
    write_index(path, samples)
    return str(path), samples


def _index_job(tar: str):
    try:
        return index_for(tar)[0]
    except ShardSetError as error:
        return error


def index_all(tars: list[str], workers: int = 0) -> list[tuple[str, list[Sample]]]:
    """index_for of every shard, each index file read once; the missing ones built in parallel, with
    a progress bar."""
    try:
        found = [existing_index(tar) for tar in tars]
    except OSError as error:
        raise ShardSetError(f"shard {error.filename} cannot be read: {error.strerror}") from None
    missing = [tar for tar, known in zip(tars, found) if known is None]
    if len(missing) > 1:
        with multiprocessing.Pool(min(workers or os.cpu_count() or 1, len(missing))) as pool:
            for result in tqdm(pool.imap_unordered(_index_job, missing), total=len(missing), desc="index shards",
                               unit="shard"):
                if isinstance(result, ShardSetError):
                    raise result
    return [known or index_for(tar) for tar, known in zip(tars, found)]


# ---------------------------------------------------------------------------------------------
# A split's table

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
        name = read_index(self.index_files[shard])[position][0][3]
        return split_name(name)[0]

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
    """The split's table, every shard checked (see the module doc); one ShardSetError for all problems."""
    tars = [local_path(url) for url in shards.urls]
    missing = [t for t in tars if not os.path.isfile(t)]
    if missing:
        raise ShardSetError(f"{shards.source}: {len(missing)} of {len(tars)} shards do not exist "
                            f"(first: {missing[0]})")
    indexed = index_all(tars, workers)
    rows, problems, counts, miscounted = [], [], [], []
    for number, (tar, (_, samples)) in enumerate(zip(tars, indexed)):
        size = os.path.getsize(tar)
        end = max((offset + length for sample in samples for _, offset, length, _ in sample), default=0)
        if end > size:
            raise ShardSetError(f"shard {tar} is truncated: its index has data up to byte {end}, the file "
                                f"has {size} bytes (an interrupted copy? copy it again)")
        if shards.lengths and shards.lengths[number] != len(samples):
            miscounted.append(f"shard {tar} holds {len(samples)} samples but {shards.source} says "
                              f"{shards.lengths[number]}")
        counts.append(len(samples))
        for sample in samples:
            fields = sample_fields(sample)
            if isinstance(fields, str):
                problems.append(f"shard {tar} key {split_name(sample[0][3])[0]}: {fields}")
            else:
                rows.append(fields)
    if problems:
        raise ShardSetError(f"{shards.source}: {len(problems)} samples cannot be trained on ({'; '.join(problems[:3])}"
                            f"{'; …' if len(problems) > 3 else ''}); every sample needs an image and a cls label")
    if miscounted:
        raise ShardSetError(f"{miscounted[0]}{f' (and {len(miscounted) - 1} more shards)' if len(miscounted) > 1 else ''}"
                            f": an info file from another version of the set?")
    if not rows:
        raise ShardSetError(f"{shards.source}: the shards hold no samples")
    array = np.asarray(rows, dtype=np.int64).reshape(-1, 5)
    return SampleTable(shards.source, tars, [path for path, _ in indexed],
                       np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
                       array[:, 0:2], array[:, 3:5], array[:, 2].astype(np.int8))
