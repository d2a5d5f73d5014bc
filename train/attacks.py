"""PGD on the device, with no side effects and no parameter gradients.

pgd(model, images, labels, eps=4/255, step_size=1/255, steps=5) → adversarial images, detached,
same shape/dtype/memory format as `images`, inside the ε-ball around them and inside [0, 1].
Untargeted: maximise cross-entropy to `labels`. Targeted: minimise it to `labels` (the caller
passes the targets; Xie et al. use a random wrong class, see random_wrong_class).

Speed and correctness:
- parameters are frozen during the attack: only the input gradient is computed (most of the cost
  of a training step's backward is the weight gradients);
- BN running statistics are not updated (BN still normalises with batch statistics in train mode);
- the loss is summed, not averaged, and taken in fp32: only the gradient's sign matters, and under
  fp16/bf16 autocast a 1/N-scaled gradient underflows to zero;
- the arithmetic of a step is torchattacks' (step, clamp δ to ±ε, clamp to [0, 1]), so with
  random_start=False the result equals the reference implementation.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn


@contextmanager
def frozen(model: nn.Module):
    """No parameter gradients and no BN running-stat updates inside; everything restored after."""
    params = [p for p in model.parameters() if p.requires_grad]
    norms = [m for m in model.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    for p in params:
        p.requires_grad_(False)
    for m in norms:  # train mode keeps batch statistics but stops touching the running buffers
        m.track_running_stats = False
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)
        for m in norms:
            m.track_running_stats = True


def random_wrong_class(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """A uniformly random class different from each label (Xie et al.'s attack targets)."""
    offset = torch.randint(1, num_classes, labels.shape, device=labels.device)
    return (labels + offset) % num_classes


def pgd(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, eps: float,
        step_size: float, steps: int, random_start: bool = True, targeted: bool = False) -> torch.Tensor:
    images = images.detach()
    adv = images.clone()
    if random_start:
        adv = (adv + torch.empty_like(adv).uniform_(-eps, eps)).clamp_(0, 1)
    direction = -1.0 if targeted else 1.0
    with frozen(model), torch.enable_grad():
        for _ in range(steps):
            adv.requires_grad_(True)
            loss = F.cross_entropy(model(adv).float(), labels, reduction="sum")
            (grad,) = torch.autograd.grad(loss, adv)
            adv = adv.detach() + direction * step_size * grad.sign()
            delta = torch.clamp(adv - images, min=-eps, max=eps)
            adv = torch.clamp(images + delta, min=0, max=1)
    return adv.detach()
