"""method=pyramid_at and its dual-norm variant (method=advprop attack=pyramid): the same dropout and
stochastic-depth masks for the clean pass, every attack step and the adversarial pass of a step,
new ones each step (as scenic's one dropout key per step); both train a small ViT end to end; the
recipes say what the authors' config says."""
import json

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import load_file
from timm.layers import DropPath

from conftest import REPO, digits_val_batch, train_in_process
from models.factory import create_model
from pipelines.backends.torchvision.workers import image_transform
from train.config import load_config
from train.methods import METHODS, StepContext
from train.optim import create_optimizer, global_batch

pytestmark = pytest.mark.usefixtures("one_thread")
DROPPING = ["model=test_vit", "drop_rate=0.5", "drop_path_rate=0.5", "attack=pyramid", "attack.steps=2",
            "attack.bn_mode=train"]  # head dropout and stochastic depth; 2 attack steps


def mask_log(model) -> list[list[torch.Tensor]]:
    """Per forward of the model, the mask each dropout and stochastic-depth layer drew: the
    elements (dropout) or the images (stochastic depth) it zeroed."""
    forwards = []
    model.register_forward_pre_hook(lambda module, args: forwards.append([]))
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout) and module.p > 0:
            module.register_forward_hook(lambda m, args, out: forwards[-1].append((out == 0) & (args[0] != 0)))
        if isinstance(module, DropPath) and module.drop_prob > 0:
            module.register_forward_hook(lambda m, args, out: forwards[-1].append(out.flatten(1).eq(0).all(1)))
    return forwards


def steps_masks(cfg, images, labels, steps: int = 2) -> list[list[list[torch.Tensor]]]:
    """The masks of every forward of each of `steps` method steps (backwards as the loop's)."""
    torch.manual_seed(0)
    model = create_model(cfg, 10, dual_norm=METHODS[cfg.method].dual_norm).train()
    forwards = mask_log(model)
    per_step = []
    for _ in range(steps):
        before = len(forwards)
        for request in METHODS[cfg.method].step(StepContext(model, model, cfg, 10), images, labels):
            sum(request.terms.values()).backward()
        per_step.append(forwards[before:])
    return per_step


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("method", [["method=pyramid_at"], ["method=advprop", "advprop.matched_masks=true"]],
                         ids=["pyramid_at", "advprop_pyramid"])
def test_masks_are_the_same_within_a_step_and_new_each_step(demo_cfg, digits_root, method):
    images, labels = digits_val_batch(digits_root, 16)
    first, second = steps_masks(demo_cfg(*DROPPING, *method), images.contiguous(memory_format=torch.channels_last),
                                labels)
    assert len(first) == len(second) == 4  # two attack steps, the clean pass, the adversarial pass
    for step in (first, second):
        assert all(same(forward, step[0]) for forward in step[1:])
    every = torch.cat([mask.flatten() for mask in first[0]])
    assert every.any() and not every.all()  # masks that drop some and keep some
    assert not same(first[0], second[0])  # a new step, new masks


def test_without_matched_masks_each_pass_draws_its_own(demo_cfg, digits_root):
    """The check above can fail: advprop by default draws new masks in every forward."""
    images, labels = digits_val_batch(digits_root, 16)
    (step,) = steps_masks(demo_cfg(*DROPPING, "method=advprop"), images, labels, steps=1)
    assert not any(same(forward, step[0]) for forward in step[1:])


@pytest.mark.parametrize("method, extra, aux", [
    ("pyramid_at", [], False),
    ("advprop", ["attack.bn_mode=train", "advprop.matched_masks=true"], True),  # the dual-norm variant
])
def test_test_vit_trains_end_to_end_and_is_evaluated_under_its_attack(few_digits, tmp_path, method, extra, aux):
    run_dir = tmp_path / "run"
    args = [f"data.root={few_digits}", f"output_dir={run_dir}", "model=test_vit", f"method={method}", "attack=pyramid",
            "attack.steps=2", "loss=bce", "drop_path_rate=0.1", "epochs=1", "tracker=none", "data.workers=0",
            "log_every=1", "image_log_every=0", "optimizer.name=adamw", "optimizer.lr_per_256=1e-2",
            "grad_clip_norm=1.0", *extra]
    train_in_process(*args)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["robust_attack"] == "Pyramid-2 eps=3/255 step=0.5/255 blocks 32/16/1 px × 20/10/1 untargeted"
    assert 0 <= summary["robust_top1"] <= summary["clean_top1"] + 5  # the training attack, as its node says
    saved = OmegaConf.load(run_dir / "config.yaml")
    assert (saved.attack.kind, saved.attack.steps, saved.loss) == ("pyramid", 2, "bce")
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    adv_losses = [line["train/loss/adv"] for line in lines if "train/loss/adv" in line]
    assert len(adv_losses) >= 3 and all(0 < loss < 10 for loss in adv_losses)  # 200 images, batch 64
    weights = load_file(str(run_dir / "checkpoints" / "last" / "model.safetensors"))
    assert any(".aux." in key for key in weights) == aux

    rerun = train_in_process(*args, "eval_robust=false")  # its config.yaml continues it
    assert "redoing the final evaluation" in rerun.stdout


def recipe(name: str, *overrides: str):
    return load_config([f"config={REPO / 'configs' / f'{name}.yaml'}", *overrides])


def test_pyramid_recipes_say_what_the_authors_config_says():
    """scenic projects/adversarialtraining configs/imagenet_train/imagenet_regvit_config.py, its
    "Pyramid" sweep entry: ViT-B/16, batch 4096, 300 epochs, AdamW (wd 0.1) at 1e-3, 10k warm-up
    steps then cosine, clip 1.0, randaug(2, 15), mixup 0.5, stochastic depth 0.1, sigmoid
    cross-entropy; the attack with their values."""
    at, dual = recipe("vit_b16_pyramid_at"), recipe("vit_b16_pyramid_advprop")
    for c in (at, dual):
        attack = c.attack
        assert (c.model, c.normalization, attack.kind) == ("vit_base_patch16_224", "inception", "pyramid")
        assert (attack.eps, attack.step_size, attack.steps, list(attack.levels), list(attack.multipliers)) == (
            3, 0.5, 5, [32, 16, 1], [20, 10, 1])  # theirs 6/255 and 1/255 in [−1, 1] units
        assert (attack.start, attack.targeted, attack.bn_mode) == ("zero", True, "train")
        assert (c.loss, c.bce_sum_classes, c.label_smoothing, c.drop_path_rate) == ("bce", True, 0.0, 0.1)
        assert (c.epochs, global_batch(c, 8), c.grad_clip_norm) == (300, 4096, 1.0)
        assert (c.optimizer.name, c.optimizer.weight_decay, c.schedule.name, c.schedule.min_lr) == ("adamw", 0.1,
                                                                                                    "cosine", 0.0)
        assert create_optimizer(c, torch.nn.Linear(4, 2), 8).param_groups[0]["lr"] == pytest.approx(1e-3)
        steps_per_epoch = 1_281_167 / 4096
        assert c.schedule.warmup_epochs * steps_per_epoch == pytest.approx(10_000, rel=0.01)
        assert (c.data.mixup, c.data.cutmix, c.data.mix_mode) == (0.5, 0.0, "batch")
        assert image_transform(c, "train")(Image.new("RGB", (300, 260), (90, 120, 30))).shape == (3, 224, 224)
    assert (at.method, at.pyramid_at.adv_weight, METHODS["pyramid_at"].dual_norm) == ("pyramid_at", 1.0, False)
    assert (dual.method, METHODS["advprop"].dual_norm) == ("advprop", True)
    assert (dual.advprop.adv_weight, dual.advprop.matched_masks, dual.advprop.mix_attacked) == (1.0, True, True)
