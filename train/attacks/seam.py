"""What an attack is (AttackKind, one record per kind), and how every caller runs one.

An attack kind hands its caller one iterate at a time (Iterates): a batch of images, a leaf that
requires grad. The caller evaluates the attack's loss on it and backpropagates into it, by its own
backward (fast_advprop: the training backward, whose input gradient makes the next iterate) or by
descend() below (a frozen model, the input gradient only). Resuming the iteration, the kind reads
`iterate.grad` and takes its step; once the iteration ends, `adversarial` holds the result.

    iterates = kind.iterates(node, images, targeted=False)
    for x in iterates:
        loss(model(x), labels).backward()   # fills x.grad
    adversarial = iterates.adversarial

The three ways an attack runs:
- train_attack: a method's training attack. Its node says whether it is targeted (the kind's
  rule draws the targets) and in which mode the model is attacked (bn_mode); the caller gives the
  norm route, the loss (the run's, without label smoothing) and, optionally, the forward (a
  method that replays dropout masks wraps the model).
- build_attack: the robust evaluation's attack, untargeted on the model as it is (eval mode).
- a kind's Iterates directly (fast_advprop trains on each iterate).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from common.registry import add_record
from models.dual_norm import MAIN, use_norm

Attack = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]  # (model, images, labels) → images
Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, labels) → a scalar (summed over the batch)
Check = tuple[bool, str, str]  # (holds, dotted config key, what is wrong when it does not)
BN_MODES = ("train", "eval")  # a training attack's bn_mode


class Iterates(Protocol):
    """A kind's attack on one batch: iterating yields each iterate (its .grad read on resuming)."""

    def __iter__(self) -> Iterator[torch.Tensor]: ...

    @property
    def adversarial(self) -> torch.Tensor: ...  # the images after the last step, detached


@dataclass(frozen=True)
class AttackKind:
    """Everything the trainer, the evaluation and the benchmark need to know about an attack.

    name        the node's `kind`; `attack=NAME`, `eval_attack=NAME`, tools/evaluate.py --attack NAME
    options     the dataclass of its config node (sizes in pixel units, /255), whose `kind` is name.
                As the training attack (cfg.attack) the node also has `targeted` and `bn_mode`
    describe    node → (metric key, table title), e.g. ("pgd5_eps4", "PGD-5 eps=4/255 …")
    checks      (node, its config key) → [(holds, key, problem)]: its values
    steps       node → the gradient steps it takes (0: no attack; the final robust evaluation skips it)
    steps_key   the node key that sets them ("" for a fixed schedule): a method that needs an attack
                refuses 0 there
    presets     name → node values: `attack=NAME` (the kind's own name alone: its defaults)
    iterates    (node, images, *, targeted) → Iterates: a gradient attack, which can train and hands
                each iterate to its caller; None: an evaluation-only attack (library's), see build
    targets     (labels, num_classes) → the classes a targeted attack descends to (its rule)
    build       evaluation-only kinds: node → attack(model, images, labels) (None: from iterates)
    for_evaluation  the training node → the node the final robust evaluation runs (default: as is)
    bench_cases tools/bench_step.py: case name → config overrides
    """
    name: str
    options: type
    describe: Callable[[object], tuple[str, str]]
    checks: Callable[[object, str], list[Check]]
    steps: Callable[[object], int]
    steps_key: str = "steps"
    presets: dict[str, dict] = field(default_factory=dict)
    iterates: Callable[..., Iterates] | None = None
    targets: Callable[[torch.Tensor, int], torch.Tensor] | None = None
    build: Callable[[object], Attack] | None = None
    for_evaluation: Callable[[object], object] | None = None
    bench_cases: dict[str, list[str]] = field(default_factory=dict)

    @property
    def trains(self) -> bool:
        """It can be the training attack: it takes targets and a loss, and hands over its iterates."""
        return self.iterates is not None


ATTACKS: dict[str, AttackKind] = {}


def register_attack(kind: AttackKind) -> AttackKind:
    """Make a kind selectable by its name (a name already taken is an error)."""
    return add_record(ATTACKS, kind, "an attack")


def kind_of(node) -> AttackKind:
    """The record of a node's kind (nodes of the PGD era, without `kind`, are PGD's)."""
    name = getattr(node, "kind", None) or "pgd"
    if name not in ATTACKS:
        raise ValueError(f"{name!r} is not an attack ({', '.join(ATTACKS)})")
    return ATTACKS[name]


# ----------------------------------------------------------------------------- running the iterates

def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy (class indices or probabilities) summed over the batch, in fp32 or wider."""
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), labels, reduction="sum")


def batch_norms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@contextmanager
def frozen(model: nn.Module):
    """No parameter gradients and no BN running-stat updates inside; everything restored after."""
    params = [p for p in model.parameters() if p.requires_grad]
    norms = [m for m in batch_norms(model) if m.track_running_stats]
    for p in params:
        p.requires_grad_(False)
    for m in norms:  # train mode keeps batch statistics but stops touching the running buffers
        m.track_running_stats = False
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)
        for m in norms:
            m.track_running_stats = True


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


def descend(iterates: Iterates, model: nn.Module, labels: torch.Tensor, loss: Loss = cross_entropy_sum,
            forward: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Run a kind's iterates against the model with frozen weights: only the input gradient of
    loss(forward(x), labels) is computed (most of a training backward's cost is the weight
    gradients). The loss is summed, not averaged, and taken in fp32: only the gradient's sign
    matters, and under fp16/bf16 autocast a 1/N-scaled gradient underflows to zero."""
    forward = forward or model
    with frozen(model), torch.enable_grad():
        for x in iterates:
            (x.grad,) = torch.autograd.grad(loss(forward(x), labels), x)
    return iterates.adversarial


def train_attack(node, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *,
                 num_classes: int, route: str = MAIN, loss: Loss = cross_entropy_sum,
                 forward: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """A method's training attack (node: cfg.attack) on images, through the norms of `route`, with
    the model in train mode (batch statistics) or, bn_mode=eval, in eval mode. Untargeted it ascends
    the loss of `labels` (class probabilities too); targeted it descends to the kind's targets."""
    kind = kind_of(node)
    targets = kind.targets(labels, num_classes) if node.targeted else labels
    iterates = kind.iterates(node, images, targeted=node.targeted)
    with use_norm(model, route), eval_mode(model, node.bn_mode == "eval"):
        return descend(iterates, model, targets, loss, forward)


def build_attack(node, *, targeted: bool = False, loss: Loss | None = None) -> Attack:
    """The attack a node describes, as a function (model, images, labels) → images: on the model as
    given (mode, norms: the caller's), untargeted unless told; `loss` only for gradient kinds."""
    kind = kind_of(node)
    if kind.build is not None:
        if targeted or loss is not None:
            raise ValueError(f"{kind.name} is an untargeted evaluation attack with its own loss")
        return kind.build(node)

    def attack(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return descend(kind.iterates(node, images, targeted=targeted), model, labels, loss or cross_entropy_sum)
    return attack


# ----------------------------------------------------------------------------- shared checks

def radius_checks(node, key: str, least: str = "≥ 0") -> list[Check]:
    """ε (node.eps, pixel units) in range: ≥ 0 (least="> 0": an attack that must move) and ≤ 255."""
    low = node.eps > 0 if least == "> 0" else node.eps >= 0
    return [(low, f"{key}.eps", f"must be {least} (pixel units)"),
            (node.eps <= 255, f"{key}.eps", "must be ≤ 255 (pixel units: 255 is the whole [0, 1] image range)")]
