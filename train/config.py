"""Typed run configuration: a YAML recipe from configs/ merged onto this schema, then `key=value`
overrides from the command line (OmegaConf structured configs: an unknown key, a wrong type or a
bad value is one clear error before any work; the checks are train/config_checks.py's).

    python train/run.py                                   # configs/demo.yaml
    python train/run.py config=configs/x.yaml epochs=3 attack.eps=1 model=resnet18

Attack sizes are in pixel units like the paper (attack.eps=4 means 4/255 on [0, 1] images). The
attack nodes (attack, eval_attack) are the chosen kind's (train/attacks/): `attack=pyramid` makes
cfg.attack a pyramid attack's node, `attack=pgd5` a PGD node with the paper's PGD-5.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import yaml
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from pipelines.backends import BACKENDS
from train.attacks import ATTACK_PRESETS, ATTACKS, kind_of, node_type
from train.config_checks import ATTACK_NODES, ConfigError, validate
from train.interpolations import refuse_resolvers, resolve_or_refuse
from train.methods import METHODS as METHOD_RECORDS
from train.starting_model import with_starting_model

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RECIPE = REPO_ROOT / "configs" / "demo.yaml"


@dataclass
class DataConfig:
    dataset: str = "digits"  # digits: built offline from scikit-learn | imagefolder: your folder | webdataset: tar shards
    root: str = "data/digits"  # holds the train_dir/ and val_dir/ ImageFolders (webdataset: the _info.json)
    train_dir: str = "train"  # webdataset: the info file's split name (val: val_dir, else "validation")
    val_dir: str = "val"
    # webdataset (pipelines/sources/shards/spec.py): brace patterns of tar shards, e.g. /data/x/train-{0000..0099}.tar,
    # local or remote (pipe:CMD, http://), "|N" = N samples; "" → the splits of data.root's _info.json
    train_shards: str = ""
    val_shards: str = ""
    num_classes: int = 0  # webdataset: 0 → the info file's, else one more than the largest label
    image_size: int = 224  # train crop
    val_image_size: int = 0  # 0 → image_size
    crop_ratio: float = 0.875  # val: resize shorter side to size/crop_ratio, center crop (224/256)
    min_scale: float = 0.08  # RandomResizedCrop area scale lower bound
    hflip: bool = True
    auto_augment: str = ""  # timm policy (torchvision, dali loaders): v0 (TF EfficientNet), original, rand-m9-mstd0.5
    workers: int = 2  # decode workers (torchvision, ffcv) per process
    # torchvision, dali: decode every image once before training (cached by the folder's contents,
    # pipelines/sources/folder/image_check.py) and leave out those that fail; false: find them mid-run (replaced)
    check_images: bool = True
    # On the training device, every loader (train/batch_augment.py: timm's RandomErasing, then Mixup/CutMix)
    random_erasing: float = 0.0  # probability per image (timm's --reprob; DeiT 0.25); 0 → off
    erasing_mode: str = "pixel"  # const | rand | pixel: the box's fill, in the model's normalised units (timm)
    erasing_count: int = 1  # up to this many boxes per image (timm's --recount)
    mixup: float = 0.0  # Mixup's Beta(α, α) (DeiT 0.8); 0 → off
    cutmix: float = 0.0  # CutMix's Beta(α, α) (DeiT 1.0); 0 → off
    mix_prob: float = 1.0  # chance that a batch (mix_mode=batch), a pair or an image is mixed
    mix_switch_prob: float = 0.5  # mixup and cutmix both on: chance of CutMix instead of Mixup
    mix_mode: str = "batch"  # batch | pair | elem: one λ per batch, per pair of images, per image (timm)
    # DeiT's repeated augmentation (3): each drawn image comes this many times, with its own
    # augmentation each, and an epoch still takes as many images as the data set has; 1 → off
    repeated_aug: int = 1
    # and one node per loader backend with options, named after it: dali, ffcv (schema())


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
    # any timm model name, or a shared model to start from: local-dir:FOLDER | hf-hub:USER/NAME (an
    # export: its architecture, weights and preprocessing; train/starting_model.py)
    model: str = "resnet18"
    # weights to start from: a local file (timm/safetensors state dict), or local-dir:/hf-hub: weights of
    # `model`'s architecture; "" → random init
    pretrained_path: str = ""
    normalization: str = "imagenet"  # imagenet (torchvision stats) | inception (mean = std = 0.5)
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0  # stochastic depth: timm's drop_path_rate (the deepest block's drop probability)
    bn_momentum: Optional[float] = None  # torch convention (TF's 0.99 is 0.01); None → timm default
    bn_eps: Optional[float] = None
    # method
    method: str = "advprop"  # a name of train/methods/ (METHODS)
    # the training attack: a node of a kind of train/attacks/ (its `kind`; default pgd) with targeted
    # and bn_mode; attack=NAME (a kind: pgd, pyramid; or a preset: pgd1, pgd3, pgd4, pgd5, fgsm) sets it
    attack: Any = field(default_factory=lambda: training_node("pgd"))
    # the run's loss: ce (softmax cross-entropy) | bce (timm's BinaryCrossEntropy, one sigmoid per
    # class: PyramidAT, DeiT III); the attack descends or ascends the same kind of loss, unsmoothed
    loss: str = "ce"
    bce_sum_classes: bool = False  # bce: per image the sum over classes (scenic's sigmoid CE), not timm's mean
    # and one node per method with options, named after it: advprop, goodfellow_mix, fast_advprop (schema())
    # data
    loader: str = "torchvision"  # a name of pipelines/backends/ (BACKENDS)
    data: DataConfig = field(default_factory=DataConfig)
    batch_size: int = 64  # per process
    # optimisation
    epochs: int = 10
    # batches per optimizer step (their mean gradient); an epoch whose batches do not divide by it
    # ends with a step over the batches left (timm's train.py does the same)
    grad_accum_steps: int = 1
    label_smoothing: float = 0.0  # with data.mixup/cutmix: inside the mixed targets (timm's Mixup)
    grad_clip_norm: float = 0.0  # clip the gradient's global L2 norm to this before each optimizer step; 0 → off
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    channels_last: bool = True
    ema_decay: float = 0.0  # EMA of the weights, evaluated and checkpointed (TF recipe 0.9999); 0 → off
    compile: bool = False  # torch.compile the model: attack and training forward (train/compile.py)
    sync_bn: bool = False  # multi-GPU: BN statistics over all GPUs (main and aux routes separately)
    on_nonfinite: str = "stop"  # a NaN/inf loss: stop (exit 3, weights untouched) | skip the batch
    nonfinite_check: str = "auto"  # host: check each loss before backward | device: no per-step sync (CUDA) | auto
    # evaluation
    eval_aux_norm: bool = False  # also validate through the auxiliary norms each epoch (dual-norm methods)
    eval_robust: bool = True  # robust top-1 under eval_attack (untargeted) at the end
    # a node of any attack kind, e.g. eval_attack=pgd5 (one attack for all methods), eval_attack=autoattack;
    # None → the training attack's node as its kind evaluates it (untargeted)
    eval_attack: Any = None
    # logging and checkpoints
    tracker: str = "wandb"  # wandb (offline without a login) | none
    wandb_project: str = "advprop"
    wandb_group: str = ""  # W&B run group ("" → none); tools/compare_methods.py groups its runs
    wandb_log_checkpoints: str = "best"  # model artifacts during training: best (each improvement) | all | none
    log_every: int = 10  # optimizer steps between metric lines (and one at each epoch's end)
    image_log_every: int = 100  # steps between clean | adversarial | perturbation panels; 0 → off
    resume: str = "auto"  # auto: newest valid checkpoint in output_dir, if any | none | PATH
    keep_checkpoints: int = 2  # newest checkpoints kept besides best
    checkpoint_every_steps: int = 0  # also checkpoint mid-epoch every N optimizer steps; 0 → off
    # several processes: how long one waits for the others in a collective before the run stops with
    # an error naming what it waited for (a frozen or lost process); the data's preparation is exempt
    collective_timeout_s: int = 600


def read_recipe(path: Path, seen: tuple[Path, ...] = ()) -> DictConfig:
    """A YAML recipe; `base: other.yaml` (relative to it) is read first and overridden by the rest.
    Each file is refused if it calls a resolver, before anything resolves it (train/interpolations.py)."""
    recipe = load_yaml_mapping(path)
    refuse_resolvers(recipe, f"config file {path}")
    base = recipe.pop("base", None)
    if base is None:
        return recipe
    base_path = path.parent / str(base)
    if not base_path.is_file():
        raise ConfigError(f"{path}: base recipe {base_path} does not exist")
    if base_path.resolve() in seen:
        raise ConfigError(f"{path}: base recipe {base_path} is already one of its own bases (a loop)")
    return OmegaConf.merge(read_recipe(base_path, seen + (path.resolve(),)), recipe)


def load_yaml_mapping(path: Path) -> DictConfig:
    """The recipe at path as a mapping of keys, or one ConfigError saying why it is not one."""
    try:
        recipe = OmegaConf.load(path)
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not a YAML recipe: it is not text (UTF-8)") from None
    except OmegaConfBaseException as error:  # a malformed interpolation: `name: ${oc.env`
        raise ConfigError(f"config file {path}: not a valid interpolation: {str(error).splitlines()[0]}") from None
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        raise ConfigError(f"config file {path} is not valid YAML: {getattr(error, 'problem', None) or error}{at}"
                          ) from None
    if not isinstance(recipe, DictConfig):
        raise ConfigError(f"config file {path} holds a {type(recipe).__name__.removesuffix('Config').lower()}, "
                          f"not a mapping of keys (model: resnet18, epochs: 10, ...)")
    return recipe


def schema() -> DictConfig:
    """The typed schema: Config, plus one node per registered method with options, named after it
    (cfg.advprop, cfg.goodfellow_mix, cfg.fast_advprop: train/methods/), and one per registered
    loader backend with options under data (cfg.data.dali, cfg.data.ffcv: pipelines/backends/)."""
    cfg = OmegaConf.structured(Config)
    with open_dict(cfg):
        for record in METHOD_RECORDS.values():
            if record.options is not None:
                cfg[record.name] = OmegaConf.structured(record.options)
    with open_dict(cfg.data):
        for backend in BACKENDS.values():
            if backend.options is not None:
                cfg.data[backend.name] = OmegaConf.structured(backend.options)
    return cfg


def load_config(args: list[str] | None = None, *,
                continuing: Callable[[DictConfig], DictConfig | None] | None = None) -> DictConfig:
    """Schema ← the method's attack defaults ← recipe (config=PATH, default configs/demo.yaml) ←
    key=value overrides, validated, then the method's finalize.

    `attack=NAME` (or `eval_attack=…`, or `attack: NAME` in a recipe) sets that node to an attack
    kind's defaults or to a preset of ATTACK_PRESETS; overrides apply in order, so `attack=pgd5
    attack.eps=2` changes only ε. A name (or `attack.kind=…`) of another kind than the node's
    starts the node afresh as that kind's: `attack=pyramid` after a recipe's PGD keys.
    continuing (train/run.py): cfg → the config of the run cfg continues, or None. For a continued
    run the method's attack defaults are the values that run was made with (a key it predates: the
    schema's, the old behaviour), so a method default that changed never stops or alters a resume.
    """
    args = list(args or [])
    recipe = DEFAULT_RECIPE
    overrides = []  # in command-line order: presets and dotted keys may interleave
    for arg in args:
        if "=" not in arg:
            raise ConfigError(f"argument {arg!r} is not of the form key=value")
        key, value = arg.split("=", 1)
        key = current_key(key, "command line")
        arg = f"{key}={value}"
        if key == "config":
            recipe = Path(value)
        elif key in ATTACK_NODES:
            overrides.append(OmegaConf.create({key: attack_setting(key, value)}))
        else:
            try:
                overrides.append(OmegaConf.from_dotlist([arg]))
            except OmegaConfBaseException as error:  # a malformed interpolation: `name=${oc.env`
                raise ConfigError(f"argument {arg!r} is not a valid interpolation: {str(error).splitlines()[0]}"
                                  ) from None
            refuse_resolvers(overrides[-1], "command line")
    if not recipe.is_file():
        raise ConfigError(f"config file {recipe} does not exist")
    try:
        recipe_cfg = with_current_names(read_recipe(recipe), str(recipe))
        for key in ATTACK_NODES:
            if isinstance(recipe_cfg.get(key), str):
                recipe_cfg[key] = attack_setting(key, recipe_cfg[key])
        layers = with_starting_model([recipe_cfg, *overrides], lambda layers: merged(layers, {}, recipe))
        cfg = merged(layers, {}, recipe)
        defaults = method_attack_defaults(cfg, continuing)
        if defaults:
            cfg = merged(layers, defaults, recipe)
    except OmegaConfBaseException as error:
        raise ConfigError(f"bad config ({recipe}): {error}".replace("\n", "; ")) from None
    validate(cfg)
    finalize = METHOD_RECORDS[cfg.method].finalize
    if finalize is not None:
        finalize(cfg)
    return cfg


def merged(layers: list, attack_defaults: dict, recipe: Path) -> DictConfig:
    cfg = onto_schema(*layers, attack_defaults=attack_defaults)
    resolve_or_refuse(cfg, f"bad config ({recipe} and the command line)")  # before anything reads a value
    if not cfg.output_dir:
        cfg.output_dir = str(Path("runs") / cfg.name)
    return cfg


def onto_schema(*layers, attack_defaults: dict | None = None) -> DictConfig:
    """The schema with layers (recipes, overrides, a saved config.yaml) merged on in order, each
    attack node first made the kind a layer names (attack_node), under the method's attack defaults."""
    attack_defaults = attack_defaults or {}
    cfg = schema()
    cfg.attack = attack_node("attack", "pgd", attack_defaults)
    for layer in layers:
        layer = OmegaConf.create(layer)
        for key in ATTACK_NODES:
            given = layer.get(key)
            if not isinstance(given, DictConfig):
                continue
            kind = given.get("kind") or (cfg[key].kind if cfg[key] is not None else "pgd")
            if cfg[key] is None or kind != cfg[key].kind:
                cfg[key] = attack_node(key, kind, attack_defaults if key == "attack" else {})
        cfg = OmegaConf.merge(cfg, layer)
    for key in ATTACK_NODES:
        if not isinstance(cfg[key], DictConfig) and not (key == "eval_attack" and cfg[key] is None):
            raise ConfigError(f"bad value for {key}: {cfg[key]!r} is not an attack: give a name ({key}=pgd5, "
                              f"{key}=pyramid) or the keys of one ({key}.eps=…)")
    return cfg


def training_node(kind: str):
    """The training attack's node of a kind, at its defaults (a dataclass instance)."""
    return node_type(ATTACKS[kind], training=True)()


def attack_node(key: str, kind: str, attack_defaults: dict) -> DictConfig:
    """A fresh node of an attack kind for config key `key` (attack: the training attack's, with
    targeted and bn_mode, and the method's attack defaults that the kind has)."""
    if kind not in ATTACKS:
        raise ConfigError(f"bad value for {key}.kind: {kind!r} must be one of {tuple(ATTACKS)}")
    training = key == "attack"
    if training and not ATTACKS[kind].trains:
        trainers = tuple(name for name, record in ATTACKS.items() if record.trains)
        raise ConfigError(f"bad value for attack: {kind} is an evaluation attack (it takes neither targets nor the "
                          f"training loss): train with one of {trainers}, evaluate with eval_attack={kind}")
    node = OmegaConf.structured(node_type(ATTACKS[kind], training))
    return OmegaConf.merge(node, {name: value for name, value in attack_defaults.items() if name in node})


def method_attack_defaults(cfg: DictConfig, continuing=None) -> dict:
    """The attack keys cfg's method sets under the recipe (load_config), or a continued run's values."""
    record = METHOD_RECORDS.get(cfg.method)
    if record is None or not record.attack_defaults:
        return {}
    saved = continuing(cfg) if continuing is not None else None
    if saved is None:
        return dict(record.attack_defaults)
    made_with = saved.get("attack") or {}
    before = OmegaConf.structured(node_type(kind_of(made_with), training=True))
    return {key: made_with.get(key, before[key]) for key in record.attack_defaults if key in before}


# keys renamed since (old → new): a recipe, an override or a saved run's config.yaml may still use
# the old name, which means the new one (BatchNorm-era names, now that every norm kind is dual)
RENAMED_KEYS = {"eval_aux_bn": "eval_aux_norm"}


def current_key(key: str, where: str = "") -> str:
    """key, or its new name if it is an old one (with a warning naming where it was given)."""
    if key not in RENAMED_KEYS:
        return key
    if where:
        print(f"note: {where}: {key} is now called {RENAMED_KEYS[key]} (the old name still works)", file=sys.stderr)
    return RENAMED_KEYS[key]


def with_current_names(node, where: str = "") -> DictConfig:
    """A config whose renamed keys carry their new names (the new name wins where both are given)."""
    node = OmegaConf.create(node)
    old = [key for key in RENAMED_KEYS if key in node]
    if not old:
        return node
    data = OmegaConf.to_container(node)
    for key in old:
        value = data.pop(key)
        data.setdefault(current_key(key, where), value)
    return OmegaConf.create(data)


def read_saved_config(path: Path) -> DictConfig:
    """A run's or checkpoint's config.yaml, in today's key names (runs made before a rename still
    load and resume). One this trainer wrote holds no resolver call (train/interpolations.py): an
    edited one that does is refused, not resolved."""
    saved = OmegaConf.load(path)
    refuse_resolvers(saved, str(path))
    return with_current_names(saved)


def attack_setting(key: str, name: str) -> dict:
    """The values `key=name` gives an attack node: a kind's name (its defaults) or a preset, with
    its kind; keys the node does not have are left out (fgsm's `targeted` for eval_attack)."""
    if name not in ATTACK_PRESETS:
        raise ConfigError(f"bad value for {key}: {name!r} is neither an attack nor a preset; use one of "
                          f"{tuple(ATTACK_PRESETS)} or set its keys ({key}.eps=…)")
    values = ATTACK_PRESETS[name]
    fields = node_type(ATTACKS[values["kind"]], training=key == "attack").__dataclass_fields__
    return {k: v for k, v in values.items() if k in fields}


def save_config(cfg: DictConfig, path: Path) -> None:
    path.write_text(OmegaConf.to_yaml(cfg, resolve=True))
