"""Validation of a merged run config: every setting a run only meets later (a step, a report, a
loader) is checked here, before any work, and refused as one line naming the key and the problem.

Each group below returns (holds, dotted key, problem) triples; the attack kinds
(train/attacks/, their records' `checks`), the methods (train/methods/, their records' `checks`), the
loader backends (pipelines/backends/, their records' `checks`) and the batch augmentations
(train/batch_augment.py) add their own.
"""
from __future__ import annotations

import math
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from common.errors import UserInputError
from models.factory import model_name_problem
from models.hub import hub_name_problem, is_hub_name
from pipelines.backends import BACKENDS
from pipelines.backends.augment_policy import timm_transform
from train.attacks import attack_checks
from train.batch_augment import checks as batch_augment_checks
from train.methods import METHODS as METHOD_RECORDS
from train.methods.common import LOSSES
from train.tracking import wandb_project_problem

DATASETS = ("digits", "imagefolder", "webdataset")
ATTACK_NODES = ("attack", "eval_attack")  # config nodes that accept a preset name

Check = tuple[bool, str, str]


class ConfigError(UserInputError):
    """A recipe or override that cannot run; the message names the key and what is wrong."""


def validate(cfg: DictConfig) -> None:
    # no setting means anything as NaN or ±inf (an LR of nan would write NaN weights at the first step)
    for key in non_finite_keys(OmegaConf.to_container(cfg, resolve=True)):
        raise ConfigError(f"bad value for {key}: {OmegaConf.select(cfg, key)!r} must be a finite number")
    checks = [*optimizer_checks(cfg), *run_checks(cfg), *data_checks(cfg), *attack_node_checks(cfg)]
    for record in METHOD_RECORDS.values():  # each method checks its options, and what it needs when chosen
        checks += record.checks(cfg)
    for backend in BACKENDS.values():  # each backend too
        checks += backend.checks(cfg)
    checks += batch_augment_checks(cfg, METHOD_RECORDS.get(cfg.method))
    for ok, key, problem in checks:
        if not ok:
            raise ConfigError(f"bad value for {key}: {OmegaConf.select(cfg, key)!r} {problem}")
    if cfg.data.auto_augment:
        timm_transform(cfg.data.auto_augment, cfg.data.image_size)  # timm parses the name, or one-line error


def non_finite_keys(node, prefix: str = "") -> list[str]:
    """Dotted keys whose value is a NaN or infinite float."""
    if isinstance(node, dict):
        return [key for name, value in node.items() for key in non_finite_keys(value, f"{prefix}{name}.")]
    return [prefix.rstrip(".")] if isinstance(node, float) and not math.isfinite(node) else []


def optimizer_checks(cfg: DictConfig) -> list[Check]:
    opt, sched = cfg.optimizer, cfg.schedule
    return [
        (opt.lr_per_256 >= 0, "optimizer.lr_per_256", "must be ≥ 0"),
        (opt.weight_decay >= 0, "optimizer.weight_decay", "must be ≥ 0"),
        (0 <= opt.momentum <= 1, "optimizer.momentum", "must be in [0, 1]"),
        (opt.eps is None or opt.eps > 0, "optimizer.eps", "must be > 0 (it keeps a division finite)"),
        (sched.name in ("cosine", "step"), "schedule.name", "must be cosine or step"),
        (sched.warmup_epochs >= 0, "schedule.warmup_epochs", "must be ≥ 0"),
        (sched.warmup_lr >= 0, "schedule.warmup_lr", "must be ≥ 0"),
        (sched.min_lr >= 0, "schedule.min_lr", "must be ≥ 0"),
        (sched.decay_epochs > 0, "schedule.decay_epochs", "must be > 0"),
        (sched.decay_rate > 0, "schedule.decay_rate", "must be > 0"),
    ]


def run_checks(cfg: DictConfig) -> list[Check]:
    """The model, the loop, reporting and checkpoints."""
    methods, model_problem = tuple(METHOD_RECORDS), model_name_problem(cfg.model)
    return [
        (model_problem is None, "model", model_problem),
        pretrained_path_check(cfg.pretrained_path),
        (cfg.method in methods, "method", f"must be one of {methods}"),
        (cfg.epochs >= 1, "epochs", "must be ≥ 1"),
        (cfg.batch_size >= 1, "batch_size", "must be ≥ 1"),
        (cfg.grad_accum_steps >= 1, "grad_accum_steps", "must be ≥ 1"),
        (0 <= cfg.label_smoothing < 1, "label_smoothing", "must be in [0, 1)"),
        (cfg.loss in LOSSES, "loss", f"must be one of {LOSSES}"),
        (cfg.grad_clip_norm >= 0, "grad_clip_norm", "must be ≥ 0 (0: no clipping)"),
        (0 <= cfg.drop_rate < 1, "drop_rate", "must be in [0, 1)"),
        (0 <= cfg.drop_path_rate < 1, "drop_path_rate", "must be in [0, 1)"),
        (cfg.bn_momentum is None or 0 <= cfg.bn_momentum <= 1, "bn_momentum", "must be in [0, 1]"),
        (cfg.bn_eps is None or cfg.bn_eps > 0, "bn_eps", "must be > 0"),
        (0 <= cfg.ema_decay < 1, "ema_decay", "must be in [0, 1)"),
        (cfg.normalization in ("imagenet", "inception"), "normalization", "must be imagenet or inception"),
        (cfg.on_nonfinite in ("stop", "skip"), "on_nonfinite", "must be stop or skip"),
        (cfg.nonfinite_check in ("auto", "host", "device"), "nonfinite_check", "must be auto, host or device"),
        (cfg.collective_timeout_s >= 1, "collective_timeout_s", "must be ≥ 1 (seconds)"),
        (cfg.log_every >= 1, "log_every", "must be ≥ 1 (steps between metric lines)"),
        (cfg.image_log_every >= 0, "image_log_every", "must be ≥ 0 (0: no image panels)"),
        (cfg.tracker in ("wandb", "none"), "tracker", "must be wandb or none"),
        (cfg.wandb_log_checkpoints in ("best", "all", "none"), "wandb_log_checkpoints", "must be best, all or none"),
        *wandb_checks(cfg),
        (cfg.keep_checkpoints >= 1, "keep_checkpoints", "must be ≥ 1"),
        (cfg.checkpoint_every_steps >= 0, "checkpoint_every_steps", "must be ≥ 0"),
    ]


def pretrained_path_check(path: str) -> Check:
    if is_hub_name(path):
        problem = hub_name_problem(path)
        return problem is None, "pretrained_path", problem
    kind = "a folder" if Path(path).is_dir() else "not a file"
    return not path or Path(path).is_file(), "pretrained_path", \
        f"is {kind} (a weights file, or local-dir:FOLDER / hf-hub:USER/NAME)"


def wandb_checks(cfg: DictConfig) -> list[Check]:
    """W&B's own rule for the project name (it would refuse the run only once the run folder is written)."""
    problem = wandb_project_problem(cfg.wandb_project) if cfg.tracker == "wandb" else None
    return [(problem is None, "wandb_project", problem)]


def data_checks(cfg: DictConfig) -> list[Check]:
    data, loaders = cfg.data, tuple(BACKENDS)
    augmenting = [name for name, backend in BACKENDS.items() if backend.auto_augment]
    return [
        (cfg.loader in loaders, "loader", f"must be one of {loaders}"),
        (data.dataset in DATASETS, "data.dataset", f"must be one of {DATASETS}"),
        (data.num_classes >= 0, "data.num_classes", "must be ≥ 0 (0: from the shards)"),
        (data.workers >= 0, "data.workers", "must be ≥ 0 (0: decode in the training process)"),
        (data.image_size >= 8, "data.image_size", "must be ≥ 8"),
        (data.val_image_size >= 0, "data.val_image_size", "must be ≥ 0 (0: data.image_size)"),
        (0 < data.min_scale <= 1, "data.min_scale", "must be in (0, 1]"),
        (0 < data.crop_ratio <= 1, "data.crop_ratio", "must be in (0, 1]"),
        (not data.auto_augment or cfg.loader in augmenting, "data.auto_augment",
         f"is applied by loader={' or loader='.join(augmenting)} only"),
    ]


def attack_node_checks(cfg: DictConfig) -> list[Check]:
    """Each attack node's values, as its kind's record checks them; the training attack must take a
    step with a method that trains on adversarial examples (its record's `attacks`)."""
    record = METHOD_RECORDS.get(cfg.method)
    attacking = record is not None and record.attacks
    needed = (f"with method={cfg.method} (0 steps make no adversarial example; method=vanilla trains "
              f"without an attack)") if attacking else ""
    checks = attack_checks(cfg.attack, "attack", needed=needed)
    if cfg.eval_attack is not None:
        checks += attack_checks(cfg.eval_attack, "eval_attack")
    return checks
