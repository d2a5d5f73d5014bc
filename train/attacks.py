"""PGD on the device, with no side effects and no parameter gradients.

pgd(model, images, labels, eps=4/255, step_size=1/255, steps=5) → adversarial images, detached,
same shape/dtype/memory format as `images`, inside the ε-ball around them and inside [0, 1].
Untargeted: maximise cross-entropy to `labels`. Targeted: minimise it to `labels` (the caller
passes the targets; Xie et al. use a random wrong class, see random_wrong_class).
FGSM is pgd(steps=1, step_size=eps, random_start=False).

Speed and correctness:
- parameters are frozen during the attack: only the input gradient is computed (most of the cost
  of a training step's backward is the weight gradients);
- BN running statistics are not updated (BN still normalises with batch statistics in train mode;
  `bn_eval` makes the attack see running statistics instead). Of the norms a dual-norm model
  duplicates (models/dual_norm.py) only BatchNorm keeps running statistics: LayerNorm, GroupNorm
  and RMSNorm normalise each image by itself, the same in train and eval mode, so freezing their
  parameters is all they need;
- the loss is summed, not averaged, and taken in fp32: only the gradient's sign matters, and under
  fp16/bf16 autocast a 1/N-scaled gradient underflows to zero. The input stays an fp32 leaf, so
  the gradient reaching it is fp32 and the step is taken in fp32;
- no copies beyond one tensor per step, and the channels-last layout is kept throughout;
- the arithmetic of a step is torchattacks' (step, clamp δ to ±ε, clamp to [0, 1]), so with
  random_start=False the result equals the reference implementation.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn


def batch_norms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@contextmanager
def frozen(model: nn.Module):
    """No parameter gradients and no BN running-stat updates inside; everything restored after."""
    params = [p for p in model.parameters() if p.requires_grad]
    norms = [m for m in batch_norms(model) if m.track_running_stats]
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


@contextmanager
def bn_eval(model: nn.Module, enabled: bool = True):
    """BN layers in eval mode inside (running statistics), the rest of the model untouched."""
    norms = [m for m in batch_norms(model) if m.training] if enabled else []
    for m in norms:
        m.train(False)
    try:
        yield
    finally:
        for m in norms:
            m.train(True)


def random_wrong_class(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """A uniformly random class different from each label (Xie et al.'s attack targets)."""
    offset = torch.randint(1, num_classes, labels.shape, device=labels.device)
    return (labels + offset) % num_classes


def random_start_point(images: torch.Tensor, eps: float, fraction: float = 1.0) -> torch.Tensor:
    """Images moved to a uniform random point of the ε-ball (clamped to [0, 1]).

    fraction < 1: each image moves with that probability and otherwise stays at the clean image
    (Xie et al. start 20% of the batch from the clean image: fraction 0.8).
    """
    noise = torch.empty_like(images).uniform_(-eps, eps)
    if fraction < 1:
        moves = torch.rand(len(images), device=images.device) < fraction
        noise *= moves.view(-1, *[1] * (images.dim() - 1)).to(noise.dtype)
    return (images + noise).clamp_(0, 1)


def pgd_step(adv: torch.Tensor, images: torch.Tensor, grad: torch.Tensor, *, eps: float,
             step_size: float, targeted: bool) -> torch.Tensor:
    """One signed-gradient step from adv, projected to the ε-ball around images and to [0, 1]."""
    direction = -step_size if targeted else step_size
    adv = adv.detach() + direction * grad.sign()
    delta = torch.clamp(adv - images, min=-eps, max=eps)
    return torch.clamp(images + delta, min=0, max=1)


def pgd(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, eps: float,
        step_size: float, steps: int, random_start: bool | float = True, targeted: bool = False,
        start: torch.Tensor | None = None) -> torch.Tensor:
    """random_start: True/False, or the probability that an image starts at a random point.
    start: begin the iterations here instead (a point of the ε-ball; random_start is ignored)."""
    images = images.detach()
    if start is not None:
        adv = start.detach()
    elif random_start:
        adv = random_start_point(images, eps, float(random_start))
    else:
        adv = images  # the first step makes a new tensor: no copy needed
    with frozen(model), torch.enable_grad():
        for _ in range(steps):
            adv = adv.detach().requires_grad_(True)
            loss = F.cross_entropy(model(adv).float(), labels, reduction="sum")
            (grad,) = torch.autograd.grad(loss, adv)
            adv = pgd_step(adv, images, grad, eps=eps, step_size=step_size, targeted=targeted)
    return adv.detach()
