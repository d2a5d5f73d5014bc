"""The trainer's caches: kept outside the data (which may be read-only shared storage), under
$XDG_CACHE_HOME/advprop-trainer/<kind>/ (default ~/.cache/...), each file named by what it describes.

A cache file is only ever a shortcut. One that is missing is built; one that is damaged (cut
short, edited, from another version) is built again after a one-line warning; one that cannot be
written costs the work again next time, also with a warning. None of them is a reason to fail.

    arrays = read_arrays(path, ("paths", "offsets"))   # None: missing or damaged (said once)
    write_arrays(path, paths=..., offsets=...)         # whole or not at all
"""
from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np

from pipelines.atomic_files import write_whole


def cache_folder(kind: str) -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "advprop-trainer" / kind


def folder_key(root: str | Path) -> str:
    """16 hex digits naming a folder by its real path."""
    return hashlib.blake2b(os.fsencode(Path(root).resolve()), digest_size=8).hexdigest()


def warn_damaged(path: Path, problem: str) -> None:
    print(f"warning: the cache file {path} is damaged ({problem}): it is built again", flush=True)


def read_arrays(path: Path, names: tuple[str, ...]) -> dict[str, np.ndarray] | None:
    """The named arrays of an .npz cache file; None when it is missing or damaged (with a warning)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as stored:
            return {name: stored[name] for name in names}
    except Exception as error:  # numpy and zipfile raise many types for a damaged file; each means the same
        warn_damaged(path, f"{type(error).__name__}: {error}")
        return None


def write_arrays(path: Path, **arrays: np.ndarray) -> bool:
    """An .npz cache file, replaced whole; False (with a warning) when it cannot be written."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return write_bytes(path, buffer.getvalue())


def write_bytes(path: Path, data: bytes) -> bool:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_whole(path, data)
        return True
    except OSError as error:
        print(f"warning: the cache {path.parent} cannot be written ({error.strerror}): the work it saves "
              f"is done again next time", flush=True)
        return False
