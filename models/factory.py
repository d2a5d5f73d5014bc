"""Model construction: a timm model by name, input normalisation inside, optional dual norms.

Models take images in [0, 1] (so attack ε is in [0, 1] units) and normalise inside: ImageNet
statistics for torchvision-style weights, mean = std = 0.5 for the TF EfficientNet/AdvProp family.
"""
from __future__ import annotations

import difflib
import pickle
import re
from pathlib import Path

import timm
import torch
from torch import nn

from models.dual_norm import NORM_NAMES, convert_dual_norm, dual_norm_layers
from models.hub import create_hub_net, hub_name_problem, is_hub_name, read_hub_config
from common.errors import UserInputError

NORMALIZATION = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}


def normalization_named(mean, std) -> str | None:
    """The NORMALIZATION name of these constants (timm's pretrained_cfg), None if neither."""
    if len(mean) != 3 or len(std) != 3:
        return None
    for name, (known_mean, known_std) in NORMALIZATION.items():
        if all(abs(a - b) < 1e-3 for a, b in zip((*mean, *std), (*known_mean, *known_std))):
            return name
    return None


class Normalized(nn.Module):
    """[0, 1] images → (x - mean) / std → net. `net` is the plain timm model (export target)."""

    def __init__(self, net: nn.Module, normalization: str = "imagenet"):
        super().__init__()
        mean, std = NORMALIZATION[normalization]
        self.net = net
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)

    def no_weight_decay(self) -> set[str]:
        """The net's own no-decay names (ViT: position embedding, class token) under our prefix: timm's
        optimizer factory asks the model it is given (train/optim.py)."""
        return {f"net.{name}" for name in getattr(self.net, "no_weight_decay", set)()}


def model_name_problem(name: str) -> str | None:
    """What is wrong with a model name (None: timm has it, or it is a usable local-dir:/hf-hub: name)."""
    if is_hub_name(name):
        return hub_name_problem(name)
    if timm.is_model(name):
        return None
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    return "is not a timm model" + (f"; closest: {', '.join(close)}" if close else "; see timm.list_models()")


def create_net(name: str, num_classes: int, *, pretrained_path: str = "", drop_rate: float = 0.0,
               drop_path_rate: float = 0.0, bn_momentum: float | None = None,
               bn_eps: float | None = None) -> nn.Module:
    """timm.create_model with random init, or weights from a local file or a local-dir:/hf-hub: model
    (models/hub.py; the only download: an hf-hub: name's, which the user asked for)."""
    problem = model_name_problem(name)
    if problem:
        raise UserInputError(f"bad value for model: {name!r} {problem}")
    # stochastic depth only when asked: timm models without it (VGG, DLA, ...) take no such argument
    depth = {"drop_path_rate": drop_path_rate} if drop_path_rate else {}
    try:
        if is_hub_name(pretrained_path):
            check_hub_architecture(pretrained_path, name)
            net = create_hub_net(pretrained_path, num_classes=num_classes, drop_rate=drop_rate, **depth)
        else:
            net = timm.create_model(name, pretrained=False, num_classes=num_classes, drop_rate=drop_rate, **depth)
    except TypeError as error:
        if depth and "drop_path_rate" in str(error):
            raise UserInputError(f"bad value for drop_path_rate: {name} has no stochastic depth to set") from None
        raise
    if pretrained_path and not is_hub_name(pretrained_path):
        load_local_weights(net, Path(pretrained_path))
    for module in net.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            if bn_momentum is not None:
                module.momentum = bn_momentum
            if bn_eps is not None:
                module.eps = bn_eps
    return net


def check_hub_architecture(source: str, name: str) -> None:
    """pretrained_path=local-dir:…/hf-hub:… must hold weights of model=name's architecture."""
    architecture = read_hub_config(source)[1]
    if architecture != timm.models.split_model_name_tag(name)[0]:
        raise UserInputError(f"bad value for pretrained_path: {source} holds a {architecture}, not model={name}: "
                             f"give model={architecture}, or model={source} alone")


def refused_pickle(error: Exception) -> str:
    """What torch.load(weights_only=True) refused, without torch's advice to load it unsafely (that
    would run whatever the file holds)."""
    call = re.search(r"GLOBAL (\S+)", str(error))
    return f"holds pickled objects other than tensors{f' (it would call {call.group(1)})' if call else ''}: " \
           f"refused, never run"


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors or a torch file (weights_only: no pickled code runs)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise UserInputError(f"cannot read weights {path}: it {refused_pickle(error)}") from None
    except Exception as error:  # truncated file, not a tensor file
        raise UserInputError(f"cannot read weights {path}: {type(error).__name__}: {error}") from None
    state = state["state_dict"] if isinstance(state, dict) and isinstance(state.get("state_dict"), dict) else state
    if not isinstance(state, dict):
        raise UserInputError(f"{path} holds a {type(state).__name__}, not a state dict")
    return {key.removeprefix("module."): value for key, value in state.items()}  # saved from DDP


def load_local_weights(net: nn.Module, path: Path) -> None:
    if not path.is_file():
        raise UserInputError(f"bad value for pretrained_path: {path} is {'a folder' if path.is_dir() else 'not a file'}")
    state = read_weights(path)
    head = set(map(id, net.get_classifier().parameters()))
    head_keys = {name for name, param in net.named_parameters() if id(param) in head}
    own = net.state_dict()
    mismatched = [k for k, v in state.items() if k in own and v.shape != own[k].shape]
    for key in mismatched:  # a new number of classes: keep the fresh head, load the rest
        del state[key]
    missing, unexpected = net.load_state_dict(state, strict=False)
    if unexpected or set(missing) - set(mismatched) - head_keys:
        raise UserInputError(f"bad value for pretrained_path: {path} does not fit {type(net).__name__}: "
                             f"missing {missing[:5]}, unexpected {unexpected[:5]}")


def create_model(cfg, num_classes: int, *, dual_norm: bool) -> Normalized:
    """dual_norm: give every norm layer an auxiliary twin (after bn_momentum/bn_eps, so both copies
    have them); a model with no norm layer (NFNets) cannot, and is refused."""
    net = create_net(cfg.model, num_classes, pretrained_path=cfg.pretrained_path,
                     drop_rate=cfg.drop_rate, drop_path_rate=cfg.drop_path_rate, bn_momentum=cfg.bn_momentum,
                     bn_eps=cfg.bn_eps)
    if dual_norm and not dual_norm_layers(convert_dual_norm(net)):
        raise UserInputError(f"method={cfg.method} gives every normalisation layer an auxiliary twin, but "
                             f"{cfg.model} has no {NORM_NAMES} layer: train it with vanilla, adv_train "
                             f"or goodfellow_mix")
    return Normalized(net, cfg.normalization)
