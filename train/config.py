"""Typed run configuration: a YAML recipe from configs/ merged onto this schema, then `key=value`
overrides from the command line (OmegaConf structured configs: an unknown key, a wrong type or a
bad value is one clear error before any work).

    python train/run.py                                   # configs/demo.yaml
    python train/run.py config=configs/x.yaml epochs=3 attack.eps=1 model=resnet18

Attack sizes are in pixel units like the paper (attack.eps=4 means 4/255 on [0, 1] images).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from train.errors import UserInputError

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RECIPE = REPO_ROOT / "configs" / "demo.yaml"

METHODS = ("vanilla", "advprop")  # train/methods.py registers the functions under these names
LOADERS = ("torchvision", "ffcv", "dali")


class ConfigError(UserInputError):
    """A recipe or override that cannot run; the message names the key and what is wrong."""


@dataclass
class AttackConfig:
    eps: float = 4.0  # L∞ radius in pixel units (/255)
    step_size: float = 1.0  # pixel units per PGD step
    steps: int = 5
    targeted: bool = True  # Xie et al.: a random wrong class as target
    random_start: bool = True


@dataclass
class ProgressiveConfig:
    """FFCV progressive resizing (ffcv-imagenet): train crops grow from min_res to max_res."""
    min_res: int = 0  # train resolution up to start_epoch; 0 → off (data.image_size throughout)
    max_res: int = 0  # from end_epoch on; 0 → data.image_size (linear in between, multiples of 8)
    start_epoch: int = 0
    end_epoch: int = 0


@dataclass
class FfcvConfig:
    train_beton: str = ""  # "" → <data.root>/ffcv/train.beton, converted on first use; a path: used as is
    val_beton: str = ""
    # storage of the converted .beton (tools/convert_ffcv.py --help explains them; same defaults)
    max_resolution: int = 500  # longer side cap, px
    write_mode: str = "proportion"  # raw | jpg | smart | proportion
    compress_probability: float = 0.5  # proportion: share stored as JPEG, the rest raw pixels
    jpeg_quality: int = 90
    os_cache: bool = True  # True: the .beton fits in RAM (page cache); False: ffcv's process cache
    progressive: ProgressiveConfig = field(default_factory=ProgressiveConfig)


@dataclass
class DaliConfig:
    threads: int = 4  # CPU threads per process
    prefetch: int = 2  # batches queued ahead


@dataclass
class DataConfig:
    dataset: str = "digits"  # digits: built offline from scikit-learn | imagefolder: your folder
    root: str = "data/digits"  # holds the train_dir/ and val_dir/ ImageFolders
    train_dir: str = "train"
    val_dir: str = "val"
    image_size: int = 224  # train crop
    val_image_size: int = 0  # 0 → image_size
    crop_ratio: float = 0.875  # val: resize shorter side to size/crop_ratio, center crop (224/256)
    min_scale: float = 0.08  # RandomResizedCrop area scale lower bound
    hflip: bool = True
    workers: int = 2  # decode workers (torchvision, ffcv) per process
    ffcv: FfcvConfig = field(default_factory=FfcvConfig)
    dali: DaliConfig = field(default_factory=DaliConfig)


@dataclass
class OptimizerConfig:
    name: str = "sgd"  # any timm optimizer: sgd, momentum, adamw, rmsproptf, lamb, ...
    lr_per_256: float = 0.1  # LR = lr_per_256 × global batch / 256
    momentum: float = 0.9
    weight_decay: float = 5e-5  # applied to weights with ndim ≥ 2 only (timm's rule)
    eps: Optional[float] = None  # optimizer epsilon (rmsproptf: 1e-3), None → optimizer default


@dataclass
class ScheduleConfig:
    name: str = "cosine"  # cosine | step (timm schedulers, updated every optimizer step)
    warmup_epochs: float = 0.0
    warmup_lr: float = 1e-6
    min_lr: float = 1e-6
    decay_epochs: float = 2.4  # step: decay every decay_epochs
    decay_rate: float = 0.97  # step: multiply by decay_rate


@dataclass
class Config:
    name: str = "demo"
    output_dir: str = ""  # "" → runs/<name>
    seed: int = 0
    # model
    model: str = "resnet18"  # any timm model name
    pretrained_path: str = ""  # local weights file (timm/safetensors state dict); "" → random init
    normalization: str = "imagenet"  # imagenet (torchvision stats) | inception (mean = std = 0.5)
    drop_rate: float = 0.0
    bn_momentum: Optional[float] = None  # torch convention (TF's 0.99 is 0.01); None → timm default
    bn_eps: Optional[float] = None
    # method
    method: str = "advprop"  # one of METHODS
    attack: AttackConfig = field(default_factory=AttackConfig)
    # data
    loader: str = "torchvision"  # one of LOADERS
    data: DataConfig = field(default_factory=DataConfig)
    batch_size: int = 64  # per process
    # optimisation
    epochs: int = 10
    grad_accum_steps: int = 1
    label_smoothing: float = 0.0
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    channels_last: bool = True
    # evaluation
    eval_aux_bn: bool = False  # also validate through the auxiliary BNs each epoch
    eval_robust: bool = True  # robust top-1 under the training attack (untargeted) at the end
    # logging and checkpoints
    tracker: str = "wandb"  # wandb (offline without a login) | none
    wandb_project: str = "advprop"
    log_every: int = 10  # steps between metric lines
    image_log_every: int = 100  # steps between clean | adversarial | perturbation panels; 0 → off
    resume: str = "auto"  # auto: newest valid checkpoint in output_dir, if any | none | PATH
    keep_checkpoints: int = 2  # newest epoch checkpoints kept besides best


def load_config(args: list[str] | None = None) -> DictConfig:
    """Schema ← recipe (config=PATH, default configs/demo.yaml) ← key=value overrides, validated."""
    args = list(args or [])
    recipe = DEFAULT_RECIPE
    overrides = []
    for arg in args:
        if "=" not in arg:
            raise ConfigError(f"argument {arg!r} is not of the form key=value")
        key, value = arg.split("=", 1)
        if key == "config":
            recipe = Path(value)
        else:
            overrides.append(arg)
    if not recipe.is_file():
        raise ConfigError(f"config file {recipe} does not exist")
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(recipe),
                              OmegaConf.from_dotlist(overrides))
    except OmegaConfBaseException as error:
        raise ConfigError(f"bad config ({recipe}): {error}".replace("\n", "; ")) from None
    validate(cfg)
    if not cfg.output_dir:
        cfg.output_dir = str(Path("runs") / cfg.name)
    return cfg


def validate(cfg: DictConfig) -> None:
    checks = [
        (cfg.method in METHODS, "method", f"must be one of {METHODS}"),
        (cfg.loader in LOADERS, "loader", f"must be one of {LOADERS}"),
        (cfg.data.dataset in ("digits", "imagefolder"), "data.dataset", "must be digits or imagefolder"),
        (cfg.normalization in ("imagenet", "inception"), "normalization", "must be imagenet or inception"),
        (cfg.schedule.name in ("cosine", "step"), "schedule.name", "must be cosine or step"),
        (cfg.tracker in ("wandb", "none"), "tracker", "must be wandb or none"),
        (cfg.epochs >= 1, "epochs", "must be ≥ 1"),
        (cfg.batch_size >= 1, "batch_size", "must be ≥ 1"),
        (cfg.grad_accum_steps >= 1, "grad_accum_steps", "must be ≥ 1"),
        (cfg.attack.eps >= 0, "attack.eps", "must be ≥ 0 (pixel units)"),
        (cfg.attack.steps >= 0, "attack.steps", "must be ≥ 0"),
        (cfg.attack.step_size >= 0, "attack.step_size", "must be ≥ 0 (pixel units)"),
        (0 < cfg.data.min_scale <= 1, "data.min_scale", "must be in (0, 1]"),
        (0 < cfg.data.crop_ratio <= 1, "data.crop_ratio", "must be in (0, 1]"),
        (cfg.data.image_size >= 8, "data.image_size", "must be ≥ 8"),
        (0 <= cfg.label_smoothing < 1, "label_smoothing", "must be in [0, 1)"),
        (cfg.keep_checkpoints >= 1, "keep_checkpoints", "must be ≥ 1"),
        (cfg.data.ffcv.write_mode in ("raw", "jpg", "smart", "proportion"), "data.ffcv.write_mode",
         "must be raw, jpg, smart or proportion"),
        (cfg.data.ffcv.progressive.min_res <= (cfg.data.ffcv.progressive.max_res or cfg.data.image_size),
         "data.ffcv.progressive.min_res", "must be ≤ max_res (or data.image_size)"),
        (cfg.data.ffcv.progressive.start_epoch <= cfg.data.ffcv.progressive.end_epoch,
         "data.ffcv.progressive.start_epoch", "must be ≤ end_epoch"),
    ]
    for ok, key, problem in checks:
        if not ok:
            raise ConfigError(f"bad value for {key}: {OmegaConf.select(cfg, key)!r} {problem}")


def save_config(cfg: DictConfig, path: Path) -> None:
    path.write_text(OmegaConf.to_yaml(cfg, resolve=True))
