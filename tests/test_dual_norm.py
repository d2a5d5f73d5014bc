"""Dual norms on every family (BatchNorm CNNs, ViTs, ConvNeXts, GroupNorm/LayerNorm EfficientNets,
RMSNorm ViTs): conversion is exact, a route's loss and statistics reach only its own norms, the
export loads into plain timm and reproduces the main route; models without norms are refused."""
import copy

import pytest
import timm
import torch
import torch.nn.functional as F

from models.dual_norm import AUX, MAIN, NORM_TYPES, DualNorm, convert_dual_norm, export_main_norm, use_norm
from models.factory import create_model
from common.errors import UserInputError

FAMILIES = [
    "resnet18",  # BatchNorm2d
    "efficientnet_b0",  # timm's BatchNormAct2d (activation inside the norm)
    "test_vit",  # LayerNorm
    "test_convnext",  # LayerNorm2d and LayerNorm
    "test_efficientnet_gn",  # GroupNormAct
    "test_efficientnet_ln",  # LayerNormAct2d
    "test_vit4",  # timm's RmsNorm
]
ACT_FAMILIES = ["efficientnet_b0", "test_efficientnet_gn", "test_efficientnet_ln"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def images(digits_root):
    """16 digits of the demo set, every class, at 64 px."""
    from torchvision import datasets, transforms
    data = datasets.ImageFolder(digits_root / "train", transform=transforms.Compose(
        [transforms.Resize(64), transforms.ToTensor()]))
    picked = [data[i] for i in range(0, len(data), len(data) // 16)][:16]
    return torch.stack([image for image, _ in picked]), torch.tensor([label for _, label in picked])


def trained_plain(name, images):
    """A random-init timm model whose BN running stats have seen real images (not the defaults)."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(images)
    return model.eval()


def norm_buffers(model, route):
    return {k: v.clone() for k, v in model.state_dict().items()
            if f".{route}." in k and ("running" in k or "num_batches" in k)}


def norm_params(model, route):
    return {n: p for n, p in model.named_parameters() if f".{route}." in n}


@pytest.mark.parametrize("name", FAMILIES)
def test_conversion_keeps_eval_logits(name, images):
    x, _ = images
    plain = trained_plain(name, x)
    dual = convert_dual_norm(copy.deepcopy(plain)).eval()
    n_norms = sum(isinstance(m, NORM_TYPES) for m in plain.modules())
    assert n_norms and sum(isinstance(m, DualNorm) for m in dual.modules()) == n_norms
    with torch.no_grad():
        torch.testing.assert_close(dual(x), plain(x), rtol=0, atol=0)
        with use_norm(dual, AUX):  # aux starts as a copy of main
            torch.testing.assert_close(dual(x), plain(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", ACT_FAMILIES)
def test_norm_act_layers_keep_their_activation_in_both_copies(name):
    """timm's convert_splitbn_model drops BatchNormAct2d's activation; ours must not, for any *Act norm."""
    duals = [m for m in convert_dual_norm(timm.create_model(name, num_classes=10)).modules()
             if isinstance(m, DualNorm) and hasattr(m.main, "act")]
    assert duals and any(type(d.main.act).__name__ != "Identity" for d in duals)
    for d in duals:
        assert type(d.aux.act) is type(d.main.act) and type(d.aux.drop) is type(d.main.drop)
        assert d.aux.act is not d.main.act


@pytest.mark.parametrize("route, other", [(AUX, MAIN), (MAIN, AUX)])
@pytest.mark.parametrize("name", FAMILIES)
def test_a_routes_loss_reaches_only_its_own_norms(name, route, other, images):
    """Gradients reach the routed norms' parameters (and the shared weights), never the other
    route's; running statistics (BatchNorm only) change on the routed copies only."""
    x, labels = images
    model = convert_dual_norm(trained_plain(name, x)).train()
    before = {r: norm_buffers(model, r) for r in (MAIN, AUX)}
    with use_norm(model, route):
        F.cross_entropy(model(x * 0.5 + 0.25), labels).backward()
    reached = norm_params(model, route).values()  # (zero-initialised last BNs of blocks stop some gradients)
    assert all(p.grad is not None for p in reached) and any(p.grad.abs().sum() > 0 for p in reached)
    assert all(p.grad is None for p in norm_params(model, other).values())
    shared = [p for n, p in model.named_parameters() if ".main." not in n and ".aux." not in n]
    assert any(p.grad is not None for p in shared)
    after = {r: norm_buffers(model, r) for r in (MAIN, AUX)}
    assert all(torch.equal(v, after[other][k]) for k, v in before[other].items())
    assert all(not torch.equal(v, after[route][k]) for k, v in before[route].items())
    has_stats = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert bool(before[route]) == has_stats
    model(x)  # the default route is main again after the context
    assert all(torch.equal(v, norm_buffers(model, AUX)[k]) for k, v in after[AUX].items())


@pytest.mark.parametrize("name", FAMILIES)
def test_export_loads_strict_into_plain_timm(name, images):
    x, labels = images
    dual = convert_dual_norm(trained_plain(name, x)).train()
    optimizer = torch.optim.SGD(dual.parameters(), lr=0.5)
    with use_norm(dual, AUX):  # one aux step: the aux norms differ from main, so a mix-up would show
        F.cross_entropy(dual(x.flip(0) * 0.3), labels).backward()
    optimizer.step()
    dual(x)  # main BN statistics move too
    dual.eval()
    plain = timm.create_model(name, num_classes=10).eval()
    plain.load_state_dict(export_main_norm(dual), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), dual(x), rtol=0, atol=0)
        with use_norm(dual, AUX):
            assert not torch.allclose(plain(x), dual(x))


def test_a_norm_shared_under_two_names_stays_shared():
    shared = torch.nn.LayerNorm(8)
    model = convert_dual_norm(torch.nn.Sequential(shared, torch.nn.Linear(8, 8), shared))
    assert model[0] is model[2] and isinstance(model[0], DualNorm)
    plain = torch.nn.Sequential(shared, torch.nn.Linear(8, 8), shared)
    plain.load_state_dict(export_main_norm(model), strict=True)


def test_bad_route_is_an_error():
    model = convert_dual_norm(timm.create_model("test_vit", num_classes=10))
    with pytest.raises(ValueError, match="route"):
        with use_norm(model, "adv"):
            pass


@pytest.mark.parametrize("method", ["advprop", "fast_advprop"])
def test_model_without_norms_is_refused(method, demo_cfg):
    cfg = demo_cfg(f"method={method}", "model=test_nfnet", "attack.targeted=false")
    with pytest.raises(UserInputError, match=f"method={method} .* test_nfnet has no BatchNorm, LayerNorm") as error:
        create_model(cfg, 10, dual_norm=True)
    assert "\n" not in str(error.value)
    create_model(cfg, 10, dual_norm=False)  # the single-norm methods train it


def test_bn_momentum_and_eps_reach_batchnorms_of_both_routes_only(demo_cfg):
    """The factory sets them before the conversion, so aux copies have them; LayerNorms keep theirs."""
    cfg = demo_cfg("model=test_coatnet", "bn_momentum=0.01", "bn_eps=0.001")
    net = create_model(cfg, 10, dual_norm=True).net
    duals = [m for m in net.modules() if isinstance(m, DualNorm)]
    batch_norms = [m for d in duals for m in (d.main, d.aux) if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    layer_norms = [m for d in duals for m in (d.main, d.aux) if isinstance(m, torch.nn.LayerNorm)]
    assert batch_norms and all((m.momentum, m.eps) == (0.01, 0.001) for m in batch_norms)
    assert layer_norms and all(m.eps != 0.001 for m in layer_norms)
