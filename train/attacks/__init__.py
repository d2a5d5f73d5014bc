"""Attacks behind one interface: a config node in, an attack function out.

    attack = build_attack(node)                  # node: the dataclass (or OmegaConf node) of a kind below
    adversarial = attack(model, images, labels)  # images float [0, 1]; the node's sizes are pixel units (/255)

An attack returns detached images of the input's shape inside the ε-ball (L∞) and [0, 1], and
leaves the model as it found it: parameters, their `.grad` and `requires_grad`, BN running
statistics, train/eval mode. It attacks the model as given: which norms the images go through and
whether the model is in train or eval mode are the caller's choice (train/methods/common.py for
training, train/loop.py's evaluate() for robust accuracy: eval mode).

    kind        node                       what
    pgd         gradient_sign.PGDConfig    ours: PGD and FGSM, for training and evaluation
    apgd        library.APGDConfig         torchattacks' APGD (Croce & Hein 2020): evaluation
    autoattack  library.AutoAttackConfig   AutoAttack's standard version from torchattacks' parts: evaluation

build_attack(node, targeted=..., loss=...): `targeted` and `loss` are PGD's: it maximises (targeted:
minimises) loss(logits, labels) summed over the batch, by default cross-entropy, which takes class
probabilities (soft targets) as well as class indices. A new kind is its file (a config dataclass,
build, describe, checks) and one line in ATTACKS.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from train.attacks import gradient_sign, library
from train.attacks.gradient_sign import (PGDConfig, cross_entropy_sum, frozen, pgd, pgd_kwargs, pgd_step,
                                         random_start_point, random_wrong_class, start_point)

Attack = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class AttackKind:
    name: str
    options: type  # the config dataclass of its node (pixel units)
    build: Callable[..., Attack]  # (node, *, targeted, loss) → attack
    describe: Callable[[object], tuple[str, str]]  # node → (metric key, table title)
    checks: Callable[[object, str], list]  # (node, its config key) → [(ok, key, problem)]


ATTACKS = {kind.name: kind for kind in (
    AttackKind("pgd", PGDConfig, gradient_sign.build, gradient_sign.describe, gradient_sign.checks),
    AttackKind("apgd", library.APGDConfig, library.build_apgd, library.describe_apgd, library.checks_apgd),
    AttackKind("autoattack", library.AutoAttackConfig, library.build_autoattack, library.describe_autoattack,
               library.checks_autoattack),
)}


def kind_of(node) -> AttackKind:
    """The kind whose config dataclass the node is (or derives from)."""
    cls = OmegaConf.get_type(node) if isinstance(node, DictConfig) else type(node)
    for kind in ATTACKS.values():
        if isinstance(cls, type) and issubclass(cls, kind.options):
            return kind
    raise TypeError(f"{cls} is not the config of an attack ({', '.join(ATTACKS)})")


def build_attack(node, *, targeted: bool = False, loss=None) -> Attack:
    extra = {} if loss is None else {"loss": loss}
    return kind_of(node).build(node, targeted=targeted, **extra)


def describe(node) -> tuple[str, str]:
    """(metric key, title) of an evaluation attack, e.g. ("pgd5_eps4", "PGD-5 eps=4/255 …")."""
    return kind_of(node).describe(node)


def attack_checks(node, key: str) -> list[tuple[bool, str, str]]:
    return kind_of(node).checks(node, key)


__all__ = ["ATTACKS", "Attack", "AttackKind", "PGDConfig", "attack_checks", "build_attack", "cross_entropy_sum",
           "describe", "frozen", "kind_of", "pgd", "pgd_kwargs", "pgd_step", "random_start_point",
           "random_wrong_class", "start_point"]
