"""Where every sample of a local tar shard lies: its index file.

An index file is DALI's (`wds2idx`, version 1.2): a line `v1.2 <samples>`, then one line per sample
listing each of its files as `<ext> <byte offset> <size> <name>`. tools/convert_wds.py writes one
beside each shard (train-0000.tar → train-0000.idx, wds2idx's naming). A shard without one (or
with one that does not fit it) is indexed once by reading its tar headers with Python's tarfile (which
reads GNU and PAX tars alike; DALI 2.4.0 reads both too), and the index is cached under
$XDG_CACHE_HOME/advprop-trainer/wds-index (default ~/.cache), named by the tar's path, size and mtime:
the shards' folder may be read-only shared storage. An index beside a shard is used when the tar
headers before its first and last files carry the names it lists (a rewritten tar is indexed again,
a copied set is not). So a split's table (table.py) reads the small index files, never a whole tar
again; a damaged index in the cache is built again after a one-line warning.
"""
from __future__ import annotations

import gc
import hashlib
import multiprocessing
import os
import tarfile
from pathlib import Path

from tqdm.auto import tqdm

from pipelines.cache_files import cache_folder, warn_damaged
from pipelines.sources.shards.spec import ShardSetError

INDEX_VERSION = "v1.2"


def dali_index_path(tar: str) -> str:
    """wds2idx's default name for a shard's index: the path up to the file name's first dot + .idx."""
    return tar[:tar.find(".", tar.rfind("/") + 2)] + ".idx" if "." in tar[tar.rfind("/") + 2:] else tar + ".idx"


def cache_root() -> Path:
    return cache_folder("wds-index")


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
    if not cached.is_file():
        return None
    try:
        return str(cached), read_index(cached)
    except (ShardSetError, ValueError, IndexError) as error:  # ours, damaged: index the tar again
        warn_damaged(cached, str(error))
        return None


def index_for(tar: str) -> tuple[str, list[Sample]]:
    """(index file, samples) of one local shard, built into the cache now if it has none."""
    try:
        found = existing_index(tar)
    except OSError as error:
        raise ShardSetError(f"shard {tar} cannot be read: {error.strerror}") from None
    return found if found is not None else build_index(tar)


def build_index(tar: str) -> tuple[str, list[Sample]]:
    """(index file, samples) of a shard read from its tar headers, the index written to the cache."""
    samples = scan_tar(tar)
    path = cached_index_path(tar, os.stat(tar))
    write_index(path, samples)
    return str(path), samples


def _index_job(tar: str):
    try:
        return build_index(tar)
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
    built = {tar: build_index(tar) for tar in missing[:1]} if len(missing) == 1 else {}
    if len(missing) > 1:
        gc.collect()  # garbage holding threads (an old loader's) is ended here, not in a forked copy without them
        with multiprocessing.Pool(min(workers or os.cpu_count() or 1, len(missing))) as pool:
            for tar, result in zip(missing, tqdm(pool.imap(_index_job, missing), total=len(missing),
                                                 desc="index shards", unit="shard")):
                if isinstance(result, ShardSetError):
                    raise result
                built[tar] = result
    return [known or built[tar] for tar, known in zip(tars, found)]
