"""Training methods: each is one function (ctx, images, labels) → StepOutput.

`images` are float [0, 1], channels-last, on the device; the loop backpropagates StepOutput.loss
and steps the optimizer. A new method is a function here plus its entry in METHODS (the config's
`method=` names are METHODS' keys) and, if it routes BNs, in USES_DUAL_BN.

    vanilla         cross-entropy on clean images
    adv_train       Madry et al. 2018: cross-entropy on PGD examples only; one BN set
    goodfellow_mix  Goodfellow et al. 2015: α·J(x) + (1 − α)·J(x_adv); one BN set that sees clean and
                    adversarial images in one batch (the AdvProp paper's "adversarial training")
    advprop         Xie et al. 2020: J(x; main BNs) + w·J(x_adv; aux BNs), the attack through aux BNs
    fast_advprop    Mei et al. 2022: 4:1 clean:adv split of the batch, one attack step whose forward
                    and backward also train the weights (aux BNs), loss 1·clean + ½·attack + ½·adv

Cost in units of one vanilla step (forward + backward of B images = 1): a PGD step with frozen
weights (a forward and the input gradient, no weight gradients) costs s, so advprop PGD-k ≈ 2 + s·k,
adv_train ≈ 1 + s·k, fast_advprop ≈ 1 + adv_fraction (its attack step is part of the training).
The cost targets assume s = ½; measured on CPU (mkldnn, resnet18) s ≈ 0.75–0.8: every conv's
input gradient costs about its forward, the stem's (3 output channels) 2.5× its forward.
tools/bench_step.py prints s.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, ContextManager

import torch
import torch.nn.functional as F
from torch import nn

from models.dual_bn import AUX, MAIN, use_bn
from train.attacks import bn_eval, pgd, pgd_step, random_start_point, random_wrong_class


def plain_backward(loss: torch.Tensor) -> None:
    loss.backward()


@dataclass
class StepContext:
    model: nn.Module  # as prepared by Accelerate (DDP, autocast): forward + backward go here
    attack_model: nn.Module  # the same weights unwrapped: attacks need no DDP gradient hooks
    cfg: object
    num_classes: int
    # For methods that backpropagate part of their loss themselves (fast_advprop): the loop's
    # backward (loss scaling, accumulation) and a context in which DDP accumulates without syncing.
    backward: Callable[[torch.Tensor], None] = plain_backward
    no_sync: Callable[[], ContextManager] = contextlib.nullcontext


@dataclass
class StepOutput:
    loss: torch.Tensor  # what the loop backpropagates
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # detached scalars
    adversarial: torch.Tensor | None = None  # for the image panel


def attack_kwargs(attack_cfg) -> dict:
    """The config's pixel units → [0, 1] units for pgd()."""
    random_start = 1.0 - attack_cfg.clean_start_fraction if attack_cfg.random_start else False
    return dict(eps=attack_cfg.eps / 255, step_size=attack_cfg.step_size / 255,
                steps=attack_cfg.steps, random_start=random_start)


def make_adversarial(ctx: StepContext, images: torch.Tensor, labels: torch.Tensor,
                     route: str = MAIN) -> torch.Tensor:
    """The configured attack on images, through the BNs of `route`."""
    attack = ctx.cfg.attack
    targets = random_wrong_class(labels, ctx.num_classes) if attack.targeted else labels
    with use_bn(ctx.attack_model, route), bn_eval(ctx.attack_model, attack.bn_mode == "eval"):
        return pgd(ctx.attack_model, images, targets, targeted=attack.targeted, **attack_kwargs(attack))


def cross_entropy(ctx: StepContext, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), labels, label_smoothing=ctx.cfg.label_smoothing)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return (logits.argmax(1) == labels).float().mean().detach() * 100


def two_part_metrics(clean_loss, adv_loss, clean_logits, adv_logits, clean_labels, adv_labels) -> dict:
    return {"loss/clean": clean_loss.detach(), "loss/adv": adv_loss.detach(),
            "acc/clean": accuracy(clean_logits, clean_labels), "acc/adv": accuracy(adv_logits, adv_labels)}


# ----------------------------------------------------------------------------- one BN set

def vanilla(ctx: StepContext, images: torch.Tensor, labels: torch.Tensor) -> StepOutput:
    logits = ctx.model(images)
    loss = cross_entropy(ctx, logits, labels)
    return StepOutput(loss, {"loss/clean": loss.detach(), "acc/clean": accuracy(logits, labels)})


def adv_train(ctx: StepContext, images: torch.Tensor, labels: torch.Tensor) -> StepOutput:
    adversarial = make_adversarial(ctx, images, labels)
    logits = ctx.model(adversarial)
    loss = cross_entropy(ctx, logits, labels)
    return StepOutput(loss, {"loss/adv": loss.detach(), "acc/adv": accuracy(logits, labels)}, adversarial)


def goodfellow_mix(ctx: StepContext, images: torch.Tensor, labels: torch.Tensor) -> StepOutput:
    alpha = ctx.cfg.goodfellow_mix.alpha
    adversarial = make_adversarial(ctx, images, labels)
    n = len(images)
    logits = ctx.model(torch.cat([images, adversarial]))  # one batch: BN statistics mix both kinds
    clean_loss = cross_entropy(ctx, logits[:n], labels)
    adv_loss = cross_entropy(ctx, logits[n:], labels)
    metrics = two_part_metrics(clean_loss, adv_loss, logits[:n], logits[n:], labels, labels)
    return StepOutput(alpha * clean_loss + (1 - alpha) * adv_loss, metrics, adversarial)


# ----------------------------------------------------------------------------- dual BN

# Clean and adversarial images take two forwards (main, then aux BNs) and one backward rather than
# one concatenated forward with a split route: splitting and re-joining the batch at every BN layer
# costs ~20% of a step on CPU, for no fewer FLOPs.

def main_and_aux_forward(ctx: StepContext, clean: torch.Tensor, adversarial: torch.Tensor):
    clean_logits = ctx.model(clean)
    with use_bn(ctx.attack_model, AUX):
        adv_logits = ctx.model(adversarial)
    return clean_logits, adv_logits


def advprop(ctx: StepContext, images: torch.Tensor, labels: torch.Tensor) -> StepOutput:
    adversarial = make_adversarial(ctx, images, labels, route=AUX)
    clean_logits, adv_logits = main_and_aux_forward(ctx, images, adversarial)
    clean_loss = cross_entropy(ctx, clean_logits, labels)
    adv_loss = cross_entropy(ctx, adv_logits, labels)
    metrics = two_part_metrics(clean_loss, adv_loss, clean_logits, adv_logits, labels, labels)
    return StepOutput(clean_loss + ctx.cfg.advprop.adv_weight * adv_loss, metrics, adversarial)


def fast_advprop(ctx: StepContext, images: torch.Tensor, labels: torch.Tensor) -> StepOutput:
    """The last rows of the batch are attacked. Their attack step is a training forward: one
    backward gives both the weight gradient of (clean + w_attack·attack) loss and the input
    gradient that makes the adversarial examples. Only the adversarial forward is extra."""
    options, attack = ctx.cfg.fast_advprop, attack_kwargs(ctx.cfg.attack)
    n = len(images) - max(1, round(len(images) * options.adv_fraction))  # clean rows
    clean_labels, adv_labels = labels[:n], labels[n:]
    source = images[n:]
    start = random_start_point(source, attack["eps"], attack["random_start"]) if attack["random_start"] \
        else source.clone()
    start.requires_grad_(True)
    with ctx.no_sync():  # DDP: this backward only accumulates; the loop's backward all-reduces
        clean_logits, attack_logits = main_and_aux_forward(ctx, images[:n], start)
        clean_loss = cross_entropy(ctx, clean_logits, clean_labels)
        attack_loss = cross_entropy(ctx, attack_logits, adv_labels)
        ctx.backward(clean_loss + options.attack_weight * attack_loss)
    adversarial = pgd_step(start, source, start.grad, eps=attack["eps"], step_size=attack["step_size"],
                           targeted=False)
    with use_bn(ctx.attack_model, AUX):
        if attack["steps"] > 1:  # further steps are plain PGD steps (frozen weights)
            adversarial = pgd(ctx.attack_model, source, adv_labels, eps=attack["eps"],
                              step_size=attack["step_size"], steps=attack["steps"] - 1, start=adversarial)
        adv_logits = ctx.model(adversarial)
    adv_loss = cross_entropy(ctx, adv_logits, adv_labels)
    metrics = two_part_metrics(clean_loss, adv_loss, clean_logits, adv_logits, clean_labels, adv_labels)
    metrics["loss/attack"] = attack_loss.detach()
    return StepOutput(options.adv_weight * adv_loss, metrics, adversarial)


METHODS: dict[str, Callable[[StepContext, torch.Tensor, torch.Tensor], StepOutput]] = {
    "vanilla": vanilla,
    "adv_train": adv_train,
    "goodfellow_mix": goodfellow_mix,
    "advprop": advprop,
    "fast_advprop": fast_advprop,
}
USES_DUAL_BN = {"advprop", "fast_advprop"}
