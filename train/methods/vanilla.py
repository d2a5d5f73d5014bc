"""vanilla: the run's loss (cross-entropy unless loss=bce) on clean images; the step every cost is measured against."""
from __future__ import annotations

import torch

from train.methods.common import accuracy, training_loss
from train.methods.record import Backward, Method, MethodSteps, StepContext, StepOutput


def step(ctx: StepContext, images: torch.Tensor, labels: torch.Tensor) -> MethodSteps:
    logits = ctx.model(images)
    loss = training_loss(ctx, logits, labels)
    yield Backward({"clean": loss})
    return StepOutput({"loss/clean": loss.detach(), "acc/clean": accuracy(logits, labels)})


METHOD = Method("vanilla", step, attacks=False, soft_targets=True, bench_cases={"vanilla": ["method=vanilla"]})
