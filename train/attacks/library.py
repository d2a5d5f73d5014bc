"""Evaluation attacks from torchattacks (3.5.1): APGD and AutoAttack's standard version.

AutoAttack (Croce & Hein, ICML 2020; fra31/auto-attack) is the community's standard robustness
evaluation (RobustBench). Its standard L∞ version runs four attacks, each on the images the ones
before it left correctly classified: APGD-CE (100 iterations, 1 restart), APGD-T (the targeted
DLR loss, 100 iterations for each of the 9 most likely wrong classes), FAB-T (targeted, 100
iterations, 9 target classes) and Square (black-box, 5000 queries, p_init 0.8).

torchattacks' own `AutoAttack(version="standard")` differs from that definition: it leaves APGD,
APGD-T and FAB at their 10-iteration default, targets n_classes − 1 classes (999 on ImageNet,
not 9) and rescales Square's schedule (`resc_schedule=True`; the authors pass False). So
standard_autoattack() builds the four from torchattacks' parts with the paper's numbers.

Both run on the model as given (evaluation: eval mode, the chosen norms), with its parameters
frozen (FAB backpropagates through them otherwise) and the caller's RNG state untouched (each part
seeds the global generator).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from train.attacks.seam import AttackKind, frozen, radius_checks

APGD_LOSSES = ("ce", "dlr")
TARGET_CLASSES = 9  # AutoAttack standard: APGD-T and FAB-T attack the 9 most likely wrong classes


@dataclass
class AutoAttackConfig:
    """AutoAttack, standard version, L∞, in pixel units (/255)."""
    kind: str = "autoattack"
    eps: float = 4.0
    seed: int = 0


@dataclass
class APGDConfig:
    """APGD (Croce & Hein 2020), L∞, in pixel units (/255); AutoAttack's settings by default."""
    kind: str = "apgd"
    eps: float = 4.0
    steps: int = 100
    restarts: int = 1
    loss: str = "ce"  # ce (cross-entropy) | dlr (difference of logits ratio)
    seed: int = 0


def standard_autoattack(model: nn.Module, eps: float, num_classes: int, seed: int) -> list:
    """The four attacks of AutoAttack's standard L∞ version (module doc); eps in [0, 1] units."""
    import torchattacks

    targets = min(TARGET_CLASSES, num_classes - 1)
    apgd_t = torchattacks.APGDT(model, norm="Linf", eps=eps, steps=100, n_restarts=1, seed=seed,
                                n_classes=num_classes)
    fab_t = torchattacks.FAB(model, norm="Linf", eps=eps, steps=100, n_restarts=1, seed=seed,
                             multi_targeted=True, n_classes=num_classes)
    apgd_t.n_target_classes = fab_t.n_target_classes = targets  # their constructors set n_classes − 1
    return [torchattacks.APGD(model, norm="Linf", eps=eps, steps=100, n_restarts=1, seed=seed, loss="ce"),
            apgd_t, fab_t,
            torchattacks.Square(model, norm="Linf", eps=eps, n_queries=5000, n_restarts=1, p_init=0.8, seed=seed,
                                resc_schedule=False)]


def run_quietly(attack, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """A torchattacks attack with frozen parameters and the caller's RNG state restored after; it
    gets NCHW-contiguous images (FAB views them flat) and returns the caller's layout."""
    devices = [images.device] if images.device.type == "cuda" else []
    with frozen(model), torch.random.fork_rng(devices=devices):
        adversarial = attack(images.contiguous(), labels)
    return adversarial.detach().contiguous(memory_format=memory_format(images))


def memory_format(images: torch.Tensor) -> torch.memory_format:
    channels_last = images.dim() == 4 and images.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if channels_last else torch.contiguous_format


def number_of_classes(model: nn.Module, images: torch.Tensor) -> int:
    with torch.no_grad():
        return model(images[:1]).shape[1]


def build_autoattack(node):
    eps, seed = node.eps / 255, node.seed

    def attack(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        import torchattacks
        parts = standard_autoattack(model, eps, number_of_classes(model, images), seed)
        return run_quietly(torchattacks.MultiAttack(parts), model, images, labels)
    return attack


def build_apgd(node):
    settings = dict(norm="Linf", eps=node.eps / 255, steps=node.steps, n_restarts=node.restarts, seed=node.seed,
                    loss=node.loss)

    def attack(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        import torchattacks
        return run_quietly(torchattacks.APGD(model, **settings), model, images, labels)
    return attack


def describe_autoattack(node) -> tuple[str, str]:
    return f"autoattack_eps{node.eps:g}", f"AutoAttack standard eps={node.eps:g}/255"  # APGD-CE, APGD-T, FAB-T, Square


def describe_apgd(node) -> tuple[str, str]:
    restarts = f" × {node.restarts} restarts" if node.restarts > 1 else ""
    return (f"apgd_{node.loss}{node.steps}_eps{node.eps:g}",
            f"APGD-{node.loss.upper()} {node.steps} steps{restarts} eps={node.eps:g}/255 untargeted")


def checks_autoattack(node, key: str) -> list[tuple[bool, str, str]]:
    return radius_checks(node, key, least="> 0")


def checks_apgd(node, key: str) -> list[tuple[bool, str, str]]:
    return [*radius_checks(node, key, least="> 0"),
            (node.steps >= 1, f"{key}.steps", "must be ≥ 1"),
            (node.restarts >= 1, f"{key}.restarts", "must be ≥ 1"),
            (node.loss in APGD_LOSSES, f"{key}.loss", f"must be one of {APGD_LOSSES}")]


# evaluation-only kinds: they neither take targets nor a loss, nor hand over iterates
APGD = AttackKind("apgd", APGDConfig, describe_apgd, checks_apgd, steps=lambda node: node.steps, build=build_apgd)
AUTOATTACK = AttackKind("autoattack", AutoAttackConfig, describe_autoattack, checks_autoattack,
                        steps=lambda node: 1, steps_key="", build=build_autoattack)
