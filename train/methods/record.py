"""What a training method is, in one record (Method), and what its step exchanges with the loop.

A method's step is a generator (ctx, images, labels) that yields Backward(terms) — the loss terms
to backpropagate, weights applied — and returns a StepOutput. The loop (train/loop.py) owns what
follows each Backward: the finiteness check of every term, loss scaling, gradient accumulation,
DDP synchronisation (on the last Backward of a step only), then the per-group gradient scales of
the StepOutput and the optimizer step. `images` are float [0, 1], channels-last, on the device; `labels` class indices
(N,), or with Mixup/CutMix on class probabilities (N, K) (train/batch_augment.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Generator

import torch
from torch import nn


def keep(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


@dataclass
class StepContext:
    model: nn.Module  # as prepared by Accelerate (DDP, autocast): forward + backward go here
    attack_model: nn.Module  # the same weights unwrapped: attacks need no DDP gradient hooks
    cfg: object
    num_classes: int
    # Several processes: this one's rank and how many there are, and a function that concatenates
    # a tensor over all of them (Accelerate's gather); fast_advprop shuffles rows across them.
    rank: int = 0
    world_size: int = 1
    gather: Callable[[torch.Tensor], torch.Tensor] = keep
    step: int = 0  # the optimizer step being made (the loop sets it): seeds the cross-process shuffle
    # With Mixup/CutMix on (train/batch_augment.py) the step's labels are class probabilities (N, K)
    # and this is the batch before the mix, (images, class indices), which the loop sets each step;
    # None: the batch is not mixed.
    unmixed: tuple[torch.Tensor, torch.Tensor] | None = None


@dataclass
class Backward:
    """What a method asks the loop to backpropagate: the sum of these loss terms."""
    terms: dict[str, torch.Tensor]  # name → scalar term, weights applied


@dataclass
class StepOutput:
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # detached scalars
    adversarial: torch.Tensor | None = None  # for the image panel
    # (parameters, factor): gradients the loop multiplies before the optimizer step (per-group scale)
    grad_scales: list[tuple[list[torch.Tensor], float]] = field(default_factory=list)
    source: torch.Tensor | None = None  # the images the attack started from (the panel's clean row); None: the batch


MethodSteps = Generator[Backward, None, StepOutput]
Check = tuple[bool, str, str]  # (holds, config key, what is wrong when it does not)


def one_backward(cfg) -> int:
    return 1


def no_checks(cfg) -> list[Check]:
    return []


@dataclass(frozen=True)
class Method:
    """Everything the trainer needs to know about a method; train/config.py (schema, defaults),
    train/config_checks.py (validation), train/run.py (model, DDP), train/loop.py (the step) and
    tools/bench_step.py read it.

    name             the config's `method=` value
    step             the generator above
    dual_norm        the model gets auxiliary norms (models/dual_norm.py) and the method routes them
    attacks          its step makes adversarial examples with cfg.attack (attack.steps must be ≥ 1)
    backwards        cfg → how many Backward the step yields. The loop runs all but the last without
                     DDP synchronisation; with more than one, DDP looks for parameters the last
                     leaves out (fast_advprop's adversarial forward does not reach the main norms)
    options          the dataclass of the method's own config node, cfg.<name> (None: none)
    checks           cfg → [(holds, key, problem)]: the values of its node (always), and what it
                     needs of the rest of the config (when it is the method)
    attack_defaults  attack keys the method sets under the recipe: a recipe or the command line
                     still overrides them, and a continued run keeps the values it was made with
    finalize         cfg → None: changes the validated config once (the resolved config keeps it)
    soft_targets     its step takes class probabilities (N, K) as labels and reads StepContext.unmixed
                     as it needs: data.mixup/cutmix may be on (a method without it is refused then)
    bench_cases      tools/bench_step.py: case name → config overrides
    """
    name: str
    step: Callable[..., MethodSteps]
    dual_norm: bool = False
    attacks: bool = True
    backwards: Callable[[object], int] = one_backward
    options: type | None = None
    checks: Callable[[object], list[Check]] = no_checks
    attack_defaults: dict = field(default_factory=dict)
    finalize: Callable[[object], None] | None = None
    soft_targets: bool = False
    bench_cases: dict[str, list[str]] = field(default_factory=dict)
