"""Plain-model weights out of a trained (possibly dual-BN) model: main BNs only, as safetensors
that `timm.create_model(name, num_classes=n)` loads with strict=True. The file's metadata names
the model, its input normalisation and its classes, so tools can rebuild it without our config."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from models.dual_bn import export_main_bn


def save_main_bn(net: torch.nn.Module, path: Path, *, model_name: str, normalization: str,
                 classes: list[str]) -> Path:
    """Atomically write the main-BN state dict of `net` (the timm model, unwrapped) to path."""
    path = Path(path)
    state = {k: v.detach().contiguous().cpu() for k, v in export_main_bn(net).items()}
    metadata = {"model": model_name, "normalization": normalization, "num_classes": str(len(classes)),
                "classes": json.dumps(classes), "format": "advprop-main-bn"}
    temporary = path.with_name(f".{path.name}.tmp")
    save_file(state, str(temporary), metadata=metadata)
    os.replace(temporary, path)
    return path


def read_metadata(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as file:
        return file.metadata() or {}
