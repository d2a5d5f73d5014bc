"""Exponential moving average of the weights (TF EfficientNet recipe: decay 0.9999), kept on the
device, updated after every optimizer step, evaluated each epoch and saved beside each checkpoint
as ema.safetensors (plain tensors: loading needs no pickle)."""
from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file, save_file
from timm.utils import ModelEmaV3

EMA_FILE = "ema.safetensors"


def create_ema(model, decay: float, device) -> ModelEmaV3 | None:
    """model: the unwrapped training model (its dual norms are averaged too). decay 0 → no EMA."""
    return ModelEmaV3(model, decay=decay, device=device) if decay > 0 else None


def save_ema(ema: ModelEmaV3, folder: Path) -> None:
    state = {k: v.detach().contiguous().cpu() for k, v in ema.module.state_dict().items()}
    save_file(state, str(Path(folder) / EMA_FILE))


def load_ema(ema: ModelEmaV3, folder: Path) -> bool:
    """False when the checkpoint has no EMA (it then starts from the loaded weights)."""
    path = Path(folder) / EMA_FILE
    if not path.is_file():
        return False
    ema.module.load_state_dict(load_file(str(path)), strict=True)
    return True
