"""A run's model in the one export format (models/export.py: timm's Hub folder and its card), written
by the end of a run (train/run.py), for W&B model artifacts (train/model_artifacts.py) and by
tools/export.py. Its config.json records the preprocessing the run validated with, so timm's own
transform (`resolve_data_config` + `create_transform`) evaluates it as the run did.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from omegaconf import OmegaConf

from models.export import save_export
from models.factory import NORMALIZATION
from pipelines.backends import BACKENDS
from train.model_card import model_card


def val_preprocessing(cfg) -> dict:
    """timm's data config (config.json's pretrained_cfg) of the run's validation: size, crop, resize
    method, and the mean/std that our models/factory.py `Normalized` applies inside."""
    size, ratio = cfg.data.val_image_size or cfg.data.image_size, cfg.data.crop_ratio
    mean, std = NORMALIZATION[cfg.normalization]
    backend = BACKENDS[cfg.loader]  # its record says how it resizes and crops
    return {"input_size": (3, size, size), "interpolation": backend.val_resize,
            "crop_pct": ratio if backend.val_crop == "center fraction" else timm_crop_pct(size, ratio),
            "crop_mode": "center", "mean": mean, "std": std}


def timm_crop_pct(size: int, crop_ratio: float) -> float:
    """The crop_pct with which timm resizes the shorter side to the length our torchvision and DALI
    loaders use: they take round(size / crop_ratio), timm floor(size / crop_pct) (32 at 0.875:
    37 px, not 36). crop_ratio itself where the two agree (224 at 0.875: 256)."""
    resize = round(size / crop_ratio)
    return next(pct for pct in (crop_ratio, size / resize, size / (resize + 0.5)) if math.floor(size / pct) == resize)


def export_model(net, folder: Path, cfg, classes: list[str], results: dict, *, evaluations: list[dict] = (),
                 load_name: str = "") -> Path:
    """net: the unwrapped timm model (a `Normalized`'s .net). results: what the card reports
    (train/model_card.py). load_name: hf-hub:USER/NAME for the card's example, if it is going there."""
    preprocessing = val_preprocessing(cfg)
    card = model_card(cfg, classes, results, architecture=net.pretrained_cfg["architecture"],
                      preprocessing=preprocessing, evaluations=list(evaluations), load_name=load_name)
    return save_export(net, folder, classes=classes, data_config=preprocessing, card=card)


def final_results(report: dict, epoch: int) -> dict:
    """The card's numbers from the run's final report (summary.json)."""
    return {**{k: report[k] for k in ("clean_top1", "clean_top5", "robust_top1", "robust_attack", "val_images")
               if k in report}, "epoch": epoch, "measured": "measured by the run's final evaluation"}


def epoch_results(metrics: dict, epoch: int, prefix: str = "val") -> dict:
    """The card's numbers from an epoch's validation ({"val/top1": …} as metrics.jsonl has them;
    prefix val_ema: the EMA's)."""
    return {"clean_top1": metrics[f"{prefix}/top1"], "clean_top5": metrics.get(f"{prefix}/top5"), "epoch": epoch,
            "measured": f"measured by the validation after epoch {epoch}"}


def logged_epoch_results(run_dir: Path, epoch: int, prefix: str = "val") -> dict | None:
    """epoch_results of the epoch's validation line in the run's metrics.jsonl (None: not there)."""
    log = Path(run_dir) / "metrics.jsonl"
    lines = log.read_text().splitlines() if log.is_file() else []
    validated = [line for line in map(json.loads, lines) if line.get("epoch") == epoch and f"{prefix}/top1" in line]
    return epoch_results(validated[-1], epoch, prefix) if validated else None


def checkpoint_results(run_dir: Path | None, state) -> dict:
    """The numbers the run recorded of a checkpoint's weights (state: its TrainState): summary.json
    where they are the run's end (the epochs its config.yaml asks for now: a run extended since has
    another end), else the epoch's validation; none where the run recorded neither."""
    if run_dir is None or state.batch:  # a copied checkpoint folder, or one saved mid-epoch
        return {"epoch": state.epoch, "measured": "not measured: the run recorded no validation of these weights"}
    summary, config = run_dir / "summary.json", run_dir / "config.yaml"
    if summary.is_file() and config.is_file() and OmegaConf.load(config).get("epochs") == state.epoch:
        return final_results(json.loads(summary.read_text()), state.epoch)
    return logged_epoch_results(run_dir, state.epoch) or checkpoint_results(None, state)
