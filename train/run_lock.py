"""One run at a time in an output_dir: an exclusive flock on the folder itself.

Two runs writing one folder would write every metric twice and race on the same checkpoint
names, so the second one stops at once with one line naming the first (its PID). The kernel
drops a flock when its holder dies, so a crashed or killed run never leaves the folder locked,
and no lock file is left behind. Under `accelerate launch` only the main process holds it.
"""
from __future__ import annotations

import fcntl
import os
from pathlib import Path

from common.errors import UserInputError

_held: list[int] = []  # descriptors of the folders this process has locked


def _close_in_child() -> None:
    """A forked child (a DataLoader worker, a converter pool) shares the locked open file; its
    copy is closed so that the lock ends with this process, not with its last child."""
    for descriptor in _held:
        os.close(descriptor)
    _held.clear()


os.register_at_fork(after_in_child=_close_in_child)


class RunFolderBusy(UserInputError):
    pass


def lock_run_folder(folder: Path) -> None:
    """Hold an exclusive lock on `folder` (which must exist) until this process exits."""
    descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        holder = lock_holder(folder)
        raise RunFolderBusy(f"output_dir {folder} is in use by another run{f' (PID {holder})' if holder else ''}: "
                            f"wait for it to end, or give another output_dir") from None
    _held.append(descriptor)


def lock_holder(folder: Path) -> int | None:
    """The PID holding a flock on folder, from /proc/locks (Linux), if it can be found."""
    status = os.stat(folder)
    device = f"{os.major(status.st_dev):02x}:{os.minor(status.st_dev):02x}:{status.st_ino}"
    try:
        for line in Path("/proc/locks").read_text().splitlines():
            fields = line.split()
            if "FLOCK" in fields and device in fields:
                return int(fields[fields.index(device) - 1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def claim_run_folder(accelerator, folder: Path) -> bool:
    """Lock folder on the main process if it exists there; every process raises RunFolderBusy if
    another run holds it. Returns, on every process alike, whether this run now holds the lock."""
    from train.distributed import main_process_decides

    def try_lock() -> tuple[str, bool]:  # the refusal, if any; whether the lock is held
        if not Path(folder).is_dir():
            return "", False
        try:
            lock_run_folder(Path(folder))
            return "", True
        except RunFolderBusy as error:
            return str(error), False

    refusal, held = main_process_decides(accelerator, try_lock)
    if refusal:
        raise RunFolderBusy(refusal)
    return held
