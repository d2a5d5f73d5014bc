"""adv_train (Madry et al. 2018): the run's loss on the attack's examples only; one norm set."""
from __future__ import annotations

import torch

from train.methods.common import accuracy, make_adversarial, training_loss
from train.methods.record import Backward, Method, MethodSteps, StepContext, StepOutput


def step(ctx: StepContext, images: torch.Tensor, labels: torch.Tensor) -> MethodSteps:
    adversarial = make_adversarial(ctx, images, labels)
    logits = ctx.model(adversarial)
    loss = training_loss(ctx, logits, labels)
    yield Backward({"adv": loss})
    return StepOutput({"loss/adv": loss.detach(), "acc/adv": accuracy(logits, labels)}, adversarial)


METHOD = Method("adv_train", step, soft_targets=True,
                bench_cases={"adv_train_pgd1": ["method=adv_train", "attack=pgd1"]})
