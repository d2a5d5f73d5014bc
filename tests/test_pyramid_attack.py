"""The pyramid attack (train/attacks/pyramid.py) against the authors' update, not our formula: the
reference below is google-research/scenic's projects/adversarialtraining read step by step —
attack_compute.py get_adv_pyramid (zero init, the levels' scalars, transform_fn_pyramid),
attack_transforms.py patched_color_jitter (_to_grid, fast_color_perturb, _from_grid),
attack_methods.py pgd_attack_transform (optax SGD on the gradient's sign) and
project_perturbation_pyramid_inf — in their structure and units: NHWC images in [−1, 1], ε = 6/255,
step 1/255, a dict of levels given by grid counts, their sigmoid cross-entropy on one-hot targets.
jnp.clip is maximum-then-minimum, whose gradient JAX splits in half at a tie; torch.maximum and
torch.minimum split it the same way. Both run in float64 on the same model in eval mode, with fixed
targets and the zero start, on real photos (scikit-image) resized in float, so no pixel sits a
rounding error away from a clip bound."""
import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from conftest import small_photos
from models.factory import Normalized
from train.attacks import PyramidConfig, build_attack, descend, kind_of
from train.attacks.pyramid import PyramidIterates, perturb
from train.methods.common import attack_loss

SIZE, CLASSES = 64, 10
PYRAMID_SIZES, PYRAMID_SCALARS = (2, 4, 64), (20, 10, 1)  # grid counts at 64 px of blocks 32, 16, 1 px
EPSILON, LEARNING_RATE, NUM_STEPS = 6.0 / 255.0, 1.0 / 255.0, 5  # their config.advprop, [−1, 1] units

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- scenic, transcribed

def jnp_clip(x, lo, hi):
    """jnp.clip: arr = maximum(min, arr); arr = minimum(max, arr)."""
    return torch.minimum(x.new_tensor(hi), torch.maximum(x.new_tensor(lo), x))


def _to_grid(x, patch_sidelength):
    n, h, w, three = x.shape
    assert three == 3
    gh, gw = h // patch_sidelength, w // patch_sidelength
    fh, fw = patch_sidelength, patch_sidelength
    x = x.reshape(n, gh, fh, gw, fw, 3)
    x = x.permute(0, 1, 3, 2, 4, 5)
    return x.reshape(n, gh, gw, fh, fw, 3)


def _from_grid(x, patch_sidelength):
    n, gh, gw, fh, fw, _ = x.shape
    x = x.reshape(n, gh, gw, fh, fw, 3)
    x = x.permute(0, 1, 3, 2, 4, 5)
    return x.reshape(n, gh * fh, gw * fw, 3)


def fast_color_perturb(input_image, aug_params):
    return jnp_clip(input_image + aug_params.reshape(1, 1, 3), -1, 1)


def patched_color_jitter(input_image, aug_params):
    local_batch_size, num_patches, num_patches_1, three = aug_params.shape
    assert three == 3 and num_patches == num_patches_1
    _, h, w, _ = input_image.shape
    assert h == w
    patch_sidelength = h // num_patches
    grid = _to_grid(input_image, patch_sidelength)
    # their jax.vmap of fast_color_perturb over the batch and both grid axes: one (fh, fw, 3) patch
    # and one (3,) parameter each, i.e. the parameter broadcast over the patch
    jittered_grid = jnp_clip(grid + aug_params[:, :, :, None, None, :], -1, 1)
    return _from_grid(jittered_grid, patch_sidelength)


def get_adv_pyramid_transform(local_batch_size):
    """get_adv_pyramid's init_aug_params (init_mode 'zero'), init_aug_scalars and transform_fn_pyramid."""
    init_aug_params = {str(layer): torch.zeros(local_batch_size, size, size, 3, dtype=torch.float64)
                       for layer, size in enumerate(PYRAMID_SIZES)}
    init_aug_scalars = {str(layer): PYRAMID_SCALARS[layer] * torch.ones(len(PYRAMID_SIZES), dtype=torch.float64)
                        for layer in range(len(PYRAMID_SIZES))}

    def transform_fn_pyramid(input_image, aug_params_dict):
        for layer in range(len(aug_params_dict)):
            input_image = patched_color_jitter(input_image, init_aug_scalars[str(layer)] * aug_params_dict[str(layer)])
        return input_image
    return init_aug_params, transform_fn_pyramid


def project_perturbation_pyramid_inf(aug_params, epsilon):
    return {key: jnp_clip(value, -epsilon, epsilon) for key, value in aug_params.items()}


def pgd_attack_transform(loss_fn, transform_fn, init_aug_params, input_image, label, epsilon, num_steps):
    """Their loop, with optax.sgd(constant 1/255) on jnp.sign of the gradient; returns the image
    after every step (their augmentation_params_list, transformed) and the adversarial image."""
    wrapped_loss_fn = lambda params: loss_fn(transform_fn(input_image, params), label)  # noqa: E731
    train_params = init_aug_params
    images = []
    for _ in range(num_steps):
        params = {key: value.clone().requires_grad_(True) for key, value in train_params.items()}
        grads = torch.autograd.grad(wrapped_loss_fn(params), list(params.values()))
        edit_grad = {key: torch.sign(grad) for key, grad in zip(params, grads)}
        updates = {key: -LEARNING_RATE * value for key, value in edit_grad.items()}  # scale_by_learning_rate
        new_train_params = {key: params[key].detach() + updates[key] for key in params}
        train_params = project_perturbation_pyramid_inf(new_train_params, epsilon)
        images.append(transform_fn(input_image, train_params))
    return transform_fn(input_image, train_params), images


def scenic_attack(model, images01, targets, num_steps=NUM_STEPS):
    """attack_fn_random_target on the eval-mode model: the sigmoid cross-entropy of the one-hot
    target, summed over classes and averaged over images (weighted_sigmoid_cross_entropy)."""
    input_image = images01.permute(0, 2, 3, 1) * 2 - 1  # value_range(-1, 1), NHWC

    def loss_fn(inputs, label):
        logits = model(((inputs + 1) / 2).permute(0, 3, 1, 2))  # our model takes [0, 1] NCHW
        one_hot = F.one_hot(label, CLASSES).to(logits.dtype)
        losses = -(one_hot * F.logsigmoid(logits) + (1 - one_hot) * F.logsigmoid(-logits))
        return losses.sum() / len(label)

    init_aug_params, transform_fn = get_adv_pyramid_transform(len(targets))
    adversarial, steps = pgd_attack_transform(loss_fn, transform_fn, init_aug_params, input_image, targets,
                                              EPSILON, num_steps)
    back = lambda x: ((x + 1) / 2).permute(0, 3, 1, 2)  # noqa: E731
    return back(adversarial), [back(x) for x in steps]


# ----------------------------------------------------------------------------- the comparison

@pytest.fixture(scope="module")
def photos():
    """Four real photos in float64 [0, 1], resized in float (values off the 1/255 grid)."""
    arrays = small_photos(96) + [np.ascontiguousarray(small_photos(96)[0][::-1])]
    images = torch.tensor(np.stack(arrays), dtype=torch.float64).permute(0, 3, 1, 2) / 255
    images = F.interpolate(images, size=SIZE, mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)
    return images.contiguous(memory_format=torch.channels_last)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Normalized(timm.create_model("test_vit", num_classes=CLASSES)).double().eval()


@pytest.mark.parametrize("steps", [NUM_STEPS, 9])  # published: 5 × 0.5 never reaches ε = 3; 9 steps do
def test_pyramid_images_equal_scenics_update_step_by_step(model, photos, steps):
    published = OmegaConf.structured(PyramidConfig)  # attack=pyramid
    assert (published.eps, published.step_size, published.steps, list(published.levels),
            list(published.multipliers), published.start) == (3, 0.5, 5, [32, 16, 1], [20, 10, 1], "zero")
    node = OmegaConf.merge(published, {"steps": steps})
    targets = torch.tensor([3, 7, 0, 9])
    theirs, their_steps = scenic_attack(model, photos, targets, steps)

    seen = []  # the image of every attack forward: the start, then after each step but the last

    def recording(x):
        seen.append(x.detach().clone())
        return model(x)
    loss = attack_loss(OmegaConf.create({"loss": "bce", "bce_sum_classes": True}))  # the run's loss=bce
    iterates = PyramidIterates(node, photos, targeted=True)
    ours = descend(iterates, model, targets, loss, forward=recording)

    torch.testing.assert_close(seen[0], photos, rtol=0, atol=1e-15)  # the zero start
    for step, (mine, reference) in enumerate(zip(seen[1:], their_steps[:-1]), 1):
        torch.testing.assert_close(mine, reference, rtol=0, atol=1e-12, msg=f"after step {step}")
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)
    torch.testing.assert_close(ours, their_steps[-1], rtol=0, atol=1e-12)

    moved = (ours - photos).abs()
    assert moved.amax() > 20 * 2 / 255  # the coarsest level, ×20, moved at least two steps of 0.5/255
    if steps > 6:  # each level's values reached ±ε and were clipped there, as their projection does
        assert [delta.abs().amax().item() * 255 for delta in iterates.deltas] == pytest.approx([3.0, 3.0, 3.0])
    assert ours.min() >= 0 and ours.max() <= 1
    with torch.no_grad():
        before, after = (loss(model(x), targets) for x in (photos, ours))
    assert after < before  # a descent towards the targets
    assert ours.is_contiguous(memory_format=torch.channels_last)


def test_each_level_is_clipped_before_its_multiplier_and_the_image_after_each_level():
    """Two levels on a grey image: a coarse one (one value per 4 px, ×10) whose values cannot pass
    ±ε, and a pixel one: the image moves by 10 ε at most from the coarse level, stays in [0, 1]
    level by level, and an image side that is not a multiple of a block ends with a partial block."""
    node = OmegaConf.merge(OmegaConf.structured(PyramidConfig), {"levels": [4, 1], "multipliers": [10.0, 1.0],
                                                                 "eps": 2, "step_size": 1.5, "steps": 3})
    images = torch.full((1, 3, 10, 10), 0.5)
    iterates = PyramidIterates(node, images, targeted=False)
    assert [tuple(d.shape) for d in iterates.deltas] == [(1, 3, 3, 3), (1, 3, 10, 10)]  # ⌈10 / 4⌉ blocks
    for x in iterates:
        x.grad = torch.ones_like(x)  # ascend every pixel
    coarse, pixel = iterates.deltas
    assert torch.allclose(coarse, torch.full_like(coarse, 2 / 255))  # 1.5, 3.0 → clipped to ε = 2 (before ×10)
    adversarial = iterates.adversarial
    assert torch.allclose(adversarial, torch.full_like(adversarial, 0.5 + 10 * 2 / 255 + 2 / 255))

    delta = torch.tensor([[[[1.0, -1.0, 0.2]]]]).expand(1, 3, 1, 3).contiguous()
    edge = perturb(torch.full((1, 3, 1, 10), 0.5), [delta], [4], [1.0])
    assert edge[0, 0, 0].tolist() == pytest.approx([1.0] * 4 + [0.0] * 4 + [0.7] * 2)  # clipped; partial block
    up, down = torch.full((1, 3, 1, 1), 0.2), torch.full((1, 3, 1, 1), -0.2)
    level_by_level = perturb(torch.full((1, 3, 1, 4), 0.9), [up, down], [4, 4], [1.0, 1.0])
    assert level_by_level.flatten().tolist() == pytest.approx([0.8] * 12)  # 0.9 + 0.2 → 1.0, then − 0.2 (not 0.9)


def test_the_robust_evaluation_ascends_and_the_record_describes_it(model, photos):
    node = OmegaConf.structured(PyramidConfig)
    labels = torch.tensor([1, 2, 3, 4])
    adversarial = build_attack(node)(model, photos, labels)  # untargeted, as the final report runs it
    with torch.no_grad():
        clean_loss, adv_loss = (F.cross_entropy(model(x), labels) for x in (photos, adversarial))
    assert adv_loss > clean_loss
    assert kind_of(node).describe(node) == (
        "pyramid5_eps3", "Pyramid-5 eps=3/255 step=0.5/255 blocks 32/16/1 px × 20/10/1 untargeted")
