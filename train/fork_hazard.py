"""A CPython bug that can freeze a multi-process run as its DataLoader workers start.

Before 3.11.10 (3.12 is fine), a process forked while another thread holds the interpreter's
thread-list lock deadlocks in the child (CPython gh-112275). In a run of several processes that
other thread can be the process group's (gloo, NCCL), which takes the lock when it drops a tensor
Python still references; the fork is a DataLoader starting its workers. The worker never starts,
its process waits for it, and the others stop after collective_timeout_s with a "frozen" error;
the run then resumes. It is rare, so the run warns rather than refuses.
"""
from __future__ import annotations

import sys

FIXED_IN = (3, 11, 10)


def fork_hazard(python: tuple[int, ...], processes: int, workers: int, timeout_s: int) -> str | None:
    """The warning for a run of `processes` processes with `workers` DataLoader workers each on
    Python `python` (sys.version_info[:3]), or None where the bug cannot bite."""
    if processes < 2 or workers < 1 or tuple(python) >= FIXED_IN:
        return None
    return (f"warning: Python {'.'.join(map(str, python))} can freeze a DataLoader worker as it starts while "
            f"another thread talks to the process group (CPython gh-112275, fixed in 3.11.10 and 3.12); "
            f"should it happen, the other processes stop after collective_timeout_s={timeout_s} s and the "
            f"run resumes from its last checkpoint. A Python >= 3.11.10 avoids it")


def warn_of_fork_hazard(accelerator, cfg) -> None:
    warning = fork_hazard(sys.version_info[:3], accelerator.num_processes, cfg.data.workers,
                          cfg.collective_timeout_s)
    if warning and accelerator.is_main_process:
        print(warning, file=sys.stderr)
