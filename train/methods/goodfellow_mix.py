"""goodfellow_mix (Goodfellow et al. 2015): α·J(x) + (1 − α)·J(x_adv), one norm set that sees clean and
adversarial images in one batch (the AdvProp paper's "adversarial training" baseline)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from train.methods.common import make_adversarial, training_loss, two_part_metrics
from train.methods.record import Backward, Method, MethodSteps, StepContext, StepOutput


@dataclass
class GoodfellowMixConfig:
    alpha: float = 0.5  # loss = α·J(x) + (1 − α)·J(x_adv)


def step(ctx: StepContext, images: torch.Tensor, labels: torch.Tensor) -> MethodSteps:
    alpha = ctx.cfg.goodfellow_mix.alpha
    adversarial = make_adversarial(ctx, images, labels)
    n = len(images)
    logits = ctx.model(torch.cat([images, adversarial]))  # one batch: BN statistics mix both kinds
    clean_loss = training_loss(ctx, logits[:n], labels)
    adv_loss = training_loss(ctx, logits[n:], labels)
    yield Backward({"clean": alpha * clean_loss, "adv": (1 - alpha) * adv_loss})
    return StepOutput(two_part_metrics(clean_loss, adv_loss, logits[:n], logits[n:], labels, labels), adversarial)


def checks(cfg) -> list:
    return [(0 <= cfg.goodfellow_mix.alpha <= 1, "goodfellow_mix.alpha", "must be in [0, 1]")]


METHOD = Method("goodfellow_mix", step, options=GoodfellowMixConfig, checks=checks, soft_targets=True,
                bench_cases={"goodfellow_mix_pgd1": ["method=goodfellow_mix", "attack=pgd1"]})
