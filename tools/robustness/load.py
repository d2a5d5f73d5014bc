"""A model for evaluation from any weights we know, loaded strictly, downloaded only from an hf-hub: name.

    model, cfg, classes = load_any("runs/demo")                                  # run → checkpoints/best
    model, cfg, classes = load_any("runs/demo/checkpoints/epoch_0008")           # a checkpoint folder
    model, cfg, classes = load_any("runs/demo/final_model")                       # an export (timm's Hub layout)
    model, cfg, classes = load_any("hf-hub:USER/NAME")                            # the same on the Hub
    model, cfg, classes = load_any("runs/old/final_main_norm.safetensors")        # a single-file export of before
    model, cfg, classes = load_any("b0_ap.pth", model_name="tf_efficientnet_b0.ap_in1k")  # plain timm

model: a `Normalized` (takes [0, 1] images) in eval mode. cfg: a run config (train/config.py)
whose model, normalization and data.{image_size, val_image_size, crop_ratio} describe it, so its
val loader resizes and crops as the training run's validation did. classes: the class name of each
output, or None where the weights do not say.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from omegaconf.errors import OmegaConfBaseException

from models.export import OLD_EXPORT_FORMATS, read_metadata
from models.factory import NORMALIZATION, Normalized, create_net, normalization_named, read_weights
from models.hub import LOCAL_DIR, create_hub_net, is_export_folder, is_hub_name
from common.errors import UserInputError
from train.model_loading import checkpoint_folder, load_checkpoint_model
from train.config import onto_schema, read_saved_config


def load_any(path: str | Path, *, model_name: str | None = None):
    if is_hub_name(str(path)):
        return load_hub(str(path), model_name)
    path = Path(path)
    if is_export_folder(path):
        return load_hub(f"{LOCAL_DIR}{path}", model_name)
    if path.is_dir():
        model, cfg, classes = load_checkpoint_model(checkpoint_folder(path))
        check_model_name(model_name, cfg.model, path)
        return model, cfg, classes
    if not path.is_file():
        raise UserInputError(f"{path} does not exist (expected a run or checkpoint folder, an export folder, "
                             f"an hf-hub:USER/NAME, an exported .safetensors file, or a timm state dict with "
                             f"--model NAME)")
    try:
        metadata = read_metadata(path) if path.suffix == ".safetensors" else {}
    except Exception as error:  # safetensors' own error type: not a safetensors file
        raise UserInputError(f"cannot read weights {path}: {type(error).__name__}: {error}") from None
    if metadata.get("format") in OLD_EXPORT_FORMATS:
        check_model_name(model_name, metadata["model"], path)
        return load_export(path, metadata)
    if not model_name:
        raise UserInputError(f"{path} is a plain state dict: name its timm architecture with --model NAME "
                             f"(e.g. --model tf_efficientnet_b0.ap_in1k)")
    return load_timm_state(path, model_name)


def check_model_name(given: str | None, recorded: str, path: Path) -> None:
    """--model names the architecture of a plain state dict; our files record their own."""
    if given and given != recorded:
        raise UserInputError(f"--model {given} does not match {path}, which records model {recorded}: "
                             f"leave --model out (it is only for plain timm state dicts)")


def load_hub(name: str, model_name: str | None):
    """An export folder (local-dir:) or an hf-hub: model: timm builds it and loads its weights; its
    config.json's pretrained_cfg gives the normalisation, the val geometry and the class names."""
    net = create_hub_net(name)
    check_model_name(model_name, net.pretrained_cfg["architecture"], Path(name))
    model, cfg = described_by_timm(net, net.pretrained_cfg["architecture"], name)
    classes = net.pretrained_cfg.get("label_names")
    return model, cfg, list(classes) if isinstance(classes, (list, tuple)) else None


def described_by_timm(net: torch.nn.Module, model: str, source: str):
    """(net wrapped with the normalisation of its pretrained_cfg, a run config with its val geometry)."""
    pretrained = net.pretrained_cfg or {}
    mean, std = NORMALIZATION["imagenet"]  # timm's default where a pretrained_cfg has none
    normalization = normalization_named(pretrained.get("mean", mean), pretrained.get("std", std))
    if normalization is None:
        raise UserInputError(f"{source} normalises with mean {pretrained['mean']} and std {pretrained['std']}: not "
                             f"constants we normalise with ({', '.join(NORMALIZATION)})")
    size = pretrained.get("input_size", (3, 224, 224))[-1]
    cfg = onto_schema({
        "model": model, "normalization": normalization,
        "data": {"image_size": size, "val_image_size": size, "crop_ratio": pretrained.get("crop_pct", 0.875)}})
    return Normalized(net, normalization).eval(), cfg


def load_export(path: Path, metadata: dict):
    """A single-file export of before the folder (tools/export.py then); the val geometry from the
    run's config.yaml beside it, else from the
    file's metadata (exports since image_size was recorded), else the defaults."""
    run_config = path.parent / "config.yaml"
    has_run_config = run_config.is_file()
    geometry = {"data": {"image_size": int(metadata["image_size"]), "val_image_size": int(metadata["image_size"]),
                         "crop_ratio": float(metadata["crop_ratio"])}} if "image_size" in metadata else {}
    try:
        run_settings = read_saved_config(run_config) if has_run_config else {}
        cfg = onto_schema(geometry, run_settings,
                          {"model": metadata["model"], "normalization": metadata["normalization"]})
    except OmegaConfBaseException as error:
        raise UserInputError(f"{run_config} (beside {path.name}) is not a run config: {error}") from None
    if not geometry and not has_run_config:
        warnings.warn(f"{path.name} predates recorded val geometry and has no config.yaml beside it: "
                      f"evaluating at the defaults (image size {cfg.data.image_size}, crop ratio "
                      f"{cfg.data.crop_ratio}); put the run's config.yaml beside it if it was trained otherwise")
    classes = json.loads(metadata["classes"])
    net = create_net(cfg.model, len(classes), bn_eps=cfg.bn_eps)
    load_strict(net, read_weights(path), path)
    return Normalized(net, cfg.normalization).eval(), cfg, classes


def load_timm_state(path: Path, name: str):
    """A plain timm state dict; normalisation and val geometry from timm's pretrained config of `name`."""
    state = read_weights(path)
    net = create_net(name, 1000)
    head = next(n for n, m in net.named_modules() if m is net.get_classifier())
    if f"{head}.weight" in state and state[f"{head}.weight"].shape[0] != 1000:
        net.reset_classifier(state[f"{head}.weight"].shape[0])
    load_strict(net, state, path)
    model, cfg = described_by_timm(net, name, f"timm's {name}")
    num_classes = net.get_classifier().weight.shape[0]
    return model, cfg, imagenet_wnids() if num_classes == 1000 else None


def imagenet_wnids() -> list[str]:
    """The ImageNet-1k WordNet ids in class-index order, from timm's offline copy."""
    from timm.data import ImageNetInfo
    return list(ImageNetInfo().label_names())


def load_strict(net: torch.nn.Module, state: dict, path: Path) -> None:
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise UserInputError(f"{path} does not fit {type(net).__name__}: "
                             f"{' '.join(str(error).splitlines()[:3])[:500]}") from None
