"""advprop (Xie et al. 2020): J(x; main norms) + w·J(x_adv; aux norms), the attack through the aux norms.

The attack is the references' (tingxueronghua/pytorch-classification-advprop, written with Xie's
guidance; meijieru/fast_advprop's AdvProp baseline): by default it sees the model in eval mode
(the aux BNs' running statistics; `self.eval()` before their attack, Mei's default without
--attack_in_train; tingxueronghua found eval mode better on ImageNet), its random start is their
one coin per batch, and it steps by max(step_size, ε/steps). attack.bn_mode=train,
attack.start_rule=image and attack.reach_eps=false give the other choices. Any attack kind trains it:
`attack=pyramid` with advprop.matched_masks=true and attack.bn_mode=train is Pyramid Adversarial
Training with auxiliary norms (configs/vit_b16_pyramid_advprop.yaml).

Loss scale (train/methods/__init__.py): shared weights (Σ clean + w·Σ adv) / (B + w·B), main norms
the clean mean, aux norms the adversarial mean.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from models.dual_norm import AUX
from train.methods.common import (MatchedMasks, attack_source, main_and_aux_forward, make_adversarial,
                                  per_group_scales, training_loss, two_part_metrics)
from train.methods.record import Backward, Method, MethodSteps, StepContext, StepOutput

# the references' attack (module doc); a recipe or the command line may set any of them (an attack
# kind without such a key, as pyramid without start_rule, ignores it)
REFERENCE_ATTACK = {"bn_mode": "eval", "start_rule": "batch", "reach_eps": True}


@dataclass
class AdvPropConfig:
    adv_weight: float = 1.0  # weight of the adversarial loss term (Xie: 1)
    # With data.mixup/cutmix: false (the Fast AdvProp authors' default) mixes the clean pass only,
    # the attack and the adversarial pass take the batch before the mix and its labels; true attacks
    # the mixed images and trains the adversarial pass on them, against the mixed targets
    # (their --other_aug_on_attack with --other_aug_on_adv, one mix per batch)
    mix_attacked: bool = False
    # the same dropout and stochastic-depth masks for the clean pass, every attack step and the
    # adversarial pass of a step, new ones each step (PyramidAT's; with attack.bn_mode=train)
    matched_masks: bool = False


def step(ctx: StepContext, images: torch.Tensor, labels: torch.Tensor) -> MethodSteps:
    options = ctx.cfg.advprop
    weight = options.adv_weight
    masks = MatchedMasks(images.device) if options.matched_masks else None
    source, source_labels = attack_source(ctx, images, labels, options.mix_attacked)
    adversarial = make_adversarial(ctx, source, source_labels, route=AUX, masks=masks)
    clean_logits, adv_logits = main_and_aux_forward(ctx, images, adversarial, masks)
    clean_sum = training_loss(ctx, clean_logits, labels, "sum")
    adv_sum = training_loss(ctx, adv_logits, source_labels, "sum")
    n = len(images)
    shared = n * (1 + weight)  # every image counts once, the adversarial ones with their weight
    yield Backward({"clean": clean_sum / shared, "adv": weight * adv_sum / shared})
    metrics = two_part_metrics(clean_sum / n, adv_sum / n, clean_logits, adv_logits, labels, source_labels)
    return StepOutput(metrics, adversarial, per_group_scales(ctx, shared, main=n, aux=n * weight), source)


def checks(cfg) -> list:
    return [(cfg.advprop.adv_weight >= 0, "advprop.adv_weight", "must be ≥ 0")]


METHOD = Method(
    "advprop", step, dual_norm=True, options=AdvPropConfig, checks=checks, attack_defaults=REFERENCE_ATTACK,
    soft_targets=True,
    bench_cases={f"advprop_pgd{k}": ["method=advprop", f"attack=pgd{k}"] for k in (1, 3, 5)})
