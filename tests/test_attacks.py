"""pgd(): the ε-ball, the reference implementation, attack strength, and no side effects."""
import copy

import pytest
import timm
import torch
import torch.nn.functional as F

from conftest import digits_val_batch, load_exported
from models.dual_norm import convert_dual_norm, use_norm
from models.factory import Normalized
from train.attacks import pgd, random_wrong_class

EPS, STEP = 8 / 255, 2 / 255


@pytest.fixture(scope="module")
def trained_model(trained_demo_run):
    return load_exported(trained_demo_run / "final_model")


@pytest.fixture(scope="module")
def batch(digits_root):
    return digits_val_batch(digits_root, 32)


def random_model(name="resnet18"):
    torch.manual_seed(0)
    return Normalized(timm.create_model(name, num_classes=10)).eval()


@pytest.mark.parametrize("targeted", [False, True])
def test_stays_in_eps_ball_and_unit_range(batch, targeted):
    images, labels = batch
    images = images.contiguous(memory_format=torch.channels_last)
    adv = pgd(random_model(), images, labels, eps=EPS, step_size=STEP, steps=3, targeted=targeted)
    assert adv.shape == images.shape and adv.dtype == images.dtype and not adv.requires_grad
    assert adv.is_contiguous(memory_format=torch.channels_last)
    assert (adv - images).abs().max() <= EPS + 1e-6
    assert adv.min() >= 0 and adv.max() <= 1
    assert (adv != images).float().mean() > 0.5  # it moved


def test_equals_torchattacks_without_random_start(trained_model, batch):
    torchattacks = pytest.importorskip("torchattacks")
    images, labels = batch
    ours = pgd(trained_model, images, labels, eps=EPS, step_size=STEP, steps=5, random_start=False)
    reference = torchattacks.PGD(trained_model, eps=EPS, alpha=STEP, steps=5, random_start=False)(images, labels)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6)


def test_untargeted_raises_loss_and_targeted_reaches_targets(trained_model, batch):
    images, labels = batch
    with torch.no_grad():
        clean_logits = trained_model(images)
    assert (clean_logits.argmax(1) == labels).float().mean() > 0.9  # the demo model works
    strong = dict(eps=48 / 255, step_size=4 / 255, steps=20)
    adv = pgd(trained_model, images, labels, **strong)
    with torch.no_grad():
        assert F.cross_entropy(trained_model(adv), labels) > 2 * F.cross_entropy(clean_logits, labels)
    torch.manual_seed(1)
    targets = random_wrong_class(labels, 10)
    assert (targets != labels).all()
    adv = pgd(trained_model, images, targets, targeted=True, **strong)
    with torch.no_grad():
        hit = (trained_model(adv).argmax(1) == targets).float().mean()
    assert hit > 0.5


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", ["resnet18", "test_vit", "test_convnext", "test_efficientnet_gn"])
def test_no_side_effects(batch, mode, name):
    """On dual norms of every kind: BatchNorm (running statistics), LayerNorm, GroupNorm (none)."""
    images, labels = batch
    model = random_model(name)
    convert_dual_norm(model.net)
    model.train(mode == "train")
    model.net.get_classifier().weight.requires_grad_(False)  # a frozen head must stay frozen
    F.cross_entropy(model(images), labels).backward()  # existing grads must survive untouched
    before = copy.deepcopy(model.state_dict())
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with use_norm(model, "aux"):
        pgd(model, images, labels, eps=EPS, step_size=STEP, steps=2)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BN buffers
    assert {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}.keys() == grads.keys()
    assert all(torch.equal(grads[n], p.grad) for n, p in model.named_parameters() if p.grad is not None)
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    assert model.training == (mode == "train")
    assert all(m.training == (mode == "train") for m in model.modules())
