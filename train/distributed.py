"""Several processes: a frozen one stops the run with one line instead of a silent wait, and no
process outlives its launcher.

- **Collective timeout** (`collective_timeout_s`, default 600 s, torch's own NCCL default): a
  process that waits that long for the others in a collective (DDP's gradient all-reduce, a
  metrics reduce, a checkpoint barrier) raises; run.py prints which rank waited, during what, and
  exits 5. A healthy run never waits that long: its longest one-process stretches (a checkpoint
  write, copying a W&B artifact) take seconds to a minute. The data's one-time preparation (an
  FFCV conversion can take an hour on the main process) waits on its own group without a limit
  that matters. With NCCL on GPUs torch's watchdog ends a process at the timeout instead, with its
  own message naming the collective (`Watchdog caught collective operation timeout`).
- **No orphans**: under torchrun (`accelerate launch --multi_gpu`) the kernel sends SIGKILL to a
  worker when its launcher dies (prctl PR_SET_PDEATHSIG), so a killed launcher leaves no process
  behind holding the output_dir's lock, even a frozen (stopped) one, which no other signal reaches;
  under the one-process `accelerate launch` it sends SIGTERM: the run checkpoints and exits.
"""
from __future__ import annotations

import ctypes
import os
import signal
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Callable

import torch.distributed as dist
from accelerate.utils import InitProcessGroupKwargs

PREPARATION_TIMEOUT = timedelta(days=2)  # the data's one-time preparation: as long as it takes
PR_SET_PDEATHSIG = 1

_activity: list[Callable[[], str]] = [lambda: "start-up"]
_timeout_s: list[int] = [0]


class PeerTimeout(RuntimeError):
    """This process waited collective_timeout_s for the others."""
    exit_code = 5


def process_group_kwargs(cfg) -> InitProcessGroupKwargs:
    _timeout_s[0] = cfg.collective_timeout_s
    return InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.collective_timeout_s))


def doing(what: str | Callable[[], str]) -> Callable[[], str]:
    """Record what this process is doing now (a string, or a function giving it), for the message
    of a collective timeout; returns what it was doing before (to restore after a detour)."""
    before = _activity[0]
    _activity[0] = what if callable(what) else (lambda: what)
    return before


# How torch and gloo word a collective's timeout. Gloo raises "Timed out waiting ..." in the
# operation that ran out of time and "Application timeout caused pair closure" in every other
# operation on the same pairs (DDP's concurrent bucket all-reduces): either may reach us first.
TIMEOUT_PHRASES = ("timed out", "application timeout caused pair closure")


def is_collective_timeout(message: str) -> bool:
    return any(phrase in message.lower() for phrase in TIMEOUT_PHRASES)


def peer_timeout(error: BaseException) -> PeerTimeout | None:
    """A PeerTimeout saying who waited during what, if `error` is a collective's timeout."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world < 2 or not isinstance(error, RuntimeError) or not is_collective_timeout(str(error)):
        return None
    rank = os.environ.get("RANK", "?")
    return PeerTimeout(f"process {rank} of {world} waited more than {_timeout_s[0]} s (collective_timeout_s) for "
                       f"the other processes during {_activity[0]()}: one of them is frozen (stopped, hung on a "
                       f"disk or a device), dead, or far slower. This run stopped; the same command continues "
                       f"from the last checkpoint")


@contextmanager
def main_process_first_without_timeout(accelerator):
    """accelerator.main_process_first(), with the others waiting on a group of their own whose
    timeout is PREPARATION_TIMEOUT: the main process may prepare the data for hours."""
    if accelerator.num_processes == 1:
        yield
        return
    group = dist.new_group(backend="gloo", timeout=PREPARATION_TIMEOUT)
    if not accelerator.is_main_process:
        dist.barrier(group=group)
    yield
    if accelerator.is_main_process:
        dist.barrier(group=group)
    dist.destroy_process_group(group)


def die_with_launcher() -> None:
    """Have the kernel signal this process when the launcher that started it dies (Linux)."""
    parent = os.getppid()
    if "TORCHELASTIC_RUN_ID" in os.environ:  # torchrun: its workers end together
        death_signal = signal.SIGKILL
    elif "accelerate" in command_line(parent):  # accelerate launch's one process: stop with a checkpoint
        death_signal = signal.SIGTERM
    else:  # a plain `python train/run.py` belongs to the user's shell (nohup, tmux...): left alone
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(death_signal), 0, 0, 0) != 0:
            return
    except (OSError, AttributeError):  # not Linux
        return
    if os.getppid() != parent:  # the launcher died before the request: act on it now
        os.kill(os.getpid(), death_signal)


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def main_process_decides(accelerator, decide: Callable[[], object]) -> object:
    """decide() on the main process, its result on every process (one broadcast)."""
    from accelerate.utils import broadcast_object_list

    outcome = [decide() if accelerator.is_main_process else None]
    if accelerator.num_processes > 1:
        broadcast_object_list(outcome)
    return outcome[0]
