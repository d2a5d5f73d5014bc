"""Dual BN: conversion is exact, routing touches only the routed BNs, export loads into plain timm."""
import copy

import pytest
import timm
import torch
from timm.layers import BatchNormAct2d

from models.dual_bn import DualBatchNorm, convert_dual_bn, export_main_bn, use_bn

FAMILIES = ["resnet18", "efficientnet_b0"]


def digits_batch(digits_root, n=16, size=64):
    from torchvision import datasets, transforms
    data = datasets.ImageFolder(digits_root / "train", transform=transforms.Compose(
        [transforms.Resize(size), transforms.ToTensor()]))
    images, labels = zip(*(data[i] for i in range(0, len(data), len(data) // n)))
    return torch.stack(images[:n]), torch.tensor(labels[:n])


def trained_plain(name, images):
    """A random-init timm model whose BN running stats have seen real images (not the defaults)."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(images)
    return model.eval()


def bn_buffers(model, which):
    return {k: v.clone() for k, v in model.state_dict().items()
            if f".{which}." in k and ("running" in k or "num_batches" in k)}


@pytest.mark.parametrize("name", FAMILIES)
def test_conversion_keeps_eval_logits(name, digits_root):
    images, _ = digits_batch(digits_root)
    plain = trained_plain(name, images)
    dual = convert_dual_bn(copy.deepcopy(plain)).eval()
    n_bn = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in plain.modules())
    assert sum(isinstance(m, DualBatchNorm) for m in dual.modules()) == n_bn
    with torch.no_grad():
        torch.testing.assert_close(dual(images), plain(images), rtol=0, atol=0)
        with use_bn(dual, "aux"):  # aux starts as a copy of main
            torch.testing.assert_close(dual(images), plain(images), rtol=0, atol=0)


def test_efficientnet_keeps_its_activations(digits_root):
    """timm's convert_splitbn_model drops BatchNormAct2d's activation; ours must not."""
    model = convert_dual_bn(timm.create_model("efficientnet_b0", num_classes=10))
    acts = [type(m.main.act).__name__ for m in model.modules()
            if isinstance(m, DualBatchNorm) and isinstance(m.main, BatchNormAct2d)]
    assert acts and any(a != "Identity" for a in acts)
    for m in model.modules():
        if isinstance(m, DualBatchNorm) and isinstance(m.main, BatchNormAct2d):
            assert type(m.aux.act) is type(m.main.act)


@pytest.mark.parametrize("name", FAMILIES)
def test_aux_route_updates_only_aux_stats(name, digits_root):
    images, _ = digits_batch(digits_root)
    model = convert_dual_bn(trained_plain(name, images)).train()
    main_before, aux_before = bn_buffers(model, "main"), bn_buffers(model, "aux")
    with use_bn(model, "aux"):
        model(images * 0.5 + 0.25)
    assert all(torch.equal(v, bn_buffers(model, "main")[k]) for k, v in main_before.items())
    changed = [k for k, v in aux_before.items() if not torch.equal(v, bn_buffers(model, "aux")[k])]
    assert len(changed) == len(aux_before)
    # the default route is main again after the context
    aux_after = bn_buffers(model, "aux")
    model(images)
    assert all(torch.equal(v, bn_buffers(model, "aux")[k]) for k, v in aux_after.items())


@pytest.mark.parametrize("name", FAMILIES)
def test_export_loads_strict_into_plain_timm(name, digits_root):
    images, _ = digits_batch(digits_root)
    dual = convert_dual_bn(trained_plain(name, images)).train()
    with use_bn(dual, "aux"):  # make aux differ from main so a mix-up would show
        dual(images.flip(0) * 0.3)
    dual(images)
    dual.eval()
    plain = timm.create_model(name, num_classes=10).eval()
    plain.load_state_dict(export_main_bn(dual), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(plain(images), dual(images), rtol=0, atol=0)
        with use_bn(dual, "aux"):
            assert not torch.allclose(plain(images), dual(images))


def test_bad_route_is_an_error():
    model = convert_dual_bn(timm.create_model("resnet18", num_classes=10))
    with pytest.raises(ValueError, match="route"):
        with use_bn(model, "adv"):
            pass
