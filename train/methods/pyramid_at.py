"""pyramid_at (Herrmann et al., "Pyramid Adversarial Training Improves ViT Performance", CVPR
2022): J(x) + w·J(x_adv) through the same norms, one backward; with attack=pyramid their attack.

As the authors' code (google-research/scenic, projects/adversarialtraining,
classification_adversarialtraining_trainer.py train_step, mode advprop_pyramid): the attack and the
adversarial pass take the batch the clean pass takes (with Mixup on, the mixed images; the
adversarial loss against the mixed targets), the attack is targeted (a random class per image) on
the model in train mode with frozen weights, and the clean pass, every attack step and the
adversarial pass draw the same dropout and stochastic-depth masks, new ones each step
(MatchedMasks: scenic's one dropout key per step). Their ViT has one set of LayerNorms: this
method's model has no auxiliary norms (method=advprop attack=pyramid is the dual-norm variant).

Loss: clean + adv_weight × adversarial (theirs: adv_loss_weight 1.0), each the run's loss averaged
over the batch (their recipe: loss=bce bce_sum_classes=true, scenic's sigmoid cross-entropy).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from train.methods.common import MatchedMasks, make_adversarial, training_loss, two_part_metrics
from train.methods.record import Backward, Method, MethodSteps, StepContext, StepOutput


@dataclass
class PyramidATConfig:
    adv_weight: float = 1.0  # weight of the adversarial loss term (their adv_loss_weight)


def step(ctx: StepContext, images: torch.Tensor, labels: torch.Tensor) -> MethodSteps:
    masks = MatchedMasks(images.device)
    adversarial = make_adversarial(ctx, images, labels, masks=masks)
    with masks.same():
        clean_logits = ctx.model(images)
    with masks.same():
        adv_logits = ctx.model(adversarial)
    clean_loss = training_loss(ctx, clean_logits, labels)
    adv_loss = training_loss(ctx, adv_logits, labels)
    yield Backward({"clean": clean_loss, "adv": ctx.cfg.pyramid_at.adv_weight * adv_loss})
    return StepOutput(two_part_metrics(clean_loss, adv_loss, clean_logits, adv_logits, labels, labels), adversarial)


def checks(cfg) -> list:
    return [(cfg.pyramid_at.adv_weight >= 0, "pyramid_at.adv_weight", "must be ≥ 0")]


METHOD = Method("pyramid_at", step, options=PyramidATConfig, checks=checks, soft_targets=True,
                bench_cases={"pyramid_at": ["method=pyramid_at", "attack=pyramid"]})
