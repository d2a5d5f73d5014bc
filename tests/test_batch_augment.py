"""Mixup/CutMix, random erasing and repeated augmentation (train/batch_augment.py, ShardSampler),
against timm itself: the same generator state gives timm's mixed images and soft targets, timm's
erasing boxes and fills, DeiT's repeated-augmentation stripe; the attack ascends the soft-target
loss; the methods take mixed batches as docs/augmentation.md says."""
import copy
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.data.distributed_sampler import RepeatAugSampler
from timm.data.random_erasing import RandomErasing
from timm.loss import SoftTargetCrossEntropy

from conftest import REPO, digits_val_batch
from models.dual_norm import AUX, use_norm
from models.factory import NORMALIZATION, create_model
from pipelines.loading import build_loader, prepare_dataset
from pipelines.sampling import ShardSampler
from train.attacks import pgd
from train.batch_augment import BatchAugment, random_unmixed_class
from train.config import ConfigError, load_config
from train.methods import METHODS, Method, StepContext
from train.methods.common import make_adversarial

pytestmark = pytest.mark.usefixtures("one_thread")
CLASSES = 10
DEIT = ["data.mixup=0.8", "data.cutmix=1.0", "data.mix_switch_prob=0.5", "label_smoothing=0.1"]


@pytest.fixture(scope="module")
def batch(digits_root):
    images, labels = digits_val_batch(digits_root, 32)
    return images.contiguous(memory_format=torch.channels_last), labels


def seeded(seed: int):
    np.random.seed(seed)
    random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- Mixup / CutMix

@pytest.mark.parametrize("mode", ["batch", "pair", "elem"])
@pytest.mark.parametrize("alphas", [(0.8, 0.0), (0.0, 1.0), (0.8, 1.0)])
def test_mixed_images_and_soft_targets_equal_timms_mixup(demo_cfg, batch, mode, alphas):
    mixup, cutmix = alphas
    cfg = demo_cfg(f"data.mixup={mixup}", f"data.cutmix={cutmix}", f"data.mix_mode={mode}", "data.mix_prob=0.9",
                   "data.mix_switch_prob=0.4", "label_smoothing=0.1")
    images, labels = batch
    before = images.clone()
    seeded(3)
    mixed, targets, unmixed = BatchAugment(cfg, CLASSES, "cpu")(images, labels)
    seeded(3)
    reference = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, prob=0.9, switch_prob=0.4, mode=mode,
                      label_smoothing=0.1, num_classes=CLASSES)
    expected_images, expected_targets = reference(images.clone(), labels)
    assert torch.equal(mixed, expected_images) and torch.equal(targets, expected_targets)
    assert not torch.equal(mixed, images)  # it did mix
    assert targets.shape == (len(labels), CLASSES) and torch.allclose(targets.sum(1), torch.ones(len(labels)))
    assert torch.equal(images, before)  # the loader's batch is not written to
    assert unmixed[0] is images and unmixed[1] is labels
    assert mixed.is_contiguous(memory_format=torch.channels_last)


def test_no_mixing_keeps_the_labels_and_the_batch(demo_cfg, batch):
    images, labels = batch
    out_images, out_labels, unmixed = BatchAugment(demo_cfg(), CLASSES, "cpu")(images, labels)
    assert out_images is images and out_labels is labels and unmixed is None


# ----------------------------------------------------------------------------- random erasing

@pytest.mark.parametrize("mode", ["pixel", "rand", "const"])
def test_erasing_equals_timms_random_erasing_in_normalised_units(demo_cfg, batch, mode):
    cfg = demo_cfg("data.random_erasing=0.6", f"data.erasing_mode={mode}", "data.erasing_count=3")
    images, labels = batch
    seeded(5)
    erased, out_labels, unmixed = BatchAugment(cfg, CLASSES, "cpu")(images, labels)
    assert out_labels is labels and unmixed is None
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in NORMALIZATION[cfg.normalization])
    normalised = (images - mean) / std
    seeded(5)
    expected = RandomErasing(probability=0.6, mode=mode, max_count=3, device="cpu")(normalised.clone())
    boxes = expected != normalised
    assert 0.3 < boxes.flatten(1).any(1).float().mean() < 0.9  # about 60 % of the images were erased
    torch.testing.assert_close(erased[boxes], (expected * std + mean).clamp(0, 1)[boxes], rtol=0, atol=1e-6)
    assert torch.equal(erased[~boxes], images[~boxes])  # the rest untouched, bit for bit
    assert erased.min() >= 0 and erased.max() <= 1


def test_erasing_then_mixing_in_deits_order(demo_cfg, batch):
    cfg = demo_cfg(*DEIT, "data.random_erasing=1")
    images, labels = batch
    seeded(0)
    mixed, targets, (erased, hard) = BatchAugment(cfg, CLASSES, "cpu")(images, labels)
    seeded(0)
    only_erased, _, _ = BatchAugment(demo_cfg("data.random_erasing=1"), CLASSES, "cpu")(images, labels)
    assert torch.equal(erased, only_erased) and not torch.equal(erased, images)
    expected_images, expected_targets = Mixup(0.8, 1.0, label_smoothing=0.1, num_classes=CLASSES)(erased.clone(), hard)
    assert torch.equal(mixed, expected_images) and torch.equal(targets, expected_targets)


# ----------------------------------------------------------------------------- repeated augmentation

def test_repeated_aug_over_two_processes_is_deits_stripe_with_the_data_sets_epoch_length():
    n, batch_size = 1437, 64
    shards = [ShardSampler(n, shuffle=True, seed=7, rank=rank, world_size=2, batch_size=batch_size, repeats=3)
              for rank in range(2)]
    plain = [ShardSampler(n, shuffle=True, seed=7, rank=rank, world_size=2, batch_size=batch_size)
             for rank in range(2)]
    order = ShardSampler(n, shuffle=True, seed=7, rank=0, world_size=1, batch_size=1)  # the epoch's permutation
    for shard in [*shards, *plain, order]:
        shard.set_epoch(4)
    permutation = order.indices()
    for rank, shard in enumerate(shards):
        assert len(shard) == len(plain[rank]) == 704  # n // 2 = 718, in whole batches: an epoch's length
        deit = RepeatAugSampler(range(n), num_replicas=2, rank=rank, shuffle=False, num_repeats=3, selected_round=0)
        assert shard.indices() == [permutation[i] for i in deit][:len(shard)]  # DeiT's stripe of our order
    seen = [index for shard in shards for index in shard.indices()]
    counts = np.bincount(seen, minlength=n)
    assert sorted(set(counts[counts > 0])) in ([3], [1, 3], [2, 3])  # every image its 3 copies (one at the cut)
    assert (counts == 3).sum() >= len(seen) // 3 - 1
    copies = {}
    for shard in shards:
        for index, copy_number in zip(shard.indices(), shard.copies()):
            copies.setdefault(index, []).append(copy_number)
    assert all(sorted(numbers) == [0, 1, 2] for numbers in copies.values() if len(numbers) == 3)
    whole = shards[1].indices(), shards[1].copies()
    shards[1].set_epoch(4, start_batch=3)  # a resume: the same positions, after the consumed batches
    assert (shards[1].indices(), shards[1].copies()) == (whole[0][3 * batch_size:], whole[1][3 * batch_size:])


def test_copies_of_an_image_get_their_own_augmentation(demo_cfg):
    """torchvision seeds an image's augmentation by (seed, epoch, index): a copy other than the
    first gets draws of its own, the first those of a run without repeats."""
    loader = build_loader(demo_cfg("data.repeated_aug=3", "data.workers=0", "batch_size=12"), "train")
    loader.set_epoch(0)
    images, labels = next(iter(loader))
    indices, copies = loader.sampler.indices()[:12], loader.sampler.copies()[:12]
    assert indices[0] == indices[1] == indices[2] != indices[3] and copies[:4] == [0, 1, 2, 0]
    assert labels[0] == labels[1] == labels[2]
    assert not torch.equal(images[0], images[1]) and not torch.equal(images[1], images[2])  # other crops
    dataset = loader.dataset
    assert torch.equal(images[0], dataset[(0, indices[0], 0)][0]) and torch.equal(images[2], dataset[(0, indices[0], 2)][0])
    plain = build_loader(demo_cfg("data.workers=0", "batch_size=12"), "train").dataset
    assert torch.equal(plain[(0, indices[0], 0)][0], dataset[(0, indices[0], 0)][0])  # copy 0: a run without repeats


@pytest.mark.parametrize("loader_name", ["dali", "ffcv"])
def test_dali_and_ffcv_read_the_shard_rules_copies_each_with_its_own_crop(demo_cfg, loader_name):
    """DALI and FFCV take ShardSampler's repeated indices as they are and draw per position: an
    image's copies come in a row, with its label, each a different crop."""
    pytest.importorskip({"dali": "nvidia.dali", "ffcv": "ffcv"}[loader_name])
    cfg = demo_cfg(f"loader={loader_name}", "data.repeated_aug=3", "data.workers=1", "data.dali.threads=1",
                   "batch_size=12")
    prepare_dataset(cfg)
    loader = build_loader(cfg, "train")
    loader.set_epoch(0)
    images, labels = next(iter(loader))
    indices, copies = loader.sampler.indices()[:12], loader.sampler.copies()[:12]
    assert indices == [i for i in indices[::3] for _ in range(3)] and copies == [0, 1, 2] * 4
    assert torch.equal(labels, labels[::3].repeat_interleave(3))
    # FFCV's crops are not seeded: two equal crops of 32 px are possible, a second pair is not likely
    pairs = [(group + a, group + b) for group in range(0, 12, 3) for a, b in [(0, 1), (1, 2), (0, 2)]]
    assert sum(not torch.equal(images[a], images[b]) for a, b in pairs) >= len(pairs) - 1


# ----------------------------------------------------------------------------- methods and attacks

@pytest.fixture(scope="module")
def tiny(demo_cfg_module):
    torch.manual_seed(0)
    model = create_model(demo_cfg_module("model=test_resnet"), CLASSES, dual_norm=False)
    return model.to(memory_format=torch.channels_last)


@pytest.fixture(scope="module")
def demo_cfg_module(digits_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")

    def make(*overrides):
        return load_config([f"data.root={digits_root}", f"output_dir={out}", "tracker=none", *overrides])
    return make


def mixed_batch(cfg, batch, seed=1):
    seeded(seed)
    images, labels, unmixed = BatchAugment(cfg, CLASSES, "cpu")(*batch)
    return images, labels, unmixed


def test_the_attack_ascends_the_soft_target_loss(demo_cfg_module, tiny, batch):
    """Untargeted, on mixed targets: timm's SoftTargetCrossEntropy's gradient sign, not the hard labels'."""
    cfg = demo_cfg_module("model=test_resnet", "method=adv_train", *DEIT, "data.mix_mode=elem",
                          "attack.targeted=false", "attack.random_start=false", "attack.steps=3", "attack.eps=8")
    images, targets, _ = mixed_batch(cfg, batch)
    model = tiny.train()
    ours = make_adversarial(StepContext(model, model, cfg, CLASSES), images, targets)
    kwargs = dict(eps=8 / 255, step_size=1 / 255, steps=3, random_start=False)
    soft = pgd(model, images, targets, loss=lambda logits, t: SoftTargetCrossEntropy()(logits.float(), t), **kwargs)
    hard = pgd(model, images, targets.argmax(1), **kwargs)
    torch.testing.assert_close(ours, soft, rtol=0, atol=1e-6)
    assert (ours - hard).abs().amax() > 1 / 255  # the hard labels' attack goes elsewhere


def test_targeted_attack_aims_at_a_class_outside_the_mix(demo_cfg_module, batch):
    cfg = demo_cfg_module(*DEIT, "data.mix_mode=elem")
    _, targets, (_, labels) = mixed_batch(cfg, batch)
    torch.manual_seed(0)
    chosen = torch.stack([random_unmixed_class(targets) for _ in range(200)])
    partners = labels.flip(0)  # timm mixes image i with image N − 1 − i
    mixed_rows = (targets > targets.amin(1, keepdim=True)).sum(1) == 2
    assert mixed_rows.any()
    assert not (chosen == labels).any()
    assert not (chosen[:, mixed_rows] == partners[mixed_rows]).any()
    assert set(chosen.flatten().tolist()) == set(range(CLASSES))  # every other class is a possible target


def run_step(cfg, model, images, labels, unmixed):
    ctx = StepContext(model, model, cfg, CLASSES, unmixed=unmixed)
    steps = METHODS[cfg.method].step(ctx, images, labels)
    try:
        while True:
            sum(next(steps).terms.values()).backward()
    except StopIteration as done:
        return done.value


@pytest.mark.parametrize("mix_attacked", [False, True])
def test_advprop_mixes_the_clean_pass_and_attacks_as_fast_advprops_code(demo_cfg_module, batch, mix_attacked):
    cfg = demo_cfg_module("model=test_resnet", "method=advprop", *DEIT, "attack=pgd1",
                          f"advprop.mix_attacked={str(mix_attacked).lower()}")
    images, targets, unmixed = mixed_batch(cfg, batch)
    torch.manual_seed(0)
    model = create_model(cfg, CLASSES, dual_norm=True).to(memory_format=torch.channels_last).train()
    reference = copy.deepcopy(model)
    out = run_step(cfg, model, images, targets, unmixed)
    source, source_labels = (images, targets) if mix_attacked else unmixed
    assert torch.equal(out.source, source)
    assert (out.adversarial - source).abs().amax() <= 1 / 255 + 1e-6
    # the clean pass: timm's soft-target loss of the mixed batch (its smoothing not applied twice)
    clean = SoftTargetCrossEntropy()(reference(images), targets)
    torch.testing.assert_close(out.metrics["loss/clean"], clean, rtol=1e-5, atol=1e-6)
    assert out.metrics["acc/clean"] == pytest.approx(
        100 * (reference(images).argmax(1) == targets.argmax(1)).float().mean().item())  # the dominant label
    with use_norm(reference, AUX):
        adv_logits = reference(out.adversarial)
    adv = (SoftTargetCrossEntropy()(adv_logits, source_labels) if mix_attacked
           else F.cross_entropy(adv_logits, source_labels, label_smoothing=0.1))
    torch.testing.assert_close(out.metrics["loss/adv"], adv, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mix_attacked", [False, True])
def test_fast_advprop_attacks_the_unmixed_rows_unless_told(demo_cfg_module, batch, mix_attacked):
    cfg = demo_cfg_module("model=test_resnet", "method=fast_advprop", "attack.targeted=false", "attack=pgd1",
                          *DEIT, f"fast_advprop.mix_attacked={str(mix_attacked).lower()}")
    images, targets, unmixed = mixed_batch(cfg, batch)
    torch.manual_seed(0)
    model = create_model(cfg, CLASSES, dual_norm=True).to(memory_format=torch.channels_last).train()
    out = run_step(cfg, model, images, targets, unmixed)
    n_adv = round(len(images) * 0.2)
    expected = images[-n_adv:] if mix_attacked else unmixed[0][-n_adv:]
    assert torch.equal(out.source, expected)
    assert (out.adversarial - expected).abs().amax() <= 1 / 255 + 1e-6  # the panel's rows match their source


# ----------------------------------------------------------------------------- bad values

@pytest.mark.parametrize("args, key", [
    (["data.mixup=-0.1"], "data.mixup"),
    (["data.cutmix=-1"], "data.cutmix"),
    (["data.mixup=0.8", "data.mix_prob=1.5"], "data.mix_prob"),
    (["data.mix_switch_prob=-0.5"], "data.mix_switch_prob"),
    (["data.mix_mode=half"], "data.mix_mode"),
    (["data.random_erasing=1.25"], "data.random_erasing"),
    (["data.erasing_mode=noise"], "data.erasing_mode"),
    (["data.erasing_count=0"], "data.erasing_count"),
    (["data.repeated_aug=0"], "data.repeated_aug"),
    (["data.cutmix=1", "batch_size=63"], "batch_size"),
])
def test_bad_values_are_one_line_naming_the_key(demo_cfg, args, key):
    with pytest.raises(ConfigError, match=f"^bad value for {key}: ") as error:
        demo_cfg(*args)
    assert "\n" not in str(error.value)


def test_mixing_with_a_method_that_takes_hard_labels_only_is_refused(demo_cfg, monkeypatch):
    hard_only = Method("hard_only", METHODS["vanilla"].step)  # soft_targets defaults to False
    monkeypatch.setitem(METHODS, "hard_only", hard_only)
    demo_cfg("method=hard_only")  # fine without mixing
    with pytest.raises(ConfigError, match=r"^bad value for method: 'hard_only' takes no mixed targets"):
        demo_cfg("method=hard_only", "data.mixup=0.8")


# ----------------------------------------------------------------------------- recipes

@pytest.mark.parametrize("name, repeats", [("deit_s_advprop", 3), ("convnext_t_advprop", 1)])
def test_deit_and_convnext_recipes_have_their_papers_batch_augmentation(name, repeats):
    """DeiT's and ConvNeXt's main.py defaults: --mixup 0.8 --cutmix 1.0 --mixup-prob 1 --mixup-switch-prob
    0.5 --mixup-mode batch --smoothing 0.1 --reprob 0.25 --remode pixel --recount 1; DeiT's RASampler (3)."""
    c = load_config([f"config={REPO / 'configs' / f'{name}.yaml'}"])
    data = c.data
    mixing = (data.mixup, data.cutmix, data.mix_prob, data.mix_switch_prob, data.mix_mode)
    assert mixing == (0.8, 1.0, 1.0, 0.5, "batch")
    assert (c.label_smoothing, data.random_erasing, data.erasing_mode, data.erasing_count) == (0.1, 0.25, "pixel", 1)
    assert data.repeated_aug == repeats and c.advprop.mix_attacked is False  # the Fast AdvProp code's default


def test_resnet50_fast_advprop_cutmix_recipe_is_the_authors_ablation():
    c = load_config([f"config={REPO / 'configs' / 'resnet50_fast_advprop_cutmix.yaml'}"])
    base = load_config([f"config={REPO / 'configs' / 'resnet50_fast_advprop.yaml'}"])
    assert (c.method, c.data.cutmix, c.data.mixup, c.data.mix_prob) == ("fast_advprop", 1.0, 0.0, 1.0)
    assert (c.epochs, c.attack, c.fast_advprop.mix_attacked) == (base.epochs, base.attack, False)
