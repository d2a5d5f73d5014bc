"""Every recipe in configs/ loads onto the schema and says what the paper's recipe says."""

import pytest
import timm
import torch
from PIL import Image
from timm.layers import BatchNormAct2d, convert_sync_batchnorm

from conftest import REPO
from models.dual_norm import NORM_TYPES, DualNorm, convert_dual_norm
from models.factory import create_model, create_net
from common.errors import UserInputError
from pipelines.backends.torchvision.loader import image_transform
from train.config import ConfigError, load_config
from train.optim import create_optimizer, global_batch

RECIPES = sorted(p for p in (REPO / "configs").glob("*.yaml") if not p.stem.endswith("_base"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_loads(recipe):
    cfg = load_config([f"config={recipe}"])
    assert timm.is_model(cfg.model), cfg.model
    assert cfg.name == recipe.stem


def test_effnet_recipes_follow_the_tf_recipe():
    configs = [load_config([f"config={REPO / 'configs' / f'effnet_b{i}_advprop.yaml'}"]) for i in range(9)]
    sizes = [c.data.image_size for c in configs]
    assert sizes == sorted(sizes) and sizes[0] == 224 and sizes[-1] == 672
    for c in configs:
        assert (c.optimizer.name, c.optimizer.eps, c.optimizer.lr_per_256) == ("rmsproptf", 1e-3, 0.016)
        assert (c.schedule.name, c.schedule.decay_epochs, c.schedule.decay_rate) == ("step", 2.4, 0.97)
        assert (c.label_smoothing, c.bn_momentum, c.bn_eps, c.ema_decay) == (0.1, 0.01, 1e-3, 0.9999)
        assert c.normalization == "inception" and c.data.auto_augment == "v0" and c.method == "advprop"
        assert c.loader == "dali"  # AutoAugment on the GPU pipeline
    assert (configs[0].attack.steps, configs[0].attack.eps) == (1, 1)  # PGD1 for the small model
    assert (configs[-1].attack.steps, configs[-1].attack.eps) == (5, 4)  # PGD5 for the big one


def test_resnet50_recipes_read_ffcv_betons_at_ffcv_imagenet_storage():
    for method in ("vanilla", "advprop", "fast_advprop"):
        c = load_config([f"config={REPO / 'configs' / f'resnet50_{method}.yaml'}"])
        assert (c.loader, c.method, c.data.image_size, c.data.crop_ratio) == ("ffcv", method, 224, 0.875)
        storage = c.data.ffcv
        assert (storage.max_resolution, storage.write_mode, storage.compress_probability) == (500, "proportion", 0.5)
        assert storage.progressive.min_res == 0  # the paper's fixed 224 px unless asked


def recipe(name: str, *overrides: str):
    return load_config([f"config={REPO / 'configs' / f'{name}.yaml'}", *overrides])


@pytest.mark.parametrize("name, batch, lr, warmup, ema", [
    ("deit_s_advprop", 1024, 5e-4 * 1024 / 512, 5, 0.0),  # DeiT: lr 5e-4 per 512, no EMA
    ("convnext_t_advprop", 4096, 4e-3, 20, 0.9999),  # ConvNeXt-T: lr 4e-3 at 4096
])
def test_transformer_era_recipes_follow_their_papers(name, batch, lr, warmup, ema):
    c = recipe(name)
    assert (c.method, c.optimizer.name, c.optimizer.weight_decay, c.schedule.name) == ("advprop", "adamw", 0.05, "cosine")
    assert (c.epochs, c.label_smoothing, c.drop_path_rate, c.drop_rate) == (300, 0.1, 0.1, 0.0)
    assert (c.schedule.warmup_epochs, c.ema_decay, c.normalization) == (warmup, ema, "imagenet")
    assert global_batch(c, 8) == batch  # on 8 GPUs, as the papers
    assert create_optimizer(c, torch.nn.Linear(4, 2), 8).param_groups[0]["lr"] == pytest.approx(lr)
    assert (c.loader, c.data.auto_augment, c.data.image_size) == ("torchvision", "rand-m9-mstd0.5-inc1", 224)
    augment = image_transform(c, "train")  # timm's RandAugment parses the recipe's policy
    assert augment(Image.new("RGB", (300, 260), (90, 120, 30))).shape == (3, 224, 224)


@pytest.mark.parametrize("name", ["deit_s_advprop", "convnext_t_advprop"])
def test_transformer_era_recipes_build_dual_norms_stochastic_depth_and_decay_groups(name):
    cfg = recipe(name)
    model = create_model(cfg, 1000, dual_norm=True)
    duals = [m for m in model.modules() if isinstance(m, DualNorm)]
    assert duals and all(isinstance(d.main, torch.nn.LayerNorm) for d in duals)
    assert sum(isinstance(m, NORM_TYPES) for m in model.modules()) == 2 * len(duals)  # every norm is twinned
    drop_path = [m.drop_prob for m in model.modules() if type(m).__name__ == "DropPath"]
    assert drop_path and max(drop_path) == pytest.approx(0.1)
    no_decay = next(g for g in create_optimizer(cfg, model, 1).param_groups if g["weight_decay"] == 0)
    names = {id(p): n for n, p in model.named_parameters()}
    excluded = {names[id(p)] for p in no_decay["params"]}
    assert all(p.ndim <= 1 or names[id(p)] in ("net.pos_embed", "net.cls_token") for p in no_decay["params"])
    if name.startswith("deit"):  # timm's ViT no_weight_decay(), through our input-normalising wrapper
        assert {"net.pos_embed", "net.cls_token"} <= excluded


def test_drop_path_rate_reaches_timm_or_is_refused():
    assert not [m for m in create_net("test_vit", 10).modules() if getattr(m, "drop_prob", 0) > 0]  # 0: off
    deepest = max(m.drop_prob for m in create_net("test_vit", 10, drop_path_rate=0.2).modules()
                  if type(m).__name__ == "DropPath")
    assert deepest == pytest.approx(0.2)
    with pytest.raises(UserInputError, match="drop_path_rate: dla46_c has no stochastic depth"):
        create_net("dla46_c", 10, drop_path_rate=0.1)


def test_lr_scales_with_the_global_batch():
    cfg = load_config([f"config={REPO / 'configs' / 'effnet_b0_advprop.yaml'}"])
    model = torch.nn.Linear(4, 2)
    for processes in (1, 8):
        lr = create_optimizer(cfg, model, processes).param_groups[0]["lr"]
        assert lr == pytest.approx(0.016 * cfg.batch_size * processes / 256)


def test_base_must_exist(tmp_path):
    recipe = tmp_path / "x.yaml"
    recipe.write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_config([f"config={recipe}"])


def test_sync_bn_keeps_dual_routes_and_activations():
    model = convert_sync_batchnorm(convert_dual_norm(timm.create_model("efficientnet_b0", num_classes=10)))
    duals = [m for m in model.modules() if isinstance(m, DualNorm)]
    assert duals and all(isinstance(d.main, torch.nn.SyncBatchNorm) or "Sync" in type(d.main).__name__
                         for d in duals)
    acts = [type(d.aux.act).__name__ for d in duals if hasattr(d.aux, "act")]
    assert acts and any(a != "Identity" for a in acts)  # not silently dropped
    assert not any(isinstance(m, BatchNormAct2d) and not isinstance(m, torch.nn.SyncBatchNorm)
                   and "Sync" not in type(m).__name__ for m in model.modules())


def test_fast_advprop_recipe_costs_what_vanilla_costs():
    """The authors' --exact_same_training_budget: epochs and schedule ÷ (1 + adv_fraction)."""
    vanilla = load_config([f"config={REPO / 'configs' / 'resnet50_vanilla.yaml'}"])
    fast = load_config([f"config={REPO / 'configs' / 'resnet50_fast_advprop.yaml'}"])
    assert fast.epochs == round(vanilla.epochs / 1.2) == 83
    assert fast.schedule.warmup_epochs == pytest.approx(vanilla.schedule.warmup_epochs / 1.2)
    assert not fast.fast_advprop.equal_budget  # the resolved config holds the divided values, once
    again = load_config([f"config={REPO / 'configs' / 'resnet50_fast_advprop.yaml'}", "fast_advprop.equal_budget=false"])
    assert again.epochs == 100
