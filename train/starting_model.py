"""`model=local-dir:FOLDER` or `model=hf-hub:USER/NAME`: a shared model (an export of this trainer,
or any timm model in the Hub layout) as a run's starting point, with its own preprocessing.

It means `model=<the architecture its config.json names> pretrained_path=<the same name>` (the
weights; models/factory.py loads them, a fresh head where the classes differ) plus the
preprocessing its pretrained_cfg records: normalization (its mean/std), data.val_image_size and
data.crop_ratio. These act like a preset where the model is named: they override the recipe (its
base recipes too), and keys given on the command line after `model=…` override them. (For the
recipe's own preprocessing, name the weights alone: `model: <architecture>` and
`pretrained_path: local-dir:…`.) The resolved config.yaml of the run says what was used.
"""
from __future__ import annotations

from omegaconf import OmegaConf

from common.errors import UserInputError
from models.factory import NORMALIZATION, normalization_named
from models.hub import absolute, is_hub_name, read_hub_config
from train.config_checks import ConfigError


def with_starting_model(layers: list, merge) -> list:
    """layers (the recipe, then the command line's overrides, in order) with the named model's
    preprocessing inserted and its architecture and weights set; unchanged for a timm model name.
    merge: layers → the merged config."""
    name = merge(layers).model
    if not is_hub_name(name):
        return layers
    where = max(i for i, layer in enumerate(layers) if OmegaConf.select(layer, "model") is not None)
    if merge(layers).pretrained_path:
        raise ConfigError(f"bad value for pretrained_path: model={name} brings its own weights; give one of them")
    try:
        pretrained_cfg, architecture, _ = read_hub_config(name)
    except UserInputError as error:
        raise ConfigError(f"bad value for model: {error}") from None
    preprocessing = preprocessing_of(pretrained_cfg)
    at = where + 1  # right after the layer that names it: the recipe, or an override
    if "normalization" not in preprocessing and not any(OmegaConf.select(layer, "normalization")
                                                        for layer in layers[at:]):
        raise ConfigError(f"bad value for model: {name} normalises with mean {pretrained_cfg.get('mean')} and "
                          f"std {pretrained_cfg.get('std')}, neither {' nor '.join(NORMALIZATION)}: give "
                          f"normalization=… after it to fine-tune with one of those")
    weights = OmegaConf.create({"model": architecture, "pretrained_path": absolute(name)})
    return [*layers[:at], OmegaConf.create(preprocessing), *layers[at:], weights]


def preprocessing_of(pretrained_cfg: dict) -> dict:
    """The config keys that a timm pretrained_cfg's preprocessing sets."""
    settings = {"data": {"val_image_size": int(pretrained_cfg.get("input_size", (3, 224, 224))[-1]),
                         "crop_ratio": float(pretrained_cfg.get("crop_pct", 0.875))}}
    mean, std = NORMALIZATION["imagenet"]  # timm's default where a pretrained_cfg has none
    normalization = normalization_named(pretrained_cfg.get("mean", mean), pretrained_cfg.get("std", std))
    return {**settings, "normalization": normalization} if normalization else settings
