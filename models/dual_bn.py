"""Dual BatchNorm for AdvProp: every BN layer gets an auxiliary twin; all other weights are shared.

    model = convert_dual_bn(timm.create_model("efficientnet_b0"))
    with use_bn(model, "aux"):        # adversarial examples: auxiliary BNs
        model(x_adv)
    model(x)                          # default route: main BNs (train and eval)
    state = export_main_bn(model)     # loads strict=True into the unconverted architecture

Each BN module (timm's BatchNormAct2d included: it carries its activation and dropout, which the
copies keep) is replaced by a DualBatchNorm holding `main` (the original module) and `aux` (a deep
copy). Unlike timm's convert_splitbn_model (equal chunks of one batch), a route takes whole batches:
clean and adversarial images take separate forwards (train/methods.py says why).
"""
from __future__ import annotations

import copy
from contextlib import contextmanager

import torch
from torch import nn

MAIN, AUX = "main", "aux"


class DualBatchNorm(nn.Module):
    def __init__(self, bn: nn.modules.batchnorm._BatchNorm):
        super().__init__()
        self.main = bn
        self.aux = copy.deepcopy(bn)
        self.route = MAIN

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.aux(x) if self.route == AUX else self.main(x)


def convert_dual_bn(model: nn.Module) -> nn.Module:
    """Replace every BatchNorm layer of model (in place) by a DualBatchNorm; returns model."""
    for name, child in model.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(model, name, DualBatchNorm(child))
        elif not isinstance(child, DualBatchNorm):
            convert_dual_bn(child)
    return model


def dual_bn_layers(model: nn.Module) -> list[DualBatchNorm]:
    return [m for m in model.modules() if isinstance(m, DualBatchNorm)]


def route_parameters(model: nn.Module, route: str) -> list[nn.Parameter]:
    """The parameters of every dual layer's `route` copy: the main or the auxiliary BNs."""
    return [p for layer in dual_bn_layers(model) for p in getattr(layer, route).parameters()]


@contextmanager
def use_bn(model: nn.Module, route: str = MAIN):
    """Route whole batches through the main or the auxiliary BNs inside the context."""
    if route not in (MAIN, AUX):
        raise ValueError(f"route must be 'main' or 'aux', got {route!r}")
    layers = dual_bn_layers(model)
    previous = [layer.route for layer in layers]
    for layer in layers:
        layer.route = route
    try:
        yield model
    finally:
        for layer, old in zip(layers, previous):
            layer.route = old


def export_main_bn(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict of model with each DualBatchNorm replaced by its main BN (aux dropped)."""
    dual_prefixes = [name + "." for name, m in model.named_modules() if isinstance(m, DualBatchNorm)]
    state = {}
    for key, value in model.state_dict().items():
        prefix = next((p for p in dual_prefixes if key.startswith(p)), None)
        if prefix is None:
            state[key] = value
        elif key.startswith(prefix + "main."):
            state[prefix + key[len(prefix + "main."):]] = value
    return state
