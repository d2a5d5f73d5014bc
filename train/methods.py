"""Training methods: each is a generator (ctx, images, labels) that yields what to backpropagate
and returns a StepOutput.

`images` are float [0, 1], channels-last, on the device. A method computes its losses and yields
Backward(terms): the loop (train/loop.py) owns everything that follows: the finiteness check of
every term, loss scaling, gradient accumulation, DDP synchronisation, the optimizer step. Most
methods yield once; fast_advprop yields twice, because the input gradient of its first backward
makes its adversarial examples. A new method is a generator here plus its entry in METHODS (the
config's `method=` names are METHODS' keys) and, if it routes norms, in USES_DUAL_NORM.

    vanilla         cross-entropy on clean images
    adv_train       Madry et al. 2018: cross-entropy on PGD examples only; one norm set
    goodfellow_mix  Goodfellow et al. 2015: α·J(x) + (1 − α)·J(x_adv); one norm set that sees clean and
                    adversarial images in one batch (the AdvProp paper's "adversarial training")
    advprop         Xie et al. 2020: J(x; main norms) + w·J(x_adv; aux norms), the attack through aux norms
    fast_advprop    Mei et al. 2022: 4:1 clean:adv split of the batch, one attack step whose forward
                    and backward also train the weights (aux norms), loss weights 1 / ½ / ½

Loss scale of the dual-norm methods (advprop, fast_advprop), as the Fast AdvProp authors' code
(meijieru/fast_advprop, imagenet.py train(), fast_advprop.py: "synchronizing parameter updating
speed") computes it: per-sample losses are summed with their weights, and each parameter's
gradient is divided by the weighted number of images that reached it:

    shared weights  Σ_i w_i·ℓ_i / Σ_i w_i           (every image counts once: vanilla's scale)
    main norms      mean over the clean images      (their only images)
    aux norms       Σ_adv w_i·ℓ_i / Σ_adv w_i       (the attacked and adversarial images)

For advprop (w = 1 for clean, advprop.adv_weight for adversarial images) this is the paper's
objective J(x) + w·J(x_adv) with the shared weights' gradient divided by 1 + w, as the public
implementations have it (Xie's concatenated 2B batch averaged once; Mei's AdvProp baseline): the
recipes' learning rates are those of vanilla training. For fast_advprop (B images, 4:1 split,
weights 1 / ½ / ½) the shared weights see ≈ 0.8·mean(clean) + 0.1·mean(attack) + 0.1·mean(adv).

Cost in units of one vanilla step (forward + backward of B images = 1): a PGD step with frozen
weights costs s (tools/bench_step.py measures it: ≈ 0.78 on CPU, 0.96 on an H100 in eager mode),
so advprop PGD-k ≈ 2 + s·k, adv_train ≈ 1 + s·k, fast_advprop ≈ 1 + adv_fraction.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Generator

import torch
import torch.nn.functional as F
from torch import nn

from models.dual_norm import AUX, MAIN, route_parameters, use_norm
from train.attacks import bn_eval, pgd, pgd_step, random_start_point, random_wrong_class


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


MethodSteps = Generator[Backward, None, StepOutput]


def attack_kwargs(attack_cfg) -> dict:
    """The config's pixel units → [0, 1] units for pgd()."""
    random_start = 1.0 - attack_cfg.clean_start_fraction if attack_cfg.random_start else False
    return dict(eps=attack_cfg.eps / 255, step_size=attack_cfg.step_size / 255,
                steps=attack_cfg.steps, random_start=random_start)


def make_adversarial(ctx: StepContext, images: torch.Tensor, labels: torch.Tensor,
                     route: str = MAIN) -> torch.Tensor:
    """The configured attack on images, through the norms of `route`."""
    attack = ctx.cfg.attack
    targets = random_wrong_class(labels, ctx.num_classes) if attack.targeted else labels
    with use_norm(ctx.attack_model, route), bn_eval(ctx.attack_model, attack.bn_mode == "eval"):
        return pgd(ctx.attack_model, images, targets, targeted=attack.targeted, **attack_kwargs(attack))


def cross_entropy(ctx: StepContext, logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean"):
    return F.cross_entropy(logits.float(), labels, label_smoothing=ctx.cfg.label_smoothing, reduction=reduction)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return (logits.argmax(1) == labels).float().mean().detach() * 100


def two_part_metrics(clean_loss, adv_loss, clean_logits, adv_logits, clean_labels, adv_labels) -> dict:
    return {"loss/clean": clean_loss.detach(), "loss/adv": adv_loss.detach(),
            "acc/clean": accuracy(clean_logits, clean_labels), "acc/adv": accuracy(adv_logits, adv_labels)}


# ----------------------------------------------------------------------------- one norm set

def vanilla(ctx: StepContext, images: torch.Tensor, labels: torch.Tensor) -> MethodSteps:
    logits = ctx.model(images)
    loss = cross_entropy(ctx, logits, labels)
    yield Backward({"clean": loss})
    return StepOutput({"loss/clean": loss.detach(), "acc/clean": accuracy(logits, labels)})


def adv_train(ctx: StepContext, images: torch.Tensor, labels: torch.Tensor) -> MethodSteps:
    adversarial = make_adversarial(ctx, images, labels)
    logits = ctx.model(adversarial)
    loss = cross_entropy(ctx, logits, labels)
    yield Backward({"adv": loss})
    return StepOutput({"loss/adv": loss.detach(), "acc/adv": accuracy(logits, labels)}, adversarial)


def goodfellow_mix(ctx: StepContext, images: torch.Tensor, labels: torch.Tensor) -> MethodSteps:
    alpha = ctx.cfg.goodfellow_mix.alpha
    adversarial = make_adversarial(ctx, images, labels)
    n = len(images)
    logits = ctx.model(torch.cat([images, adversarial]))  # one batch: BN statistics mix both kinds
    clean_loss = cross_entropy(ctx, logits[:n], labels)
    adv_loss = cross_entropy(ctx, logits[n:], labels)
    yield Backward({"clean": alpha * clean_loss, "adv": (1 - alpha) * adv_loss})
    return StepOutput(two_part_metrics(clean_loss, adv_loss, logits[:n], logits[n:], labels, labels), adversarial)


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
    main norms divided by their weighted image count `main`, aux norms by `aux` (module doc)."""
    scales = [(route_parameters(ctx.attack_model, MAIN), shared / main)]
    if aux > 0:
        scales.append((route_parameters(ctx.attack_model, AUX), shared / aux))
    return scales


def advprop(ctx: StepContext, images: torch.Tensor, labels: torch.Tensor) -> MethodSteps:
    weight = ctx.cfg.advprop.adv_weight
    adversarial = make_adversarial(ctx, images, labels, route=AUX)
    clean_logits, adv_logits = main_and_aux_forward(ctx, images, adversarial)
    clean_sum = cross_entropy(ctx, clean_logits, labels, "sum")
    adv_sum = cross_entropy(ctx, adv_logits, labels, "sum")
    n = len(images)
    shared = n * (1 + weight)  # every image counts once, the adversarial ones with their weight
    yield Backward({"clean": clean_sum / shared, "adv": weight * adv_sum / shared})
    metrics = two_part_metrics(clean_sum / n, adv_sum / n, clean_logits, adv_logits, labels, labels)
    return StepOutput(metrics, adversarial, per_group_scales(ctx, shared, main=n, aux=n * weight))


def fast_advprop(ctx: StepContext, images: torch.Tensor, labels: torch.Tensor) -> MethodSteps:
    """The last rows of the batch are attacked. Their attack step is a training forward: one
    backward gives both the weight gradient of the clean + attack loss and the input gradient
    that makes the adversarial examples, which are then shuffled across processes (the authors'
    --shuffle_before_train_adv: per-GPU BN statistics would otherwise leak labels) and trained on."""
    options, attack = ctx.cfg.fast_advprop, attack_kwargs(ctx.cfg.attack)
    n_adv = max(1, round(len(images) * options.adv_fraction))
    n = len(images) - n_adv  # clean rows
    clean_labels, adv_labels = labels[:n], labels[n:]
    source = images[n:]
    start = random_start_point(source, attack["eps"], attack["random_start"]) if attack["random_start"] \
        else source.clone()
    start.requires_grad_(True)
    clean_logits, attack_logits = main_and_aux_forward(ctx, images[:n], start)
    clean_sum = cross_entropy(ctx, clean_logits, clean_labels, "sum")
    attack_sum = cross_entropy(ctx, attack_logits, adv_labels, "sum")
    aux_count = n_adv * (options.attack_weight + options.adv_weight)
    shared = n + aux_count  # the weighted number of images behind the shared weights
    yield Backward({"clean": clean_sum / shared, "attack": options.attack_weight * attack_sum / shared})

    adversarial = pgd_step(start, source, start.grad, eps=attack["eps"], step_size=attack["step_size"],
                           targeted=False)
    with use_norm(ctx.attack_model, AUX):
        if attack["steps"] > 1:  # further steps are plain PGD steps (frozen weights)
            adversarial = pgd(ctx.attack_model, source, adv_labels, eps=attack["eps"],
                              step_size=attack["step_size"], steps=attack["steps"] - 1, start=adversarial)
        adversarial, adv_labels = shuffle_across_processes(ctx, adversarial, adv_labels)
        adv_logits = ctx.model(adversarial)
    adv_sum = cross_entropy(ctx, adv_logits, adv_labels, "sum")
    yield Backward({"adv": options.adv_weight * adv_sum / shared})

    metrics = two_part_metrics(clean_sum / n, adv_sum / n_adv, clean_logits, adv_logits, clean_labels, adv_labels)
    metrics["loss/attack"] = (attack_sum / n_adv).detach()
    return StepOutput(metrics, adversarial, per_group_scales(ctx, shared, main=n, aux=aux_count))


def shuffle_across_processes(ctx: StepContext, images: torch.Tensor, labels: torch.Tensor):
    """Rows of every process, permuted by a seed they all share (the run's seed and step), this
    process's share back. One process: a permutation of its own rows."""
    everyone_images, everyone_labels = ctx.gather(images.contiguous()), ctx.gather(labels)
    generator = torch.Generator().manual_seed(ctx.cfg.seed * 1_000_003 + ctx.step)
    order = torch.randperm(len(everyone_labels), generator=generator).to(labels.device)
    mine = order[ctx.rank * len(labels):(ctx.rank + 1) * len(labels)]
    return everyone_images[mine].contiguous(memory_format=torch.channels_last), everyone_labels[mine]


METHODS: dict[str, Callable[[StepContext, torch.Tensor, torch.Tensor], MethodSteps]] = {
    "vanilla": vanilla,
    "adv_train": adv_train,
    "goodfellow_mix": goodfellow_mix,
    "advprop": advprop,
    "fast_advprop": fast_advprop,
}
USES_DUAL_NORM = {"advprop", "fast_advprop"}
# Backward requests a method yields per step (the others: one). The loop runs all but the last
# without DDP synchronisation, and DDP must then allow parameters unused by the last one (the
# main norms take no part in fast_advprop's adversarial forward).
BACKWARDS = {"fast_advprop": 2}
