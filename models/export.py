"""Plain-model weights out of a trained (possibly dual-norm) model: main norms only, as safetensors
that `timm.create_model(name, num_classes=n)` loads with strict=True. The file's metadata names
the model, its input normalisation and its classes, so tools can rebuild it without our config.
Weights with a NaN or an infinity are never written (NonFiniteWeights)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from models.dual_norm import export_main_norm


EXPORT_FORMAT = "advprop-main-norm"  # the metadata "format" of our exports
EXPORT_FORMATS = (EXPORT_FORMAT, "advprop-main-bn")  # what loaders accept: today's, and the name before norms


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


def export_settings(cfg, classes: list[str]) -> dict:
    """save_main_norm's keyword arguments for a model trained with run config `cfg`."""
    return dict(model_name=cfg.model, normalization=cfg.normalization, classes=classes,
                image_size=cfg.data.val_image_size or cfg.data.image_size, crop_ratio=cfg.data.crop_ratio)


def save_main_norm(net: torch.nn.Module, path: Path, *, model_name: str, normalization: str,
                   classes: list[str], image_size: int = 0, crop_ratio: float = 0.0) -> Path:
    """Atomically write the main-norm state dict of `net` (the timm model, unwrapped) to path.
    image_size/crop_ratio: the val geometry (0: unknown), so evaluation can match it without the run."""
    path = Path(path)
    state = {k: v.detach().contiguous().cpu() for k, v in export_main_norm(net).items()}
    refuse_non_finite(state, str(path))
    metadata = {"model": model_name, "normalization": normalization, "num_classes": str(len(classes)),
                "classes": json.dumps(classes), "format": EXPORT_FORMAT}
    if image_size:
        metadata.update(image_size=str(image_size), crop_ratio=str(crop_ratio))
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        save_file(state, str(temporary), metadata=metadata)
        temporary.chmod(0o644)
        os.replace(temporary, path)
    finally:  # a full disk or a folder at `path`: no half-written temporary left behind
        temporary.unlink(missing_ok=True)
    return path


def read_metadata(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as file:
        return file.metadata() or {}
