"""A trained (possibly dual-norm) model out as timm's Hub folder: the main norms in the plain timm
architecture, written by timm's own `save_for_hf` (config.json with the preprocessing in its
pretrained_cfg and the label names, model.safetensors), plus the model card README.md:

    timm.create_model("local-dir:FOLDER", pretrained=True)       # or hf-hub:USER/NAME once pushed

The folder is written under a temporary name and renamed into place: a reader never sees half of
it. Weights with a NaN or an infinity are never written (NonFiniteWeights).

Exports made before the folder were one .safetensors file whose metadata named the model, its
normalisation and classes (formats OLD_EXPORT_FORMATS); tools/robustness/load.py still reads them.
"""
from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import timm
import torch
from safetensors import safe_open
from timm.models import get_model_args, save_for_hf

from models.dual_norm import AUX, export_main_norm

EXPORT_FORMAT = "timm-hub"  # what a W&B model artifact's metadata says it holds
OLD_EXPORT_FORMATS = ("advprop-main-norm", "advprop-main-bn")  # single-file exports: norms, then BatchNorm era
# what a fresh model's pretrained_cfg keeps: its shape; the tag, license, papers and Hub id of timm's
# own weights do not describe ours
STRUCTURE_KEYS = ("architecture", "input_size", "fixed_input_size", "min_input_size", "pool_size", "first_conv",
                  "classifier")


class NonFiniteWeights(ValueError):
    """Weights with a NaN or an infinity: never written (a checkpoint or an export of them is lost work
    that looks like a model)."""
    exit_code = 3


def non_finite_names(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating tensors holding a NaN or an infinity."""
    return [name for name, tensor in tensors.items()
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]


def refuse_non_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    bad = non_finite_names(tensors)
    if bad:
        raise NonFiniteWeights(f"not writing {what}: {len(bad)} of its tensors hold NaN or infinite values "
                               f"({', '.join(bad[:3])}{', …' if len(bad) > 3 else ''}); nothing was written")


def save_export(net: torch.nn.Module, folder: Path, *, classes: list[str], data_config: dict, card: str) -> Path:
    """Write `net` (the timm model, unwrapped, dual norms or not) as timm's Hub folder at `folder`,
    replacing an export already there. data_config: timm's preprocessing keys (input_size,
    interpolation, crop_pct, crop_mode, mean, std) that the pretrained_cfg records."""
    folder = Path(folder)
    plain = plain_net(net, str(folder))
    staging = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        save_for_hf(plain, staging, model_config={"label_names": list(classes)}, data_config=data_config,
                    safe_serialization=True)
        (staging / "README.md").write_text(card, encoding="utf-8")
        for file in staging.iterdir():  # safetensors writes its file for its owner only
            file.chmod(0o644)
        staging.chmod(0o755)
        replace_folder(staging, folder)
    finally:  # a full disk, a signal: no half-written folder left behind
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def plain_net(net: torch.nn.Module, what: str) -> torch.nn.Module:
    """A fresh timm model of net's architecture holding net's main-norm weights (loaded strictly)."""
    state = {k: v.detach().contiguous().cpu() for k, v in export_main_norm(net).items()}
    refuse_non_finite(state, what)
    architecture, args = net.pretrained_cfg["architecture"], get_model_args(net)
    plain = timm.create_model(architecture, pretrained=False, **args)
    trained_eps = batch_norm_eps(net)
    if batch_norm_eps(plain) != trained_eps and len(set(trained_eps)) == 1:  # bn_eps of the run config
        try:  # EfficientNet/MobileNet families take it as an argument, which config.json records
            plain = timm.create_model(architecture, pretrained=False, bn_eps=trained_eps[0], **args)
        except TypeError:
            pass
    if batch_norm_eps(plain) != trained_eps:
        warnings.warn(f"{architecture} as timm builds it normalises with BatchNorm eps {batch_norm_eps(plain)[:1]}, "
                      f"the trained model with {trained_eps[:1]}: whoever loads {what} gets slightly other logits")
    plain.load_state_dict(state, strict=True)
    plain.pretrained_cfg = {k: v for k, v in plain.pretrained_cfg.items() if k in STRUCTURE_KEYS}
    return plain.eval()


def batch_norm_eps(net: torch.nn.Module) -> list[float]:
    """The eps of each BatchNorm on the main route (a dual norm's aux copy left out)."""
    return [m.eps for name, m in net.named_modules()
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and not name.endswith(f".{AUX}")]


def replace_folder(new: Path, target: Path) -> None:
    """new becomes target; an old target is moved aside first and removed after (a directory cannot
    be renamed over a non-empty one)."""
    if not target.exists():
        new.rename(target)
        return
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    target.rename(old)
    new.rename(target)
    shutil.rmtree(old)


def read_metadata(path: Path) -> dict:
    """The metadata of a single-file export (or of any .safetensors file)."""
    with safe_open(str(path), framework="pt") as file:
        return file.metadata() or {}
