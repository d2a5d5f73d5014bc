"""Files written whole or not at all, and no temporary file outliving its writer.

    with written_whole(Path("data/ffcv/train.beton")) as temporary:
        write(temporary)              # renamed to train.beton when the block completes

The temporary file lies beside the target (.NAME.tmp-PID-HOST) and is removed however the block
ends: an error, Ctrl-C, SIGTERM or SIGHUP (raised as SystemExit(128 + N) inside the block, after
ending its worker processes, which would otherwise keep the exit waiting). A SIGKILL cannot be
caught: the next writer of the same target removes the temporaries of processes that are gone.

Python drops an exception raised by a signal handler that runs inside a fork hook, a finalizer or
a __del__: such a signal is sent again, and checked for before anything is renamed into place.
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from common.dropped_signals import signal_again_if_dropped

CAUGHT_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def temporary_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{socket.gethostname()}")


@contextmanager
def written_whole(path: Path):
    """Yields a temporary path to write; it becomes `path` when the block completes."""
    remove_stale_temporaries(path)
    temporary = temporary_path(path)
    try:
        with signals_end_the_block() as raise_if_stopped:
            yield temporary
            raise_if_stopped()
            os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_whole(path: Path, data: bytes) -> None:
    with written_whole(path) as temporary:
        temporary.write_bytes(data)


@contextmanager
def signals_end_the_block():
    """SIGTERM and SIGHUP raise SystemExit in the block (main thread only: Python's rule for
    handlers), so `finally` clauses run; on any exception the block's worker processes end too.
    Yields `raise_if_stopped()`: call it before committing anything (a rename, a listing)."""
    stop = SignalStop()
    if threading.current_thread() is not threading.main_thread():
        yield stop.raise_if_stopped
        return
    previous = {number: signal.signal(number, stop.handle) for number in CAUGHT_SIGNALS}
    previous_hook = sys.unraisablehook
    sys.unraisablehook = signal_again_if_dropped(previous_hook, stop.dropped_signal, stop.resend)
    try:
        yield stop.raise_if_stopped
        stop.raise_if_stopped()  # a signal whose SystemExit Python dropped
    except BaseException:
        stop.end()
        end_children()
        raise
    finally:
        stop.end()
        sys.unraisablehook = previous_hook
        for number, handler in previous.items():
            signal.signal(number, handler)


def end_children(grace_s: float = 5.0) -> None:
    """End this process's children (e.g. ffcv's writers: the exit would wait for them): SIGTERM, then
    SIGKILL for any still alive after grace_s. A child may never act on SIGTERM: it inherited the
    block's handler, a Python function that runs only between bytecodes, or it hangs in CPython's
    fork deadlock before 3.11.10 (gh-112275) before it runs any."""
    children = multiprocessing.active_children()
    for child in children:
        child.terminate()
    deadline = time.monotonic() + grace_s
    for child in children:
        child.join(max(0.0, deadline - time.monotonic()))
        if child.is_alive():
            child.kill()
            child.join()


class SignalStop:
    """The block's caught signal. Its SystemExit may be dropped (see common/dropped_signals.py):
    the signal is then sent again while the block runs, and raise_if_stopped() checks for it."""
    LOCK = threading.Lock()  # no resend after the block has given the signal back to its old handler

    def __init__(self):
        self.signum: int | None = None  # the first caught
        self.running = True

    def handle(self, signum, frame):
        if not self.running:
            return  # a resent signal during the clean-up: already stopping
        self.signum = self.signum or signum
        raise SystemExit(128 + signum)

    def dropped_signal(self, error: BaseException) -> int | None:
        """The signal of a dropped SystemExit that our handler raised, else None."""
        ours = self.signum is not None and isinstance(error, SystemExit) and error.code == 128 + self.signum
        return self.signum if ours else None

    def resend(self, signum: int) -> None:
        with self.LOCK:
            if self.running:
                os.kill(os.getpid(), signum)

    def raise_if_stopped(self) -> None:
        if self.signum is not None:
            raise SystemExit(128 + self.signum)

    def end(self) -> None:
        with self.LOCK:
            self.running = False


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Remove the temporaries of `path` left by killed writers on this host; returns them.
    (Also the names of earlier versions, NAME.tmp-PID.)"""
    removed = []
    for candidate in [*path.parent.glob(f".{path.name}.tmp-*"), *path.parent.glob(f"{path.name}.tmp-*")]:
        pid, _, host = candidate.name.rsplit(".tmp-", 1)[1].partition("-")
        if pid.isdigit() and host in ("", socket.gethostname()) and not process_exists(int(pid)):
            candidate.unlink(missing_ok=True)
            removed.append(candidate)
    if removed:
        print(f"removed {len(removed)} temporary files left by killed writers of {path}: "
              f"{', '.join(p.name for p in removed[:3])}", flush=True)
    return removed


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
