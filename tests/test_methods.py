"""Training methods on the digits demo set: each learns, BNs are routed as the paper says, and
advprop's fast path (frozen-weight attack) gives each parameter group the gradient of its own
average loss (train/methods/__init__.py), computed here the plain way (fast_advprop's against the
authors' loop: tests/test_fast_advprop_official.py)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torchvision.datasets import ImageFolder
from torchvision.transforms.functional import pil_to_tensor

from models.dual_norm import AUX, MAIN, DualNorm, convert_dual_norm, use_norm
from models.factory import create_model
from train.attacks import random_wrong_class
from train.loop import scale_gradients
from train.methods import METHODS, StepContext
from train.optim import create_optimizer

CLASSES = 10
ATTACK = ["attack.eps=4", "attack.step_size=1", "attack.steps=2"]
FAST = ["method=fast_advprop", "attack.targeted=false"]


pytestmark = pytest.mark.usefixtures("one_thread")


def load_split(root, split):
    folder = ImageFolder(str(root / split))
    images = torch.stack([pil_to_tensor(image) for image, _ in folder]).float().div(255)
    labels = torch.tensor(folder.targets)
    return images.contiguous(memory_format=torch.channels_last), labels


@pytest.fixture(scope="module")
def digits(digits_root):
    torch.manual_seed(0)
    train_images, train_labels = load_split(digits_root, "train")
    order = torch.randperm(len(train_labels))
    return (train_images[order], train_labels[order]), load_split(digits_root, "val")


def build(cfg):
    torch.manual_seed(0)
    model = create_model(cfg, CLASSES, dual_norm=METHODS[cfg.method].dual_norm)
    return model.to(memory_format=torch.channels_last).train()


def step(model, cfg, images, labels):
    """One method step as the loop does it (without Accelerate): every Backward it yields, then
    its per-group gradient factors; returns the StepOutput."""
    steps = METHODS[cfg.method].step(StepContext(model, model, cfg, CLASSES), images, labels)
    try:
        while True:
            sum(next(steps).terms.values()).backward()
    except StopIteration as done:
        scale_gradients(done.value.grad_scales)
        return done.value


def bn_buffers(model, route):
    return {name: buffer.clone() for name, buffer in model.named_buffers()
            if f".{route}.running_" in name}


def grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


# ----------------------------------------------------------------------------- learning

@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_learns_digits(method, demo_cfg, digits):
    cfg = demo_cfg(f"method={method}", "batch_size=32", "attack=pgd1",
                   *(["attack.targeted=false"] if method == "fast_advprop" else []))
    model = build(cfg)
    optimizer = create_optimizer(cfg, model, 1)
    (images, labels), (val_images, val_labels) = digits
    losses = []
    for i in range(40):
        batch = slice(32 * i, 32 * (i + 1))
        out = step(model, cfg, images[batch], labels[batch])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(out.metrics.get("loss/clean", out.metrics.get("loss/adv")).item())
    assert sum(losses[-5:]) < 0.7 * sum(losses[:5]), losses
    with torch.no_grad():
        accuracy = (model.eval()(val_images).argmax(1) == val_labels).float().mean().item()
    assert accuracy > 0.3, f"{method}: val accuracy {accuracy:.2f} (chance 0.10)"


# ----------------------------------------------------------------------------- BN routing

def test_advprop_routes_clean_to_main_and_adversarial_to_aux(demo_cfg, digits):
    cfg = demo_cfg("method=advprop", *ATTACK)
    model = build(cfg)
    reference = copy.deepcopy(model)
    images, labels = digits[0][0][:32], digits[0][1][:32]
    out = step(model, cfg, images, labels)
    with torch.no_grad(), use_norm(reference, MAIN):
        reference(images)  # main BNs: the clean batch and nothing else
    with torch.no_grad(), use_norm(reference, AUX):
        reference(out.adversarial)  # aux BNs: the adversarial batch and nothing else
    for route in (MAIN, AUX):
        ours, expected = bn_buffers(model, route), bn_buffers(reference, route)
        assert ours.keys() == expected.keys() and ours
        for name in ours:
            torch.testing.assert_close(ours[name], expected[name], msg=name)
    assert not torch.equal(bn_buffers(model, MAIN)["net.bn1.main.running_mean"],
                           bn_buffers(model, AUX)["net.bn1.aux.running_mean"])


def test_fast_advprop_keeps_adversarial_rows_out_of_main_bns(demo_cfg, digits):
    cfg = demo_cfg(*FAST, *ATTACK)
    model = build(cfg)
    reference = copy.deepcopy(model)
    images, labels = digits[0][0][:30], digits[0][1][:30]
    step(model, cfg, images, labels)
    with torch.no_grad(), use_norm(reference, MAIN):
        reference(images[:24])  # 4:1 split: the first 24 rows are the clean part
    ours, expected = bn_buffers(model, MAIN), bn_buffers(reference, MAIN)
    for name in ours:
        torch.testing.assert_close(ours[name], expected[name], msg=name)


@pytest.mark.parametrize("method", ["vanilla", "adv_train", "goodfellow_mix"])
def test_single_bn_methods_use_one_bn_set(method, demo_cfg, digits):
    """Not converted by the factory, and even on a dual-norm model they touch only the main norms."""
    cfg = demo_cfg(f"method={method}", *ATTACK)
    assert not any(isinstance(m, DualNorm) for m in build(cfg).modules())
    model = build(cfg)
    convert_dual_norm(model.net)
    aux_before, main_before = bn_buffers(model, AUX), bn_buffers(model, MAIN)
    step(model, cfg, digits[0][0][:32], digits[0][1][:32])
    aux_after, main_after = bn_buffers(model, AUX), bn_buffers(model, MAIN)
    assert all(torch.equal(aux_before[k], aux_after[k]) for k in aux_before)
    assert not all(torch.equal(main_before[k], main_after[k]) for k in main_before)
    assert all(p.grad is None for name, p in model.named_parameters() if ".aux." in name)


# ----------------------------------------------------------------------------- same gradients as a plain reference

def naive_pgd(model, images, labels, *, eps, step_size, steps, targeted, start=None):
    """Textbook PGD: mean loss, weights not frozen (their .grad is left alone by autograd.grad)."""
    adv = images.clone() if start is None else start.clone()
    for _ in range(steps):
        adv.requires_grad_(True)
        loss = F.cross_entropy(model(adv), labels)
        (grad,) = torch.autograd.grad(loss, adv)
        adv = adv.detach() + (-1 if targeted else 1) * step_size * grad.sign()
        adv = (images + (adv - images).clamp(-eps, eps)).clamp(0, 1)
    return adv


def assert_same_grads(model, expected):
    ours = grads(model)
    assert ours.keys() == expected.keys() and ours
    for name in ours:
        torch.testing.assert_close(ours[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)


def group_of(name: str) -> str:
    return "main" if ".main." in name else "aux" if ".aux." in name else "shared"


def grads_by_group(model, losses: dict) -> dict:
    """Each parameter's gradient of the loss of its group: losses = {"shared": …, "main": …, "aux": …}."""
    expected = {}
    for group, loss in losses.items():
        params = [(n, p) for n, p in model.named_parameters() if group_of(n) == group]
        values = torch.autograd.grad(loss, [p for _, p in params], retain_graph=True, allow_unused=True)
        expected.update({n: g for (n, _), g in zip(params, values) if g is not None})
    return expected


def test_advprop_gradient_is_the_per_group_average(demo_cfg, digits):
    """Shared weights: every image once, (Σ clean + w·Σ adv) / (B + w·B); main norms: the clean mean;
    aux norms: the adversarial mean (train/methods/__init__.py). The attack as advprop's defaults
    make it: the model in eval mode, aux norms, steps of max(1, ε/steps) = 2 pixels."""
    cfg = demo_cfg("method=advprop", *ATTACK, "attack.random_start=false", "advprop.adv_weight=0.7")
    model = build(cfg)
    reference = copy.deepcopy(model)
    images, labels = digits[0][0][:32], digits[0][1][:32]
    torch.manual_seed(1)
    out = step(model, cfg, images, labels)

    torch.manual_seed(1)
    targets = random_wrong_class(labels, CLASSES)
    with use_norm(reference.eval(), AUX):
        adversarial = naive_pgd(reference, images, targets, eps=4 / 255, step_size=2 / 255, steps=2, targeted=True)
    reference.train()
    torch.testing.assert_close(out.adversarial, adversarial, rtol=0, atol=1e-6)
    clean_sum = F.cross_entropy(reference(images), labels, reduction="sum")
    with use_norm(reference, AUX):
        adv_sum = F.cross_entropy(reference(adversarial), labels, reduction="sum")
    n = len(images)
    assert_same_grads(model, grads_by_group(reference, {
        "shared": (clean_sum + 0.7 * adv_sum) / (n * 1.7), "main": clean_sum / n, "aux": adv_sum / n}))
