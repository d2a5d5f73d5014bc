"""A checkpoint's model outside training (tools/export.py, tools/evaluate.py): the checkpoint folder
of a run, and the model rebuilt from its config.yaml and classes.json, weights loaded strictly."""
from __future__ import annotations

import json
from pathlib import Path

from omegaconf import OmegaConf
from safetensors.torch import load_file

from common.errors import UserInputError
from models.factory import create_model
from models.hub import is_export_folder
from train.config import onto_schema, read_saved_config
from train.run_state import CheckpointError


def checkpoint_folder(folder: Path) -> Path:
    """A checkpoint folder itself, or a run folder's (or its checkpoints/ folder's) best, else last."""
    if is_export_folder(folder):
        raise UserInputError(f"{folder} is a model export (timm's Hub layout), not a checkpoint: give the run or "
                             f"checkpoint folder it came from")
    for candidate in (folder, folder / "best", folder / "last",
                      folder / "checkpoints" / "best", folder / "checkpoints" / "last"):
        if (candidate / "model.safetensors").is_file():
            return candidate
    raise UserInputError(f"{folder} is neither a checkpoint folder (no model.safetensors) nor a run folder "
                         f"with checkpoints/best or checkpoints/last")


def load_checkpoint_model(folder: Path):
    """(model, cfg, classes) rebuilt from a checkpoint folder, weights loaded strictly."""
    folder = Path(folder)
    try:
        cfg = onto_schema(read_saved_config(folder / "config.yaml"))
        classes = json.loads((folder / "classes.json").read_text())
        state = load_file(str(folder / "model.safetensors"))
    except Exception as error:  # missing file, bad YAML/JSON, truncated safetensors
        raise CheckpointError(f"checkpoint {folder} is unreadable: {type(error).__name__}: {error}") from None
    dual = any(".main." in key for key in state)
    model = create_model(OmegaConf.merge(cfg, {"pretrained_path": ""}), len(classes), dual_norm=dual)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError:
        raise CheckpointError(f"checkpoint {folder}: {weights_mismatch(model.state_dict(), state, cfg, classes)}"
                              ) from None
    return model.eval(), cfg, classes


def weights_mismatch(expected: dict, saved: dict, cfg, classes: list[str]) -> str:
    """One line: how the saved weights differ from the model that config.yaml and classes.json describe."""
    missing = [k for k in expected if k not in saved]
    unexpected = [k for k in saved if k not in expected]
    shapes = [f"{k} {tuple(saved[k].shape)} vs {tuple(expected[k].shape)}" for k in expected
              if k in saved and saved[k].shape != expected[k].shape]
    parts = [f"{len(names)} {what} (e.g. {names[0]})" for names, what in (
        (missing, "tensors of the model missing"), (unexpected, "unexpected tensors"),
        (shapes, "of another shape (saved vs model)")) if names]
    return (f"model.safetensors does not hold the model its config.yaml and classes.json describe ({cfg.model}, "
            f"{len(classes)} classes): {', '.join(parts)}. The files come from different runs: copy the whole "
            f"checkpoint folder from one run")
