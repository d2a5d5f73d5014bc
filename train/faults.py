"""Preemption and numerical faults.

What SIGTERM/SIGINT (a scheduler preempting the job, Ctrl-C) do depends on where the run is:
  start-up      (imports, config, data, model, resume: nothing trained yet) the program stops at
                once, exit 128 + signal number; the same command starts again
  training      only a flag is set: the loop finishes the optimizer step it is in, run.py writes a
                checkpoint and exits 0, and `resume=auto` continues from that exact batch. A second
                Ctrl-C stops at once. An epoch's training is checkpointed before its validation, so
                a signal during a validation stops it within a few batches (StopInValidation, exit
                0) and the resumed run validates that epoch again
  final evaluation  (training is finished and checkpointed) it stops at once, exit 128 + N; the
                same command redoes only the final evaluation and exports
  finished      (summary, exports and table written) the program ends at once with exit 0
Non-finite values never reach the weights (NonFiniteLoss, train/step_guard.py).

Importing this module does not import torch: run.py installs the start-up handler before torch loads.
"""
from __future__ import annotations

import os
import signal
import sys

from common.dropped_signals import signal_again_if_dropped

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


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


class StoppedAtStartUp(SystemExit):
    """A signal before training started: nothing to save, so the program ends at once (exit 128 + N).
    A SystemExit, so that no `except Exception` of the start-up code takes it for a failure."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signum = signum


class StoppedWhenFinished(SystemExit):
    """A signal once the run is finished (summary, exports, table written): it ends with exit 0."""

    def __init__(self, signum: int):
        super().__init__(0)
        self.signum = signum


def stop_at_once(signum, frame) -> None:
    """The start-up handler: one line (once), then StoppedAtStartUp."""
    if not getattr(stop_at_once, "said", False):
        stop_at_once.said = True
        print(f"\n{signal.Signals(signum).name}: stopped during start-up, before any training step: nothing to "
              "save; the same command starts the run again", file=sys.stderr, flush=True)
    raise StoppedAtStartUp(signum)


def stop_at_once_while_starting() -> None:
    """From the program's first lines until StopRequest.install(): a signal ends the program at once.
    An exception Python drops (raised in an at-fork hook or a finalizer) is raised again."""
    stop_at_once.said = False
    for signum in STOP_SIGNALS:
        signal.signal(signum, stop_at_once)
    if not isinstance(sys.unraisablehook, SignalResender):
        sys.unraisablehook = SignalResender(sys.unraisablehook)


def leave_stopping_to_the_parent() -> None:
    """In a process forked during start-up (an image-check pool, a converter's workers): SIGTERM ends
    it at once (Pool.terminate() sends it; the start-up handler, a Python function, runs only between
    bytecodes, so a worker that blocks on its task queue right after the signal never wakes and
    terminate() waits forever) and Ctrl-C is left to the parent, which stops the run."""
    if signal.getsignal(signal.SIGTERM) is stop_at_once:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)


os.register_at_fork(after_in_child=leave_stopping_to_the_parent)


class SignalResender:
    """The unraisablehook of a run: a stop that Python dropped is signalled again (common/dropped_signals.py)."""

    def __init__(self, hook):
        self.resend = signal_again_if_dropped(hook, stop_signal, lambda signum: os.kill(os.getpid(), signum))

    def __call__(self, unraisable) -> None:
        self.resend(unraisable)


def stop_signal(error: BaseException) -> int | None:
    stops = (StoppedAtStartUp, StoppedAfterTraining, StoppedWhenFinished)
    return error.signum if isinstance(error, stops) else None


class StopRequest:
    def __init__(self):
        self.requested = False
        self.phase = "training"  # then "final evaluation", then "finished"

    def install(self) -> "StopRequest":
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._handle)
        if not isinstance(sys.unraisablehook, SignalResender):
            sys.unraisablehook = SignalResender(sys.unraisablehook)
        return self

    def training_saved(self) -> None:
        """From here on nothing is lost by stopping at once: a signal raises StoppedAfterTraining
        wherever the final evaluation is (it can outlast a scheduler's grace period)."""
        self.phase = "final evaluation"

    def finished(self) -> None:
        """Everything is written: a signal ends the program with exit 0 (StoppedWhenFinished)."""
        self.phase = "finished"

    def _handle(self, signum, frame) -> None:
        if self.phase == "finished":
            print(f"\n{signal.Signals(signum).name}: the run is finished and saved; exiting", file=sys.stderr,
                  flush=True)
            raise StoppedWhenFinished(signum)
        if self.phase == "final evaluation":
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
        import torch

        common = int(accelerator.gather(torch.tensor([batches], device=accelerator.device)).min())
        return range(POLL_EVERY, common + 1, POLL_EVERY)

    def stop_validation_if_asked(self, accelerator) -> None:
        if self.agreed(accelerator):
            raise StopInValidation()


def any_process(flag: bool, accelerator) -> bool:
    if accelerator.num_processes == 1:
        return flag
    import torch

    return accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), "sum").item() > 0
