"""PGD (and FGSM) on the device, with no side effects and no parameter gradients.

pgd(model, images, labels, eps=4/255, step_size=1/255, steps=5) → adversarial images, detached,
same shape/dtype/memory format as `images`, inside the ε-ball around them and inside [0, 1].
Untargeted: maximise the loss to `labels`. Targeted: minimise it to `labels` (the caller passes
the targets; Xie et al. use a random wrong class, see random_wrong_class). The loss is
cross-entropy unless given (it takes class indices or class probabilities), summed over the batch.
FGSM is pgd(steps=1, step_size=eps, random_start=False).

Random starts (random_start=):
- True: every image from a uniform point of the ε-ball, clamped to [0, 1] (Madry et al.);
- a float p: each image moves with probability p and otherwise starts at the clean image;
- "batch": the references' rule (tingxueronghua/pytorch-classification-advprop and
  meijieru/fast_advprop, attacker.py): one coin per batch, `torch.randn([]) > 0.2`, so ≈ 42 % of
  batches start from uniform noise in the ε-ball and the rest from the clean image; the noise is
  not clamped to [0, 1] (the first step's projection is).

Speed and correctness (the frozen descent is train/attacks/seam.py's):
- parameters are frozen during the attack: only the input gradient is computed;
- BN running statistics are not updated (BN still normalises with batch statistics in train mode;
  in eval mode it uses the running statistics). Of the norms a dual-norm model duplicates
  (models/dual_norm.py) only BatchNorm keeps running statistics: LayerNorm, GroupNorm and RMSNorm
  normalise each image by itself, the same in train and eval mode, so freezing their parameters is
  all they need;
- the loss is summed and taken in fp32; the input stays an fp32 leaf, so the step is taken in fp32;
- no copies beyond one tensor per step, and the channels-last layout is kept throughout;
- the arithmetic of a step is torchattacks' (step, clamp δ to ±ε, clamp to [0, 1]), so with
  random_start=False the result equals the reference implementation.

As an attack kind (KIND): `attack=pgd` (these defaults), the paper's presets pgd1…pgd5 and fgsm;
as the training attack targeted by default, towards a random wrong class (Xie et al.).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from omegaconf import OmegaConf
from torch import nn

from train.attacks.seam import AttackKind, Loss, cross_entropy_sum, descend, radius_checks
from train.batch_augment import random_unmixed_class

START_RULES = ("image", "batch")
REFERENCE_COIN = 0.2  # the references' threshold: torch.randn([]) > 0.2 moves the batch (P ≈ 0.42)


@dataclass
class PGDConfig:
    """PGD in pixel units (/255). FGSM: steps=1, step_size=eps, random_start=false."""
    kind: str = "pgd"
    eps: float = 4.0  # L∞ radius
    step_size: float = 1.0  # per step (see reach_eps)
    steps: int = 5
    random_start: bool = True
    # with random_start: image (each image from a random point with probability 1 − clean_start_fraction,
    # clamped to [0, 1]) | batch (the references' one coin per batch, ≈ 42 % of batches, noise unclamped)
    start_rule: str = "image"
    clean_start_fraction: float = 0.0  # start_rule=image: share of images starting at the clean image
    # step by max(step_size, eps / steps), as both references do, so that the attack can reach the
    # ε it names (PGD-2 at ε = 4 then steps 2/255, not 1/255)
    reach_eps: bool = False


def random_wrong_class(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """A uniformly random class different from each label (Xie et al.'s attack targets)."""
    offset = torch.randint(1, num_classes, labels.shape, device=labels.device)
    return (labels + offset) % num_classes


def random_start_point(images: torch.Tensor, eps: float, fraction: float = 1.0) -> torch.Tensor:
    """Images moved to a uniform random point of the ε-ball (clamped to [0, 1]); fraction < 1:
    each image moves with that probability and otherwise stays at the clean image."""
    noise = torch.empty_like(images).uniform_(-eps, eps)
    if fraction < 1:
        moves = torch.rand(len(images), device=images.device) < fraction
        noise *= moves.view(-1, *[1] * (images.dim() - 1)).to(noise.dtype)
    return (images + noise).clamp_(0, 1)


def reference_start_point(images: torch.Tensor, eps: float) -> torch.Tensor:
    """The references' start: the noise, then one coin (on the CPU generator, as theirs) for the
    whole batch; the moved batch is not clamped to [0, 1]."""
    noise = torch.empty_like(images).uniform_(-eps, eps)
    if torch.randn([]) > REFERENCE_COIN:
        return images + noise
    return images.clone()


def start_point(images: torch.Tensor, eps: float, random_start: bool | float | str) -> torch.Tensor:
    """The first iterate under a random_start rule (module doc); a new tensor."""
    if random_start == "batch":
        return reference_start_point(images, eps)
    if random_start:
        return random_start_point(images, eps, float(random_start))
    return images.clone()


def pgd_step(adv: torch.Tensor, images: torch.Tensor, grad: torch.Tensor, *, eps: float,
             step_size: float, targeted: bool) -> torch.Tensor:
    """One signed-gradient step from adv, projected to the ε-ball around images and to [0, 1]."""
    direction = -step_size if targeted else step_size
    adv = adv.detach() + direction * grad.sign()
    delta = torch.clamp(adv - images, min=-eps, max=eps)
    return torch.clamp(images + delta, min=0, max=1)


class PGDIterates:
    """PGD on one batch as iterates (train/attacks/seam.py): each iterate is a leaf requiring grad;
    on resuming, its .grad makes the signed step. start: begin there (a point of the ε-ball;
    random_start is then ignored)."""

    def __init__(self, images: torch.Tensor, *, eps: float, step_size: float, steps: int,
                 random_start: bool | float | str = True, targeted: bool = False, start: torch.Tensor | None = None):
        self.images = images.detach()
        self.eps, self.step_size, self.steps, self.targeted = eps, step_size, steps, targeted
        if start is not None:
            self.x = start.detach()
        elif random_start is False:
            self.x = self.images  # the first step makes a new tensor: no copy needed
        else:
            self.x = start_point(self.images, eps, random_start)

    def __iter__(self):
        for _ in range(self.steps):
            x = self.x.detach().requires_grad_(True)
            yield x  # the caller backpropagates the loss into x.grad
            self.x = pgd_step(x, self.images, x.grad, eps=self.eps, step_size=self.step_size, targeted=self.targeted)

    @property
    def adversarial(self) -> torch.Tensor:
        return self.x.detach()


def pgd(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, eps: float,
        step_size: float, steps: int, random_start: bool | float | str = True, targeted: bool = False,
        start: torch.Tensor | None = None, loss: Loss = cross_entropy_sum) -> torch.Tensor:
    """random_start: True, False, a probability or "batch" (module doc).
    start: begin the iterations here instead (a point of the ε-ball; random_start is ignored)."""
    iterates = PGDIterates(images, eps=eps, step_size=step_size, steps=steps, random_start=random_start,
                           targeted=targeted, start=start)
    return descend(iterates, model, labels, loss)


# ----------------------------------------------------------------------------- as an attack kind

def pgd_kwargs(node) -> dict:
    """A PGD node (pixel units) → pgd() keyword arguments ([0, 1] units): the step the rule gives
    and the random-start rule."""
    step_size = node.step_size
    if node.reach_eps and node.steps > 0:
        step_size = max(step_size, node.eps / node.steps)
    if not node.random_start:
        random_start = False
    elif node.start_rule == "batch":
        random_start = "batch"
    else:
        random_start = 1.0 - node.clean_start_fraction
    return dict(eps=node.eps / 255, step_size=step_size / 255, steps=node.steps, random_start=random_start)


def iterates(node, images: torch.Tensor, *, targeted: bool = False) -> PGDIterates:
    return PGDIterates(images, targeted=targeted, **pgd_kwargs(node))


def wrong_class(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Xie et al.'s targets: a random wrong class; for mixed targets a class in neither of the two."""
    return random_unmixed_class(labels) if labels.is_floating_point() else random_wrong_class(labels, num_classes)


def for_evaluation(node):
    """The robust evaluation of a training node: every image from its own random start (when
    random_start), whatever the training attack's start rule."""
    return OmegaConf.merge(node, {"start_rule": "image", "clean_start_fraction": 0.0})


def describe(node) -> tuple[str, str]:
    step = pgd_kwargs(node)["step_size"] * 255
    start = ", one random start per batch" if node.random_start and node.start_rule == "batch" else ""
    return (f"pgd{node.steps}_eps{node.eps:g}",
            f"PGD-{node.steps} eps={node.eps:g}/255 step={step:g}/255{start} untargeted")


def checks(node, key: str) -> list[tuple[bool, str, str]]:
    return [
        *radius_checks(node, key),
        (node.steps >= 0, f"{key}.steps", "must be ≥ 0"),
        (node.step_size >= 0, f"{key}.step_size", "must be ≥ 0 (pixel units)"),
        (node.step_size > 0 or node.reach_eps or node.steps == 0, f"{key}.step_size",
         "must be > 0 for an attack that takes steps (or reach_eps=true: ε / steps)"),
        (node.start_rule in START_RULES, f"{key}.start_rule", f"must be one of {START_RULES}"),
        (0 <= node.clean_start_fraction <= 1, f"{key}.clean_start_fraction", "must be in [0, 1]"),
    ]


# the paper's attacker strengths (Xie et al., Table "attacker strength"); FGSM: one full-ε step
# from the clean image (Goodfellow et al.)
PRESETS = {
    "pgd1": dict(eps=1.0, step_size=1.0, steps=1),
    "pgd3": dict(eps=2.0, step_size=1.0, steps=3),
    "pgd4": dict(eps=3.0, step_size=1.0, steps=4),
    "pgd5": dict(eps=4.0, step_size=1.0, steps=5),
    "fgsm": dict(eps=1.0, step_size="${.eps}", steps=1, random_start=False, targeted=False),
}

KIND = AttackKind(
    "pgd", PGDConfig, describe, checks, steps=lambda node: node.steps, presets=PRESETS, iterates=iterates,
    targets=wrong_class, for_evaluation=for_evaluation)
