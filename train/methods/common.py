"""What the methods' steps share: losses and metrics, the training attack, dual-norm forwards and
the per-group gradient scale."""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from models.dual_norm import AUX, MAIN, route_parameters, use_norm
from train.attacks import build_attack, random_wrong_class
from train.batch_augment import dominant_label, random_unmixed_class
from train.methods.record import StepContext


def cross_entropy(ctx: StepContext, logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean"):
    """Class indices: with cfg.label_smoothing. Class probabilities (mixed targets, whose smoothing
    timm's Mixup already applied): the soft-target cross-entropy, timm's SoftTargetCrossEntropy."""
    smoothing = 0.0 if labels.is_floating_point() else ctx.cfg.label_smoothing
    return F.cross_entropy(logits.float(), labels, label_smoothing=smoothing, reduction=reduction)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Top-1 in percent; against the dominant label of mixed targets."""
    return (logits.argmax(1) == dominant_label(labels)).float().mean().detach() * 100


def two_part_metrics(clean_loss, adv_loss, clean_logits, adv_logits, clean_labels, adv_labels) -> dict:
    return {"loss/clean": clean_loss.detach(), "loss/adv": adv_loss.detach(),
            "acc/clean": accuracy(clean_logits, clean_labels), "acc/adv": accuracy(adv_logits, adv_labels)}


# ----------------------------------------------------------------------------- the training attack

@contextmanager
def eval_mode(model: nn.Module, enabled: bool = True):
    """The model in eval mode inside (BN running statistics, no dropout or stochastic depth), as
    the references' `model.eval()` before their attack; each module's mode restored after."""
    modes = [(m, m.training) for m in model.modules()] if enabled else []
    if enabled:
        model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def make_adversarial(ctx: StepContext, images: torch.Tensor, labels: torch.Tensor,
                     route: str = MAIN) -> torch.Tensor:
    """The configured attack (cfg.attack) on images, through the norms of `route`, with the model
    in train mode (batch statistics) or, attack.bn_mode=eval, in eval mode. Untargeted it ascends
    the loss of `labels` (class probabilities too: the soft-target loss); targeted it descends to a
    random wrong class (mixed targets: a random class in neither of the two mixed labels)."""
    attack_cfg = ctx.cfg.attack
    targets = labels
    if attack_cfg.targeted:
        mixed = labels.is_floating_point()
        targets = random_unmixed_class(labels) if mixed else random_wrong_class(labels, ctx.num_classes)
    attack = build_attack(attack_cfg, targeted=attack_cfg.targeted)
    with use_norm(ctx.attack_model, route), eval_mode(ctx.attack_model, attack_cfg.bn_mode == "eval"):
        return attack(ctx.attack_model, images, targets)


def attack_source(ctx: StepContext, images: torch.Tensor, labels: torch.Tensor, mix_attacked: bool):
    """What a dual-norm method attacks: the batch it was given, or, with Mixup/CutMix on and
    mix_attacked false (the Fast AdvProp authors' default), the batch before the mix."""
    if ctx.unmixed is None or mix_attacked:
        return images, labels
    return ctx.unmixed


# ----------------------------------------------------------------------------- dual norms

# Clean and adversarial images take two forwards (main, then aux norms) and one backward rather than
# one concatenated forward with a split route: splitting and re-joining the batch at every norm layer
# costs ~20% of a step on CPU, for no fewer FLOPs.

def main_and_aux_forward(ctx: StepContext, clean: torch.Tensor, adversarial: torch.Tensor):
    clean_logits = ctx.model(clean)
    with use_norm(ctx.attack_model, AUX):
        adv_logits = ctx.model(adversarial)
    return clean_logits, adv_logits


def per_group_scales(ctx: StepContext, shared: float, main: float, aux: float) -> list:
    """Gradient factors that turn a backward of Σ w·ℓ / shared into each norm set's own average:
    main norms divided by their weighted image count `main`, aux norms by `aux` (train/methods/__init__.py)."""
    scales = [(route_parameters(ctx.attack_model, MAIN), shared / main)]
    if aux > 0:
        scales.append((route_parameters(ctx.attack_model, AUX), shared / aux))
    return scales
