"""No non-finite value reaches the weights, the optimizer state or the BN statistics.

A step is not kept when its loss terms are not all finite (on any process), or when its optimizer
step leaves a parameter, an optimizer-state tensor or a BN statistic non-finite (an LR that
overflows, an optimizer division by zero). With on_nonfinite=stop the run then stops (exit 3)
with the weights of the last kept step; with skip it goes on. Two ways to know, chosen by
nonfinite_check (auto: device on CUDA, host elsewhere):

  host    each Backward's terms are checked before they are backpropagated, and the weights after
          the optimizer step (a device→host read each, free on a CPU). A bad loss is undone at once:
          buffers restored, gradients dropped, no optimizer step. A bad optimizer step stops the
          run before anything saves it (stop), or is given back from copies made before it (skip:
          the copies cost about one pass over the weights and optimizer state per step).
  device  nothing waits for the GPU: the flag (bad loss, or any weight non-finite after the step:
          one fused norm over the tensors) stays on the device, the step runs, and afterwards every
          parameter, optimizer-state tensor and buffer takes back its value from before the step
          wherever the flag is set (torch.where: NaN-proof). The host reads the count of skipped
          steps at the next metrics report, where it syncs anyway; `stop` stops there.
          The run's first optimizer step is checked on the host: optimizers create their state
          (momentum, RMSprop's averages) in it, and a state that did not exist has no value to
          take back.
"""
from __future__ import annotations

import torch

from train.faults import NonFiniteLoss, any_process


def all_finite(tensors: list[torch.Tensor]) -> torch.Tensor:
    """A bool scalar on the tensors' device: every element of every floating tensor is finite.
    No host sync. The L2 norm (accumulated in float32) is non-finite exactly when an element is,
    or when the squares overflow (|w| ≳ 1e19: weights whose forward overflows anyway)."""
    groups: dict[torch.dtype, list[torch.Tensor]] = {}
    for tensor in tensors:
        if tensor.is_floating_point() and tensor.numel():
            groups.setdefault(torch.float64 if tensor.dtype == torch.float64 else torch.float32, []).append(tensor)
    finite = torch.ones((), dtype=torch.bool, device=tensors[0].device if tensors else None)
    for dtype, group in groups.items():
        finite &= torch.stack(torch._foreach_norm(group, 2, dtype=dtype)).isfinite().all()
    return finite


class StepGuard:
    def __init__(self, model: torch.nn.Module, optimizer, accelerator, *, mode: str, on_nonfinite: str):
        self.model, self.optimizer, self.accelerator = model, optimizer, accelerator
        self.device_side = mode == "device" or (mode == "auto" and accelerator.device.type == "cuda")
        self.on_nonfinite = on_nonfinite
        self.buffers: list[torch.Tensor] = []
        self.saved_buffers: list[torch.Tensor] = []
        self.deferred = False  # this step is checked on the device
        self.bad = None  # device: this step's flag (bool scalar)
        self.had_state = False  # the optimizer had its state before this step
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

    # -- around the optimizer step --------------------------------------------------------------------
    def state_tensors(self) -> list[torch.Tensor]:
        tensors = [p for group in self.optimizer.param_groups for p in group["params"]]
        for state in self.optimizer.state.values():
            tensors += [t for t in state.values() if torch.is_tensor(t)]
        return tensors

    def before_step(self) -> list[torch.Tensor]:
        """Copies of what the optimizer step changes, where a bad step has to be given back (device
        mode, and host mode with on_nonfinite=skip; a host-mode stop ends the run unsaved instead)."""
        self.had_state = bool(self.optimizer.state)
        if not self.deferred and self.on_nonfinite == "stop":
            return []
        return [t.detach().clone() for t in self.state_tensors()]

    def after_step(self, saved: list[torch.Tensor]) -> bool:
        """After optimizer.step(). Device mode: folds "a weight is not finite" into the step's flag
        and makes a flagged step a no-op, on the device; True. Host mode: False when the step left
        a non-finite value on some process (given back if `saved` holds the copies)."""
        tensors = self.state_tensors()
        finite = all_finite(tensors + self.buffers)
        if self.deferred:
            bad = self.bad | ~finite
            if self.accelerator.num_processes > 1:  # one bad shard makes the step bad everywhere
                bad = self.accelerator.reduce(bad.int(), "sum") > 0
            with torch.no_grad():
                for tensor, old in zip(tensors + self.buffers, saved + self.saved_buffers):
                    tensor.copy_(torch.where(bad, old, tensor))
            self.skipped += bad
            self.bad = None
            return True
        if not any_process(not bool(finite), self.accelerator):
            return True
        if saved:
            self.give_back(saved)
        return False

    def give_back(self, saved: list[torch.Tensor]) -> None:
        """Host mode: parameters, optimizer state and buffers as they were before the step."""
        with torch.no_grad():
            if not self.had_state:  # this step created the state: without it is how it was
                self.optimizer.state.clear()
            for tensor, old in [*zip(self.state_tensors(), saved), *zip(self.buffers, self.saved_buffers)]:
                tensor.copy_(old)

    # -- at a metrics report ------------------------------------------------------------------------
    def report(self, where: str) -> int:
        """Device mode: how many steps were skipped since the last report (one host read); stops
        the run if on_nonfinite=stop. Host mode: 0 (it acted at once)."""
        if not self.device_side:
            return 0
        skipped = int(self.skipped.item())
        self.skipped.zero_()
        if skipped and self.on_nonfinite == "stop":
            raise NonFiniteLoss(f"the loss or the weights were not finite in {skipped} step(s) up to {where}; those "
                                f"steps were undone: the weights are those of the last finite step. {ADVICE}")
        if skipped:
            self.accelerator.print(f"warning: skipped {skipped} step(s) with a non-finite loss or weights up to "
                                   f"{where}")
        return skipped


ADVICE = ("Lower the LR (in a new output_dir) or set on_nonfinite=skip (the same command then continues from the "
          "last checkpoint)")
