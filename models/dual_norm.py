"""Dual normalisation for AdvProp: every norm layer gets an auxiliary twin; all other weights are shared.

    model = convert_dual_norm(timm.create_model("convnext_tiny"))
    with use_norm(model, "aux"):      # adversarial examples: auxiliary norms
        model(x_adv)
    model(x)                          # default route: main norms (train and eval)
    state = export_main_norm(model)   # loads strict=True into the unconverted architecture

Each layer of NORM_TYPES (BatchNorm, LayerNorm, GroupNorm, RMSNorm, and every subclass: timm's
BatchNormAct2d, LayerNorm2d, GroupNormAct, ...) is replaced by a DualNorm holding `main` (the
original module) and `aux` (a deep copy), so both keep what the layer does besides normalising
(timm's *Act layers carry their activation and dropout). A dual BatchNorm gives the adversarial
images their own statistics and affine parameters; LayerNorm, GroupNorm and RMSNorm normalise each
image by itself, so their twin separates the affine parameters (scale and shift) only. Other
normalisations (EvoNorm, FilterResponseNorm, FrozenBatchNorm2d) stay shared between the routes.

Unlike timm's convert_splitbn_model (equal chunks of one batch), a route takes whole batches:
clean and adversarial images take separate forwards (train/methods/__init__.py says why).
"""
from __future__ import annotations

import copy
from contextlib import contextmanager

import torch
from timm.layers import RmsNorm, RmsNorm2d, RmsNorm2dFp32, RmsNormFp32
from torch import nn

MAIN, AUX = "main", "aux"

NORM_TYPES = (
    nn.modules.batchnorm._BatchNorm,  # BatchNorm1d/2d/3d, SyncBatchNorm, timm's BatchNormAct2d
    nn.LayerNorm,  # timm's LayerNorm, LayerNorm2d, LayerNormAct, LayerNormAct2d, *Fp32
    nn.GroupNorm,  # timm's GroupNorm, GroupNorm1, GroupNormAct, GroupNorm1Act
    nn.RMSNorm, RmsNorm, RmsNorm2d, RmsNormFp32, RmsNorm2dFp32,  # and timm's RmsNormAct*
)
NORM_NAMES = "BatchNorm, LayerNorm, GroupNorm or RMSNorm"  # for messages


class DualNorm(nn.Module):
    def __init__(self, norm: nn.Module):
        super().__init__()
        self.main = norm
        self.aux = copy.deepcopy(norm)
        self.route = MAIN

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.aux(x) if self.route == AUX else self.main(x)


def convert_dual_norm(model: nn.Module) -> nn.Module:
    """Replace every normalisation layer of model (in place) by a DualNorm; returns model.
    A layer the model reaches under two names becomes one DualNorm, shared as before."""
    duals: dict[int, DualNorm] = {}

    def convert(module: nn.Module) -> None:
        for name, child in list(module._modules.items()):  # every name, where named_children skips repeats
            if isinstance(child, NORM_TYPES):
                setattr(module, name, duals.setdefault(id(child), DualNorm(child)))
            elif child is not None and not isinstance(child, DualNorm):
                convert(child)

    convert(model)
    return model


def dual_norm_layers(model: nn.Module) -> list[DualNorm]:
    return [m for m in model.modules() if isinstance(m, DualNorm)]


def route_parameters(model: nn.Module, route: str) -> list[nn.Parameter]:
    """The parameters of every dual layer's `route` copy: the main or the auxiliary norms."""
    return [p for layer in dual_norm_layers(model) for p in getattr(layer, route).parameters()]


@contextmanager
def use_norm(model: nn.Module, route: str = MAIN):
    """Route whole batches through the main or the auxiliary norms inside the context."""
    if route not in (MAIN, AUX):
        raise ValueError(f"route must be 'main' or 'aux', got {route!r}")
    layers = dual_norm_layers(model)
    previous = [layer.route for layer in layers]
    for layer in layers:
        layer.route = route
    try:
        yield model
    finally:
        for layer, old in zip(layers, previous):
            layer.route = old


def export_main_norm(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict of model with each DualNorm replaced by its main norm (aux dropped)."""
    dual_prefixes = [name + "." for name, m in model.named_modules(remove_duplicate=False)
                     if isinstance(m, DualNorm)]
    state = {}
    for key, value in model.state_dict().items():
        prefix = next((p for p in dual_prefixes if key.startswith(p)), None)
        if prefix is None:
            state[key] = value
        elif key.startswith(prefix + "main."):
            state[prefix + key[len(prefix + "main."):]] = value
    return state
