"""Dual BatchNorm for AdvProp: every BN layer gets an auxiliary twin; all other weights are shared.

    model = convert_dual_bn(timm.create_model("efficientnet_b0"))
    with use_bn(model, "aux"):        # adversarial examples: auxiliary BNs
        model(x_adv)
    with use_bn(model, split=n):      # one forward: first n rows main BNs, the rest aux
        model(torch.cat([x_clean, x_adv]))
    model(x)                          # default route: main BNs (train and eval)
    state = export_main_bn(model)     # loads strict=True into the unconverted architecture

Each BN module (timm's BatchNormAct2d included: it carries its activation and dropout, which the
copies keep) is replaced by a DualBatchNorm holding `main` (the original module) and `aux` (a deep
copy). Unlike timm's convert_splitbn_model, the route is explicit and the split point free.
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
        self.route: str | int = MAIN  # "main", "aux", or int n: rows [:n] main, [n:] aux

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.route == MAIN:
            return self.main(x)
        if self.route == AUX:
            return self.aux(x)
        n = self.route
        return torch.cat([self.main(x[:n]), self.aux(x[n:])])


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


def is_dual_bn(model: nn.Module) -> bool:
    return any(True for _ in dual_bn_layers(model))


@contextmanager
def use_bn(model: nn.Module, route: str = MAIN, *, split: int | None = None):
    """Route whole batches through the main or aux BNs, or split a batch at row `split`."""
    if split is not None:
        route = split
    elif route not in (MAIN, AUX):
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
