"""fast_advprop (Mei et al., ICLR 2022): a 4:1 clean:adv split of the batch; every attack iteration
is a training step; loss weights 1 / ½ / ½.

As the authors' code (meijieru/fast_advprop, imagenet.py train() with --reuse_mid_grad
--attack_in_train --original_attack): the last rows of the batch are attacked with untargeted PGD
through the aux norms in train mode, and the forward and backward of *each* of its attack.steps
iterations also train the shared weights and the aux norms (weight attack_weight; the input
gradient of that same backward makes the next iterate: the attack kind hands each iterate over,
train/attacks/seam.py, so any kind trains it, attack=pyramid too). The last iterate is the adversarial
batch, which is shuffled across processes (their --shuffle_before_train_adv: per-GPU BN
statistics would otherwise leak labels) and trained on with weight adv_weight. A step therefore
yields attack.steps + 1 Backward requests (the first also holds the clean loss).

Loss scale (their use_param_sets counts; train/methods/__init__.py): each parameter's gradient is
divided by the weighted number of images that reached it, an attacked row counting attack_weight
once per iteration: shared weights n_clean + k·n_adv·attack_weight + n_adv·adv_weight, main norms
n_clean, aux norms k·n_adv·attack_weight + n_adv·adv_weight.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from models.dual_norm import AUX, use_norm
from train.attacks import attack_steps, kind_of
from train.methods.common import attack_source, per_group_scales, training_loss, two_part_metrics
from train.methods.record import Backward, Method, MethodSteps, StepContext, StepOutput

# the authors' attacker (train/methods/advprop.py); its BN mode is train: its attack step trains
REFERENCE_ATTACK = {"start_rule": "batch", "reach_eps": True}


@dataclass
class FastAdvPropConfig:
    adv_fraction: float = 0.2  # share of the batch that is attacked (Mei et al.: 4:1 clean:adv)
    attack_weight: float = 0.5  # weight of each attack iteration's loss, whose gradients are reused
    adv_weight: float = 0.5  # weight of the adversarial examples' loss
    # The authors' --exact_same_training_budget: epochs and the schedule's epoch counts divided by
    # the images a step trains on per vanilla image, 1 + adv_fraction·attack.steps, so the run costs
    # what vanilla training costs.
    equal_budget: bool = False
    # With data.mixup/cutmix: false (the authors' default) mixes the clean rows only, the attacked rows
    # are the batch's before the mix, with their labels; true attacks and trains the attacked rows
    # as mixed, against the mixed targets (their --other_aug_on_attack and --other_aug_on_adv, with
    # one mix per batch instead of a new draw per attack iteration)
    mix_attacked: bool = False


def step(ctx: StepContext, images: torch.Tensor, labels: torch.Tensor) -> MethodSteps:
    options, node = ctx.cfg.fast_advprop, ctx.cfg.attack
    n_adv = max(1, round(len(images) * options.adv_fraction))
    n = len(images) - n_adv  # clean rows
    attacked, attacked_labels = attack_source(ctx, images, labels, options.mix_attacked)
    clean_labels, adv_labels, source = labels[:n], attacked_labels[n:], attacked[n:]
    iterations = attack_steps(node)
    aux_count = n_adv * (iterations * options.attack_weight + options.adv_weight)
    shared = n + aux_count  # the weighted number of images behind the shared weights

    clean_logits = ctx.model(images[:n])
    clean_sum = training_loss(ctx, clean_logits, clean_labels, "sum")
    attack = kind_of(node).iterates(node, source, targeted=False)
    attack_sums = []
    for iteration, iterate in enumerate(attack):  # the training backward fills iterate.grad
        with use_norm(ctx.attack_model, AUX):
            attack_sum = training_loss(ctx, ctx.model(iterate), adv_labels, "sum")
        terms = {"clean": clean_sum / shared} if iteration == 0 else {}
        yield Backward({**terms, "attack": options.attack_weight * attack_sum / shared})
        attack_sums.append(attack_sum.detach())

    adversarial = panel = attack.adversarial  # the panel: before the shuffle, row for row the attacked source
    with use_norm(ctx.attack_model, AUX):
        adversarial, adv_labels = shuffle_across_processes(ctx, adversarial, adv_labels)
        adv_logits = ctx.model(adversarial)
    adv_sum = training_loss(ctx, adv_logits, adv_labels, "sum")
    yield Backward({"adv": options.adv_weight * adv_sum / shared})

    metrics = two_part_metrics(clean_sum / n, adv_sum / n_adv, clean_logits, adv_logits, clean_labels, adv_labels)
    metrics["loss/attack"] = torch.stack(attack_sums).mean() / n_adv  # mean over the iterations
    return StepOutput(metrics, panel, per_group_scales(ctx, shared, main=n, aux=aux_count), source)


def shuffle_across_processes(ctx: StepContext, images: torch.Tensor, labels: torch.Tensor):
    """Rows of every process, permuted by a seed they all share (the run's seed and step), this
    process's share back. One process: a permutation of its own rows."""
    everyone_images, everyone_labels = ctx.gather(images.contiguous()), ctx.gather(labels)
    generator = torch.Generator().manual_seed(ctx.cfg.seed * 1_000_003 + ctx.step)
    order = torch.randperm(len(everyone_labels), generator=generator).to(labels.device)
    mine = order[ctx.rank * len(labels):(ctx.rank + 1) * len(labels)]
    return everyone_images[mine].contiguous(memory_format=torch.channels_last), everyone_labels[mine]


def backwards(cfg) -> int:
    return attack_steps(cfg.attack) + 1


def checks(cfg) -> list:
    fast, attack = cfg.fast_advprop, cfg.attack
    chosen = cfg.method == "fast_advprop"
    return [
        (0 < fast.adv_fraction < 1, "fast_advprop.adv_fraction", "must be in (0, 1)"),
        (fast.attack_weight > 0, "fast_advprop.attack_weight", "must be > 0 (its gradient is the attack's direction)"),
        (fast.adv_weight >= 0, "fast_advprop.adv_weight", "must be ≥ 0"),
        # its attack gradient is the training gradient: the true labels' loss, in train mode
        (not (chosen and attack.targeted), "attack.targeted",
         "must be false with method=fast_advprop (the attack's gradient is reused as the training "
         "gradient, so the attack maximises the true labels' loss): add attack.targeted=false"),
        (not (chosen and attack.bn_mode != "train"), "attack.bn_mode",
         "must be train with method=fast_advprop (the attack's forward is a training forward)"),
    ]


def apply_equal_budget(cfg) -> None:
    """Fast AdvProp at vanilla's cost (the authors' get_exact_same_budget, whose formula is for one
    attack step): epochs and the schedule's epoch counts divided by 1 + adv_fraction·steps. The
    resolved config keeps the divided values and equal_budget=false, so it reads (and resumes) as
    what runs, and is never divided twice."""
    if not cfg.fast_advprop.equal_budget:
        return
    scale = 1 + cfg.fast_advprop.adv_fraction * attack_steps(cfg.attack)
    before = cfg.epochs
    cfg.epochs = max(1, round(cfg.epochs / scale))
    cfg.schedule.warmup_epochs /= scale
    cfg.schedule.decay_epochs /= scale
    cfg.fast_advprop.equal_budget = False
    print(f"fast_advprop.equal_budget: epochs {before} → {cfg.epochs}, schedule epochs ÷ {scale:g}")


METHOD = Method(
    "fast_advprop", step, dual_norm=True, backwards=backwards, options=FastAdvPropConfig, checks=checks,
    attack_defaults=REFERENCE_ATTACK, finalize=apply_equal_budget, soft_targets=True,
    bench_cases={"fast_advprop": ["method=fast_advprop", "attack=pgd1", "attack.targeted=false"]})
