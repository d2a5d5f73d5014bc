"""The training attack's options and presets: AMP, random-start fraction, BN mode, config presets."""
import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from torchvision.datasets import ImageFolder
from torchvision.transforms.functional import pil_to_tensor

from models.factory import Normalized
from train.attacks import frozen, pgd
from train.config import ATTACK_PRESETS, REPO_ROOT, ConfigError, load_config
from train.methods import METHODS, StepContext, attack_kwargs, make_adversarial

EPS, STEP = 4 / 255, 1 / 255


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def batch(digits_root):
    folder = ImageFolder(str(digits_root / "val"))
    picks = range(0, len(folder), len(folder) // 64)[:64]
    images = torch.stack([pil_to_tensor(folder[i][0]) for i in picks]).float().div(255)
    labels = torch.tensor([folder.targets[i] for i in picks])
    return images.contiguous(memory_format=torch.channels_last), labels


@pytest.fixture(scope="module")
def model(batch):
    """resnet18 after some SGD steps on the batch: running statistics differ from batch ones."""
    torch.manual_seed(0)
    model = Normalized(timm.create_model("resnet18", num_classes=10)).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(40):
        F.cross_entropy(model(batch[0]), batch[1]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model.train()


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_attack_under_bf16_autocast_matches_fp32(model, batch, mode):
    """Under AMP the attack is as strong as in fp32 and its examples differ only where bf16 rounding
    flips the sign of a small input-gradient component: measured 5–10% of values on this model
    (a bf16 forward is a slightly different function), not a broken attack (an underflowed
    gradient would leave images unmoved; a wrong one would not raise the loss)."""
    images, labels = batch
    model.train(mode == "train")
    kwargs = dict(eps=EPS, step_size=STEP, steps=2, random_start=False)
    fp32 = pgd(model, images, labels, **kwargs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = pgd(model, images, labels, **kwargs)
    with torch.no_grad(), frozen(model):  # the loss the attack maximises, BN stats untouched
        clean_loss, fp32_loss, bf16_loss = (F.cross_entropy(model(x), labels) for x in (images, fp32, bf16))
    model.train()
    assert bf16.dtype == torch.float32 and bf16.is_contiguous(memory_format=torch.channels_last)
    assert (fp32 != images).float().mean() > 0.5 and (bf16 != images).float().mean() > 0.5
    differs = (bf16 - fp32).abs().gt(1e-6).float().mean()
    assert differs < 0.15, f"{differs:.2%} of values differ"
    assert bf16_loss - clean_loss > 0.9 * (fp32_loss - clean_loss) > 0


def test_random_start_fraction_leaves_the_rest_at_the_clean_image(model, batch):
    images = batch[0].repeat(4, 1, 1, 1)  # 256 images
    torch.manual_seed(0)
    start = pgd(model, images, batch[1].repeat(4), eps=EPS, step_size=STEP, steps=0, random_start=0.8)
    unmoved = (start == images).flatten(1).all(1).float().mean().item()
    assert 0.1 < unmoved < 0.3  # Xie et al.: 20% start from the clean image
    assert (start - images).abs().max() <= EPS + 1e-6
    cfg = load_config(["attack.clean_start_fraction=0.2"])
    assert attack_kwargs(cfg.attack)["random_start"] == pytest.approx(0.8)
    assert attack_kwargs(load_config(["attack.random_start=false"]).attack)["random_start"] is False


def test_attack_bn_mode_eval_uses_running_statistics(model, batch):
    images, labels = batch
    common = ["attack.random_start=false", "attack.targeted=false", "attack.steps=2"]
    eval_mode = StepContext(model, model, load_config([*common, "attack.bn_mode=eval"]), 10)
    train_mode = StepContext(model, model, load_config(common), 10)
    before = copy.deepcopy(model.state_dict())
    adv_eval = make_adversarial(eval_mode, images, labels)
    assert model.training and all(m.training for m in model.modules())
    adv_train = make_adversarial(train_mode, images, labels)
    expected = pgd(copy.deepcopy(model).eval(), images, labels, eps=EPS, step_size=STEP, steps=2, random_start=False)
    torch.testing.assert_close(adv_eval, expected, rtol=0, atol=0)
    assert (adv_eval != adv_train).float().mean() > 0.01  # the two modes are different attacks
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("preset, eps, steps", [("pgd1", 1, 1), ("pgd3", 2, 3), ("pgd4", 3, 4), ("pgd5", 4, 5)])
def test_attack_presets_are_the_papers_settings(preset, eps, steps):
    attack = load_config([f"attack={preset}"]).attack
    assert (attack.eps, attack.step_size, attack.steps) == (eps, 1, steps)
    assert attack.targeted and attack.random_start  # Xie et al.'s attacker


def test_presets_are_overridable_in_order_and_usable_in_recipes(tmp_path):
    assert load_config(["attack=pgd5", "attack.eps=2"]).attack.eps == 2
    assert load_config(["attack.eps=2", "attack=pgd5"]).attack.eps == 4  # later wins
    fgsm = load_config(["attack=fgsm", "attack.eps=3"]).attack
    assert (fgsm.step_size, fgsm.steps, fgsm.random_start) == (3, 1, False)  # one full-ε step
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: adv_train\nattack: pgd3\neval_attack: pgd5\n")
    cfg = load_config([f"config={recipe}", "attack.targeted=false"])
    assert (cfg.attack.eps, cfg.attack.steps, cfg.attack.targeted, cfg.eval_attack.steps) == (2, 3, False, 5)
    assert set(ATTACK_PRESETS) >= {"pgd1", "pgd3", "pgd4", "pgd5"}


@pytest.mark.parametrize("args, key", [
    (["attack=pgd9"], "attack"),
    (["method=fast_advprop"], "attack.targeted"),  # its attack gradient is the training gradient
    (["method=fast_advprop", "attack.targeted=false", "attack.bn_mode=eval"], "attack.bn_mode"),
    (["attack.bn_mode=batch"], "attack.bn_mode"),
    (["attack.clean_start_fraction=1.5"], "attack.clean_start_fraction"),
    (["goodfellow_mix.alpha=2"], "goodfellow_mix.alpha"),
    (["fast_advprop.adv_fraction=1"], "fast_advprop.adv_fraction"),
])
def test_bad_method_options_are_one_clear_error(args, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(args)


def test_comparison_sweep_configs_are_valid():
    from tools.compare_methods import sweep_runs
    runs = sweep_runs(REPO_ROOT / "configs" / "sweeps" / "compare_methods.yaml")
    assert {"vanilla", "adv_train_pgd1", "goodfellow_mix_pgd1", "advprop_pgd1", "advprop_pgd5", "fast_advprop"} <= set(runs)
    configs = {name: load_config(args) for name, args in runs.items()}
    assert {cfg.method for cfg in configs.values()} == set(METHODS)
    assert len({str(cfg.eval_attack) for cfg in configs.values()}) == 1  # one robustness attack for all
    assert configs["advprop_pgd5"].attack.steps == 5 and configs["advprop_pgd1"].attack.steps == 1
