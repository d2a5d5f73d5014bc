"""Preemption and numerical faults.

SIGTERM/SIGINT (a scheduler preempting the job, Ctrl-C) only set a flag: the loop finishes the
optimizer step it is in, run.py writes a checkpoint and exits 0, and `resume=auto` continues from
that exact batch. A second Ctrl-C stops at once. An epoch's training is checkpointed before its
validation, so a signal during a validation stops it within a few batches (StopInValidation, exit
0) and the resumed run validates that epoch again. Once training is finished and checkpointed, a
signal stops the final evaluation at once (exit 128 + signal number); the same command redoes it.
Non-finite values never reach the weights (NonFiniteLoss, train/step_guard.py).
"""
from __future__ import annotations

import os
import signal
import sys

import torch

from common.dropped_signals import signal_again_if_dropped


class NonFiniteLoss(RuntimeError):
    """A step whose loss or resulting weights were not finite, with on_nonfinite=stop (exit 3)."""
    exit_code = 3


class StopInValidation(Exception):
    """A stop was asked while an epoch whose training is saved was being validated."""


POLL_EVERY = 8  # validation batches between two stop checks with several processes (each is a collective)


class StoppedAfterTraining(Exception):
    """A signal arrived after the trained state was checkpointed (final evaluation, exports)."""

    def __init__(self, signum: int):
        self.signum = signum
        self.exit_code = 128 + signum  # the shell's convention for "ended by this signal"
        super().__init__(f"{signal.Signals(signum).name}: stopped the final evaluation; training is finished and "
                         "checkpointed: rerun the same command to redo only the final evaluation and exports")
        self.exit_line = f"\n{self}"  # a stop the user asked for, not an error


class StopRequest:
    def __init__(self):
        self.requested = False
        self.training_done = False

    def install(self) -> "StopRequest":
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)
        return self

    def training_saved(self) -> None:
        """From here on nothing is lost by stopping at once: a signal raises StoppedAfterTraining
        wherever the final evaluation is (it can outlast a scheduler's grace period)."""
        self.training_done = True
        sys.unraisablehook = signal_again_if_dropped(sys.unraisablehook, stopped_after_training_signal,
                                                     lambda signum: os.kill(os.getpid(), signum))

    def _handle(self, signum, frame) -> None:
        if self.training_done:
            raise StoppedAfterTraining(signum)
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: finishing this step, then saving a checkpoint "
              "(Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    def agreed(self, accelerator) -> bool:
        """True on every process once any process was asked to stop (they must stop together)."""
        return any_process(self.requested, accelerator)

    def validation_polls(self, accelerator, batches: int) -> range:
        """After which of its `batches` validation batches (1-based) to check for a stop: each, in
        one process; with several, every POLL_EVERY-th of those all processes have."""
        if accelerator.num_processes == 1:
            return range(1, batches + 1)
        common = int(accelerator.gather(torch.tensor([batches], device=accelerator.device)).min())
        return range(POLL_EVERY, common + 1, POLL_EVERY)

    def stop_validation_if_asked(self, accelerator) -> None:
        if self.agreed(accelerator):
            raise StopInValidation()


def stopped_after_training_signal(error: BaseException) -> int | None:
    return error.signum if isinstance(error, StoppedAfterTraining) else None


def any_process(flag: bool, accelerator) -> bool:
    if accelerator.num_processes == 1:
        return flag
    return accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), "sum").item() > 0
