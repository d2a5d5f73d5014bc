"""Preemption and numerical faults.

SIGTERM/SIGINT (a scheduler preempting the job, Ctrl-C) only set a flag: the loop finishes the
optimizer step it is in, run.py writes a checkpoint and exits 0, and `resume=auto` continues from
that exact batch. A second Ctrl-C stops at once. A non-finite loss stops the run before the bad
step touches the weights (or skips the batch, with on_nonfinite=skip), so no NaN weights are saved.
"""
from __future__ import annotations

import signal
import sys

import torch


class NonFiniteLoss(RuntimeError):
    pass


class StopRequest:
    def __init__(self):
        self.requested = False

    def install(self) -> "StopRequest":
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: finishing this step, then saving a checkpoint "
              "(Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    def agreed(self, accelerator) -> bool:
        """True on every process once any process was asked to stop (they must stop together)."""
        return any_process(self.requested, accelerator)


def any_process(flag: bool, accelerator) -> bool:
    if accelerator.num_processes == 1:
        return flag
    return accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), "sum").item() > 0


def loss_is_finite(loss: torch.Tensor, accelerator) -> bool:
    """All processes agree: one bad shard makes the step bad everywhere."""
    return not any_process(not bool(torch.isfinite(loss.detach()).all()), accelerator)


def ignore_interrupts(worker_id: int) -> None:
    """DataLoader worker_init_fn: Ctrl-C is the main process's to handle; a worker that died of it
    would break the step the main process is finishing."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class BufferSnapshot:
    """The model's buffers (BN running statistics) as they were before a step: a non-finite
    forward has already written NaN into them by the time the loss can be checked."""

    def __init__(self, model: torch.nn.Module):
        self.buffers = list(model.buffers())
        self.saved = [b.clone() for b in self.buffers]

    def restore(self) -> None:
        with torch.no_grad():
            for buffer, saved in zip(self.buffers, self.saved):
                buffer.copy_(saved)
