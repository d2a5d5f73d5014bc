"""Training methods: each is one function (ctx, images, labels) → StepOutput.

`images` are float [0, 1], channels-last, on the device; the loop does backward and the optimizer.
A new method is a function here plus its name in METHODS below (and in train/config.py).

    vanilla   cross-entropy on clean images, main BNs
    advprop   Xie et al. 2020: L(clean; main BNs) + L(PGD examples; aux BNs). The attack runs
              through the aux BNs; clean and adversarial halves then go through ONE forward with
              a split route, so the step costs one forward/backward of a 2B batch plus the attack.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from models.dual_bn import AUX, use_bn
from train.attacks import pgd, random_wrong_class


@dataclass
class StepContext:
    model: nn.Module  # as prepared by Accelerate (DDP, autocast): forward + backward go here
    attack_model: nn.Module  # the same weights unwrapped: attacks need no DDP gradient hooks
    cfg: object
    num_classes: int


@dataclass
class StepOutput:
    loss: torch.Tensor  # what the loop backpropagates
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # detached scalars
    adversarial: torch.Tensor | None = None  # for the image panel


def attack_kwargs(attack_cfg) -> dict:
    """The config's pixel units → [0, 1] units for pgd()."""
    return dict(eps=attack_cfg.eps / 255, step_size=attack_cfg.step_size / 255,
                steps=attack_cfg.steps, random_start=attack_cfg.random_start)


def make_adversarial(ctx: StepContext, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    attack = ctx.cfg.attack
    targets = random_wrong_class(labels, ctx.num_classes) if attack.targeted else labels
    return pgd(ctx.attack_model, images, targets, targeted=attack.targeted, **attack_kwargs(attack))


def cross_entropy(ctx: StepContext, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), labels, label_smoothing=ctx.cfg.label_smoothing)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return (logits.argmax(1) == labels).float().mean().detach() * 100


def vanilla(ctx: StepContext, images: torch.Tensor, labels: torch.Tensor) -> StepOutput:
    logits = ctx.model(images)
    loss = cross_entropy(ctx, logits, labels)
    return StepOutput(loss, {"loss/clean": loss.detach(), "acc/clean": accuracy(logits, labels)})


def advprop(ctx: StepContext, images: torch.Tensor, labels: torch.Tensor) -> StepOutput:
    with use_bn(ctx.attack_model, AUX):
        adversarial = make_adversarial(ctx, images, labels)
    n = len(images)
    with use_bn(ctx.attack_model, split=n):
        logits = ctx.model(torch.cat([images, adversarial]))
    clean_loss = cross_entropy(ctx, logits[:n], labels)
    adv_loss = cross_entropy(ctx, logits[n:], labels)
    metrics = {"loss/clean": clean_loss.detach(), "loss/adv": adv_loss.detach(),
               "acc/clean": accuracy(logits[:n], labels), "acc/adv": accuracy(logits[n:], labels)}
    return StepOutput(clean_loss + adv_loss, metrics, adversarial)


METHODS: dict[str, Callable[[StepContext, torch.Tensor, torch.Tensor], StepOutput]] = {
    "vanilla": vanilla,
    "advprop": advprop,
}
USES_DUAL_BN = {"advprop"}
