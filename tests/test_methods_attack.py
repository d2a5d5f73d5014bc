"""The training attack's options and presets: AMP, the random-start rules, BN mode, config presets;
advprop's default attack against the references' attacker (read from their code)."""
import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from torchvision.datasets import ImageFolder
from torchvision.transforms.functional import pil_to_tensor

from models.dual_norm import AUX, MAIN, convert_dual_norm, use_norm
from models.factory import Normalized
from train.attacks import frozen, pgd, pgd_kwargs, random_wrong_class, start_point
from train.config import ATTACK_PRESETS, REPO_ROOT, ConfigError, load_config
from train.methods import METHODS, StepContext, make_adversarial

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


def test_per_image_start_fraction_leaves_the_rest_at_the_clean_image(model, batch):
    images = batch[0].repeat(4, 1, 1, 1)  # 256 images
    torch.manual_seed(0)
    start = pgd(model, images, batch[1].repeat(4), eps=EPS, step_size=STEP, steps=0, random_start=0.8)
    unmoved = (start == images).flatten(1).all(1).float().mean().item()
    assert 0.1 < unmoved < 0.3  # clean_start_fraction 0.2: each image stays with probability 0.2
    assert (start - images).abs().max() <= EPS + 1e-6
    cfg = load_config(["attack.start_rule=image", "attack.clean_start_fraction=0.2"])
    assert pgd_kwargs(cfg.attack)["random_start"] == pytest.approx(0.8)
    assert pgd_kwargs(load_config(["attack.random_start=false"]).attack)["random_start"] is False


def test_batch_start_rule_is_the_references_coin(batch):
    """The references' attack_init: noise ~ U(−ε, ε), then one coin per batch, torch.randn([]) > 0.2,
    so P(moved) = P(N(0, 1) > 0.2) ≈ 0.4207; the moved batch is not clamped to [0, 1]."""
    images = torch.cat([torch.zeros(8, 3, 4, 4), torch.ones(8, 3, 4, 4), batch[0][:8, :, :4, :4]])
    torch.manual_seed(0)
    starts = [start_point(images, EPS, "batch") for _ in range(4000)]
    moved = [bool((s != images).any()) for s in starts]
    assert all((s != images).flatten(1).any(1).all() for s, m in zip(starts, moved) if m)  # the whole batch
    assert all(torch.equal(s, images) for s, m in zip(starts, moved) if not m)
    expected = 0.5 * torch.erfc(torch.tensor(0.2) / 2 ** 0.5).item()  # 0.4207
    assert abs(sum(moved) / len(moved) - expected) < 0.025  # 3.2 standard deviations of 4000 draws
    noise = torch.stack([s - images for s, m in zip(starts, moved) if m])
    assert noise.abs().max() <= EPS + 1e-6 and noise.abs().max() > 0.99 * EPS
    assert min(s.min() for s in starts) < 0 and max(s.max() for s in starts) > 1  # not clamped
    torch.manual_seed(5)  # the references' order of draws: the noise first, then the coin
    noise = torch.empty_like(images).uniform_(-EPS, EPS)
    coin = torch.randn([]) > 0.2
    torch.manual_seed(5)
    assert torch.equal(start_point(images, EPS, "batch"), images + noise * coin.float())
    cfg = load_config([])  # advprop: the references' rule by default
    assert pgd_kwargs(cfg.attack)["random_start"] == "batch"


def test_attack_bn_mode_eval_uses_running_statistics(model, batch):
    images, labels = batch
    common = ["attack.random_start=false", "attack.targeted=false", "attack.steps=2", "attack.reach_eps=false"]
    eval_mode = StepContext(model, model, load_config([*common, "attack.bn_mode=eval"]), 10)
    train_mode = StepContext(model, model, load_config([*common, "attack.bn_mode=train"]), 10)
    before = copy.deepcopy(model.state_dict())
    adv_eval = make_adversarial(eval_mode, images, labels)
    assert model.training and all(m.training for m in model.modules())
    adv_train = make_adversarial(train_mode, images, labels)
    expected = pgd(copy.deepcopy(model).eval(), images, labels, eps=EPS, step_size=STEP, steps=2, random_start=False)
    torch.testing.assert_close(adv_eval, expected, rtol=0, atol=0)
    assert (adv_eval != adv_train).float().mean() > 0.01  # the two modes are different attacks
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ----------------------------------------------------------------------------- advprop's attack = the references'

def references_attack(model, image_clean, target_label, *, eps, step_size, num_iter):
    """tingxueronghua/pytorch-classification-advprop attacker.py PGDAttacker (Mei's attack_init and
    attack_update are the same), in [0, 1] units instead of their [-1, 1], targeted as theirs."""
    step_size = max(step_size, eps / num_iter)
    lower_bound = torch.clamp(image_clean - eps, min=0, max=1)
    upper_bound = torch.clamp(image_clean + eps, min=0, max=1)
    init_start = torch.empty_like(image_clean).uniform_(-eps, eps)
    start_from_noise_index = (torch.randn([]) > 0.2).float()
    adv = image_clean + start_from_noise_index * init_start
    for _ in range(num_iter):
        adv.requires_grad = True
        losses = F.cross_entropy(model(adv), target_label)
        g = torch.autograd.grad(losses, adv, retain_graph=False, create_graph=False)[0]
        adv = adv - torch.sign(g) * step_size
        adv = torch.where(adv > lower_bound, adv, lower_bound)
        adv = torch.where(adv < upper_bound, adv, upper_bound).detach()
    return adv


@pytest.fixture(scope="module")
def dual_model(batch):
    """A dual-norm resnet18 whose main and aux BNs were trained on different images (clean vs
    noisy): their running statistics differ from each other and from any batch's."""
    torch.manual_seed(0)
    model = Normalized(timm.create_model("resnet18", num_classes=10)).to(memory_format=torch.channels_last)
    convert_dual_norm(model.net)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    noisy = (batch[0] + 0.3 * torch.randn_like(batch[0])).clamp(0, 1)
    for _ in range(8):
        for route, images in ((MAIN, batch[0]), (AUX, noisy)):
            with use_norm(model, route):
                F.cross_entropy(model(images), batch[1]).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return model.train()


@pytest.mark.parametrize("seed", [0, 1])  # the coin: seed 0 starts at the clean image, 1 from noise
def test_advprop_default_attack_is_the_references_on_the_aux_running_statistics(dual_model, batch, seed):
    """Their net.py: self.eval() (whole model), the aux BNs (to_adv_status), attacker.attack; our
    targets (a random wrong class; theirs may draw the true label), the same random draws after them."""
    images, labels = batch
    cfg = load_config([])  # advprop, the demo's PGD-2 at ε = 4, every attack default
    ctx = StepContext(dual_model, dual_model, cfg, 10)
    before = copy.deepcopy(dual_model.state_dict())
    torch.manual_seed(seed)
    ours = make_adversarial(ctx, images, labels, route=AUX)
    assert dual_model.training and all(m.training for m in dual_model.modules())
    assert all(torch.equal(before[k], v) for k, v in dual_model.state_dict().items())

    reference = copy.deepcopy(dual_model).eval()

    def theirs(route):
        torch.manual_seed(seed)
        targets = random_wrong_class(labels, 10)
        with use_norm(reference, route):
            return references_attack(reference, images, targets, eps=4 / 255, step_size=1 / 255, num_iter=2)
    torch.testing.assert_close(ours, theirs(AUX), rtol=0, atol=1e-6)
    assert (ours - theirs(MAIN)).abs().max() > 1e-3  # the main norms' statistics make another attack
    reference.train()
    assert (ours - theirs(AUX)).abs().max() > 1e-3  # and so do batch statistics


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
