"""No non-finite loss reaches the weights, the optimizer state or the BN statistics.

A step whose loss terms are not all finite (on any process) is skipped: with on_nonfinite=stop the
run then stops (exit 3) with the weights of the step before; with skip it goes on. Two ways to
know, chosen by nonfinite_check (auto: device on CUDA, host elsewhere):

  host    each Backward's terms are checked before they are backpropagated (one device→host read
          per backward, free on a CPU); a bad step is undone at once: buffers restored, gradients
          dropped, no optimizer step.
  device  nothing waits for the GPU: the flag stays on the device, the step runs, and afterwards
          every parameter, optimizer-state tensor and buffer takes back its value from before the
          step wherever the flag is set (torch.where: NaN-proof). The host reads the count of
          skipped steps at the next metrics report, where it syncs anyway; `stop` stops there.
          The run's first optimizer step is checked on the host: optimizers create their state
          (momentum, RMSprop's averages) in it, and a state that did not exist has no value to
          take back.
"""
from __future__ import annotations

import torch

from train.faults import NonFiniteLoss, any_process


class StepGuard:
    def __init__(self, model: torch.nn.Module, optimizer, accelerator, *, mode: str, on_nonfinite: str):
        self.model, self.optimizer, self.accelerator = model, optimizer, accelerator
        self.device_side = mode == "device" or (mode == "auto" and accelerator.device.type == "cuda")
        self.on_nonfinite = on_nonfinite
        self.buffers: list[torch.Tensor] = []
        self.saved_buffers: list[torch.Tensor] = []
        self.deferred = False  # this step is checked on the device
        self.bad = None  # device: this step's flag (bool scalar)
        self.skipped = torch.zeros((), dtype=torch.int64, device=accelerator.device)  # since the last report

    # -- every micro-batch ------------------------------------------------------------------------
    def begin(self) -> None:
        """Before the forward: the forward writes BN running statistics before any loss exists."""
        self.buffers = list(self.model.buffers())
        self.saved_buffers = [b.clone() for b in self.buffers]
        self.deferred = self.device_side and bool(self.optimizer.state)
        if self.deferred and self.bad is None:
            self.bad = torch.zeros((), dtype=torch.bool, device=self.accelerator.device)

    def check(self, terms: dict[str, torch.Tensor]) -> bool:
        """False (host mode) when a term is not finite on some process; the caller then abort()s."""
        finite = torch.isfinite(torch.stack([t.detach().float() for t in terms.values()])).all()
        if self.deferred:
            self.bad |= ~finite
            return True
        return not any_process(not bool(finite), self.accelerator)

    def abort(self) -> None:
        """Host mode, after a failed check: undo what the bad forward and backward did."""
        with torch.no_grad():
            for buffer, saved in zip(self.buffers, self.saved_buffers):
                buffer.copy_(saved)
        self.optimizer.zero_grad(set_to_none=True)

    # -- around the optimizer step (device mode) ----------------------------------------------------
    def state_tensors(self) -> list[torch.Tensor]:
        tensors = [p for group in self.optimizer.param_groups for p in group["params"]]
        for state in self.optimizer.state.values():
            tensors += [t for t in state.values() if torch.is_tensor(t)]
        return tensors

    def before_step(self) -> list[torch.Tensor]:
        if not self.deferred:
            return []
        if self.accelerator.num_processes > 1:  # one bad shard makes the step bad everywhere
            self.bad = self.accelerator.reduce(self.bad.int(), "sum") > 0
        return [t.detach().clone() for t in self.state_tensors()]

    def after_step(self, saved: list[torch.Tensor]) -> None:
        if not self.deferred:
            return
        with torch.no_grad():
            for tensor, old in zip(self.state_tensors() + self.buffers, saved + self.saved_buffers):
                tensor.copy_(torch.where(self.bad, old, tensor))
        self.skipped += self.bad
        self.bad = None

    # -- at a metrics report ------------------------------------------------------------------------
    def report(self, where: str) -> int:
        """Device mode: how many steps were skipped since the last report (one host read); stops
        the run if on_nonfinite=stop. Host mode: 0 (it acted at once)."""
        if not self.device_side:
            return 0
        skipped = int(self.skipped.item())
        self.skipped.zero_()
        if skipped and self.on_nonfinite == "stop":
            raise NonFiniteLoss(f"the loss was not finite in {skipped} step(s) up to {where}; those steps left the "
                                f"weights unchanged. Lower the LR or set on_nonfinite=skip.")
        if skipped:
            self.accelerator.print(f"warning: skipped {skipped} step(s) with a non-finite loss up to {where}")
        return skipped
