"""The pyramid attack of Pyramid Adversarial Training (Herrmann et al., "Pyramid Adversarial
Training Improves ViT Performance", CVPR 2022), as the authors' code runs it (google-research/scenic,
projects/adversarialtraining: attacks/attack_compute.py get_adv_pyramid, attack_transforms.py
patched_color_jitter, attack_methods.py pgd_attack_transform and project_perturbation_pyramid_inf):

- one perturbation per level, one value per block × block pixels per channel (published: blocks
  of 32, 16 and 1 px — their grid counts 7, 14 and 224 at 224 px — multipliers 20, 10 and 1);
- the image is perturbed level after level: each level's values are repeated over their blocks
  (nearest upsampling), multiplied by the level's multiplier, added, and the image clipped to its
  range [0, 1] after *each* level (a clip whose gradient at the bound is halved, as jnp.clip's);
- a step moves every level's raw values by step_size · sign(gradient), down the loss for a
  targeted attack (theirs: one random class per image, possibly the true one, on the model's
  training loss), then clips each level to [−ε, ε] *before* its multiplier (the sum of the levels
  is not projected: the coarsest level can move a pixel by 20 ε);
- zero start (their init_mode "zero"; "uniform" and "normal" are their "random" and "normal").

Sizes are pixel units of [0, 1] images: their ε = 6/255 and step 1/255 are in [−1, 1] units, so
the published preset (this node's defaults, `attack=pyramid`) is ε = 3, step 0.5, 5 steps. An
image side that is not a multiple of a block ends with a partial block (theirs requires multiples).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from train.attacks.seam import AttackKind, radius_checks

STARTS = ("zero", "uniform", "normal")


@dataclass
class PyramidConfig:
    """The pyramid attack, in pixel units (/255) of [0, 1] images; the defaults are the published values."""
    kind: str = "pyramid"
    eps: float = 3.0  # each level's values stay in [−eps, eps] (before its multiplier)
    step_size: float = 0.5  # per step, on each level's values
    steps: int = 5
    levels: list[int] = field(default_factory=lambda: [32, 16, 1])  # block side (px) of each level
    multipliers: list[float] = field(default_factory=lambda: [20.0, 10.0, 1.0])  # one per level
    start: str = "zero"  # zero | uniform (each level's values in [−ε, ε]) | normal (ε · N(0, 1), unclipped)


def clip_to_image_range(images: torch.Tensor) -> torch.Tensor:
    """Clip to [0, 1] as jnp.clip does: maximum then minimum, whose gradient at a tie is halved."""
    low, high = images.new_zeros(()), images.new_ones(())
    return torch.minimum(torch.maximum(images, low), high)


def perturb(images: torch.Tensor, deltas: list[torch.Tensor], levels: list[int], multipliers: list[float]):
    """The images with each level's values repeated over its blocks, scaled and added in turn, the
    result clipped to [0, 1] after each level (their transform_fn_pyramid)."""
    height, width = images.shape[-2:]
    for delta, block, multiplier in zip(deltas, levels, multipliers):
        if block > 1:
            delta = F.interpolate(delta, scale_factor=block, mode="nearest")[..., :height, :width]
        images = clip_to_image_range(images + multiplier * delta)
    return images


def start_values(images: torch.Tensor, block: int, start: str, eps: float) -> torch.Tensor:
    """One level's first values: (N, C, ⌈H / block⌉, ⌈W / block⌉), in the images' memory format."""
    n, c, height, width = images.shape
    shape = (n, c, -(-height // block), -(-width // block))
    layout = torch.channels_last if images.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    values = images.new_zeros(shape).contiguous(memory_format=layout)
    if start == "uniform":
        values.uniform_(-eps, eps)
    elif start == "normal":
        values.normal_().mul_(eps)
    return values


class PyramidIterates:
    """The attack on one batch as iterates (train/attacks/seam.py): each iterate is the perturbed
    batch; on resuming, its .grad is carried back to each level's values (the transform's
    gradient), which take the signed step and are clipped to [−ε, ε]."""

    def __init__(self, node, images: torch.Tensor, *, targeted: bool = False):
        self.images = images.detach()
        self.eps, self.step_size, self.steps = node.eps / 255, node.step_size / 255, node.steps
        self.levels, self.multipliers = list(node.levels), list(node.multipliers)
        self.direction = -1.0 if targeted else 1.0
        self.deltas = [start_values(self.images, block, node.start, self.eps) for block in self.levels]

    def __iter__(self):
        for _ in range(self.steps):
            deltas = [delta.detach().requires_grad_(True) for delta in self.deltas]
            with torch.enable_grad():
                perturbed = perturb(self.images, deltas, self.levels, self.multipliers)
            x = perturbed.detach().requires_grad_(True)
            yield x  # the caller backpropagates the loss into x.grad
            grads = torch.autograd.grad(perturbed, deltas, x.grad)
            self.deltas = [(delta.detach() + self.direction * self.step_size * grad.sign()).clamp_(-self.eps, self.eps)
                           for delta, grad in zip(deltas, grads)]

    @property
    def adversarial(self) -> torch.Tensor:
        with torch.no_grad():
            return perturb(self.images, self.deltas, self.levels, self.multipliers)


def random_class(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Their targets: a uniformly random class per image (the true one included), for mixed
    targets too."""
    return torch.randint(0, num_classes, (len(labels),), device=labels.device)


def describe(node) -> tuple[str, str]:
    levels = "/".join(str(block) for block in node.levels)
    multipliers = "/".join(f"{m:g}" for m in node.multipliers)
    return (f"pyramid{node.steps}_eps{node.eps:g}",
            f"Pyramid-{node.steps} eps={node.eps:g}/255 step={node.step_size:g}/255 blocks {levels} px "
            f"× {multipliers} untargeted")


def checks(node, key: str) -> list[tuple[bool, str, str]]:
    return [
        *radius_checks(node, key),
        (node.steps >= 0, f"{key}.steps", "must be ≥ 0"),
        (node.step_size > 0 or node.steps == 0, f"{key}.step_size", "must be > 0 for an attack that takes steps"),
        (len(node.levels) >= 1 and all(block >= 1 for block in node.levels), f"{key}.levels",
         "must be one or more block sides in pixels, each ≥ 1 (published: [32, 16, 1])"),
        (len(node.multipliers) == len(node.levels), f"{key}.multipliers",
         f"must hold one multiplier per level ({len(node.levels)})"),
        (all(m >= 0 for m in node.multipliers), f"{key}.multipliers", "must be ≥ 0"),
        (node.start in STARTS, f"{key}.start", f"must be one of {STARTS}"),
    ]


KIND = AttackKind(
    "pyramid", PyramidConfig, describe, checks, steps=lambda node: node.steps,
    iterates=lambda node, images, *, targeted=False: PyramidIterates(node, images, targeted=targeted),
    targets=random_class,
    bench_cases={"advprop_pyramid": ["method=advprop", "attack=pyramid"]})
