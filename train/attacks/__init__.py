"""Attacks behind one seam: an attack kind is a record (AttackKind, train/attacks/seam.py), its
config node is its options dataclass, and every caller runs it the same way.

    kind        node                        what
    pgd         gradient_sign.PGDConfig     PGD and FGSM (presets pgd1, pgd3, pgd4, pgd5, fgsm): trains, evaluates
    pyramid     pyramid.PyramidConfig       Pyramid Adversarial Training's multi-scale attack: trains, evaluates
    apgd        library.APGDConfig          torchattacks' APGD (Croce & Hein 2020): evaluation
    autoattack  library.AutoAttackConfig    AutoAttack's standard version from torchattacks' parts: evaluation

A node names its kind (`kind: pyramid`); `attack=NAME` / `eval_attack=NAME` (a kind or a preset)
makes one. The training attack's node (cfg.attack, node_type(kind, training=True)) also holds
`targeted` (towards the kind's targets) and `bn_mode` (the mode the model is attacked in).

    adversarial = train_attack(cfg.attack, model, images, labels, num_classes=K, route=AUX, loss=…)
    adversarial = build_attack(node)(model, images, labels)  # evaluation: untargeted, the model as given

An attack returns detached images of the input's shape in [0, 1] and leaves the model as it found
it: parameters, their `.grad` and `requires_grad`, BN running statistics, train/eval mode.

A new kind is one file (its options dataclass with `kind`, its Iterates or build, describe, checks,
presets, `KIND = AttackKind(...)`) and one line in BUILT_IN (or register_attack(kind) from your own
code before load_config): `attack=NAME`, its keys, checks, the robust evaluation, tools/evaluate.py
--attack NAME and its tools/bench_step.py cases follow from the record.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import field, make_dataclass

from train.attacks import gradient_sign, library, pyramid
from train.attacks.gradient_sign import (PGDConfig, pgd, pgd_kwargs, pgd_step, random_start_point,
                                         random_wrong_class, start_point)
from train.attacks.pyramid import PyramidConfig
from train.attacks.seam import (ATTACKS, BN_MODES, Attack, AttackKind, Check, Iterates, build_attack,
                                cross_entropy_sum, descend, eval_mode, frozen, kind_of, register_attack,
                                train_attack)

BUILT_IN = (gradient_sign.KIND, pyramid.KIND, library.APGD, library.AUTOATTACK)
for built_in in BUILT_IN:
    register_attack(built_in)


# ----------------------------------------------------------------------------- config nodes

TRAINING_KEYS = [
    ("targeted", bool, field(default=True)),  # towards the kind's targets (PGD: Xie et al.'s random wrong class)
    ("bn_mode", str, field(default="train")),  # the model the attack sees: train (batch statistics) | eval (running)
]
_training_types: dict[type, type] = {}


def node_type(kind: AttackKind, training: bool = False) -> type:
    """The dataclass of a config node of this kind: its options, and as the training attack
    (cfg.attack) those plus TRAINING_KEYS."""
    if not training:
        return kind.options
    if kind.options not in _training_types:
        _training_types[kind.options] = make_dataclass(f"Training{kind.options.__name__}", TRAINING_KEYS,
                                                       bases=(kind.options,))
    return _training_types[kind.options]


class Presets(Mapping):
    """`attack=NAME` values of every registered kind, name → {"kind": …, key: value}: each kind's own
    name (its defaults) and its presets."""

    def _all(self) -> dict[str, dict]:
        names = {}
        for kind in ATTACKS.values():
            names[kind.name] = {"kind": kind.name}
            names.update({name: {"kind": kind.name, **values} for name, values in kind.presets.items()})
        return names

    def __getitem__(self, name: str) -> dict:
        return self._all()[name]

    def __iter__(self):
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())


ATTACK_PRESETS = Presets()


# ----------------------------------------------------------------------------- asking a node's record

def describe(node) -> tuple[str, str]:
    """(metric key, title) of an evaluation attack, e.g. ("pgd5_eps4", "PGD-5 eps=4/255 …")."""
    return kind_of(node).describe(node)


def attack_steps(node) -> int:
    """The gradient steps the node's attack takes (0: none)."""
    return kind_of(node).steps(node)


def evaluation_node(node):
    """The node the final robust evaluation runs for a training node (its kind's rule; as is by default)."""
    rule = kind_of(node).for_evaluation
    return rule(node) if rule is not None else node


def attack_checks(node, key: str, *, needed: str = "") -> list[Check]:
    """The kind's checks of its values, a training node's bn_mode, and, needed (e.g. "with
    method=advprop (…)"), that it takes at least one step."""
    kind = kind_of(node)
    checks = list(kind.checks(node, key))
    if hasattr(node, "bn_mode"):
        checks.append((node.bn_mode in BN_MODES, f"{key}.bn_mode", f"must be one of {BN_MODES}"))
    if needed and kind.steps_key:
        checks.append((kind.steps(node) >= 1, f"{key}.{kind.steps_key}", f"must be ≥ 1 {needed}"))
    return checks


__all__ = ["ATTACKS", "ATTACK_PRESETS", "Attack", "AttackKind", "BUILT_IN", "Iterates", "PGDConfig", "PyramidConfig",
           "attack_checks", "attack_steps", "build_attack", "cross_entropy_sum", "descend", "describe", "eval_mode",
           "evaluation_node", "frozen", "kind_of", "node_type", "pgd", "pgd_kwargs", "pgd_step", "random_start_point",
           "random_wrong_class", "register_attack", "start_point", "train_attack"]
