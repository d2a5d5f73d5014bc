"""AutoAugment and RandAugment inside DALI do what timm does: the same draws (operations, order,
magnitudes, signs) within sampling error, the same arguments per level, and the same pixels per
operation within interpolation and rounding differences."""
from __future__ import annotations

import collections
import json
import random

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats

pytest.importorskip("nvidia.dali", reason="nvidia-dali is not installed (./setup.sh installs it)")
from nvidia.dali import fn, pipeline_def, types  # noqa: E402
from nvidia.dali.pipeline import do_not_convert  # noqa: E402
from nvidia.dali.auto_aug.core import augmentation, signed_bin  # noqa: E402
from timm.data import auto_augment as timm_aa  # noqa: E402

from conftest import REPO, small_photos, train_in_process  # noqa: E402

from pipelines.backends.augment_policy import IMAGENET_MEAN_255, timm_hparams, timm_transform  # noqa: E402
from pipelines.backends.dali.augment_ops import (TIMM_ARGUMENT, TabulatedAugmentation, dali_augmentation,  # noqa: E402
                                        timm_argument)
from pipelines.backends.dali.auto_augment import LEVEL_STEPS, DaliAutoAugment  # noqa: E402

SIZE = 96
DRAWS = 4000
POLICIES = ["v0", "original", "rand-m9-mstd0.5-inc1", "rand-m7-n3-mstd101"]


def test_level_arguments_are_timms(monkeypatch):
    """For every level and sign, the argument we derive is the one timm's level function gives."""
    hparams = timm_hparams(SIZE)
    for name, (level_to_argument, negated) in TIMM_ARGUMENT.items():
        for sign in (1, -1) if negated else (1,):
            monkeypatch.setattr(timm_aa, "_randomly_negate", lambda v, s=sign: s * v)
            for level in np.linspace(0, 10, 41):
                timm_fn = timm_aa.LEVEL_TO_ARG[name]
                expected = None if timm_fn is None else timm_fn(level, hparams)[0]
                assert timm_argument(name, sign * level, hparams) == pytest.approx(expected), (name, level, sign)


# ---------------------------------------------------------------------------------------------
# Each operation, at a fixed magnitude, against timm's PIL operation

def dali_operation(name: str, level: float, images: list[np.ndarray], device: str = "cpu") -> np.ndarray:
    levels = np.arange(0, 10 * LEVEL_STEPS + 1) / LEVEL_STEPS
    op = dali_augmentation(name, timm_hparams(SIZE), levels, SIZE)

    @pipeline_def(batch_size=len(images), num_threads=1, device_id=0 if device == "gpu" else None, seed=1)
    def pipeline():
        batch = fn.external_source(source=lambda: images, batch=True, layout="HWC", device=device)
        negated = fn.random.uniform(values=[int(level < 0)], dtype=types.INT32)  # the sign timm drew
        magnitude = signed_bin(round(abs(level) * LEVEL_STEPS), random_sign=negated)
        return op(batch, magnitude_bin=magnitude, num_magnitude_bins=len(levels), size=SIZE,
                  fill=[float(c) for c in IMAGENET_MEAN_255])

    pipe = pipeline()
    pipe.build()
    (out,) = pipe.run()
    out = out.as_cpu() if device == "gpu" else out
    return np.stack([np.array(out[i]) for i in range(len(images))]).astype(int)


def timm_operation(name: str, level: float, images: list[np.ndarray]) -> np.ndarray:
    argument = timm_argument(name, level, timm_hparams(SIZE))
    args = () if argument is None else (argument,)
    apply = timm_aa.NAME_TO_OP[name]
    return np.stack([np.asarray(apply(Image.fromarray(im), *args, fillcolor=IMAGENET_MEAN_255,
                                      resample=Image.BILINEAR)) for im in images]).astype(int)


# Equalize: DALI uses OpenCV's lookup table, PIL a shifted cumulative histogram (a few levels apart).
MEAN_TOLERANCE = collections.defaultdict(lambda: 1.0, Equalize=6.0)
FAR_SHARE = collections.defaultdict(lambda: 0.02, Equalize=0.25)  # pixels more than 8 levels apart


def test_each_operation_matches_timms_pixels():
    images, failures = small_photos(SIZE), []
    for name, (level_to_argument, negated) in TIMM_ARGUMENT.items():
        for level in ((3, 7, 10) + ((-7,) if negated else ())) if level_to_argument else (0,):
            difference = np.abs(dali_operation(name, level, images) - timm_operation(name, level, images))
            far = np.mean(difference > 8)
            if difference.mean() > MEAN_TOLERANCE[name] or far > FAR_SHARE[name]:
                failures.append(f"{name}@{level}: mean |Δ| {difference.mean():.2f}, {far:.1%} pixels > 8 apart")
    assert not failures, failures


@pytest.mark.gpu
@pytest.mark.timeout(300)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_pipelines_compute_what_cpu_pipelines_compute():
    """GPU pipelines run DALI's operators where CPU pipelines run numba kernels: on the same
    images, every operation at both signs gives the same pixels within rounding."""
    images = small_photos(SIZE)
    for name, (_, negated) in TIMM_ARGUMENT.items():
        for level in (-7.0, 7.0) if negated else (7.0,):
            difference = np.abs(dali_operation(name, level, images, "gpu") - dali_operation(name, level, images))
            assert difference.max() <= 2 and difference.mean() < 0.1, (name, level, difference.max(), difference.mean())


def test_a_wrong_sign_or_level_is_visible():
    """The pixel comparison has power: the opposite rotation, or one level less, is beyond tolerance."""
    images = small_photos(SIZE)
    rotated = timm_operation("Rotate", 7, images)
    assert np.abs(dali_operation("Rotate", 7, images) - rotated).mean() < 1
    assert np.abs(timm_operation("Rotate", -7, images) - rotated).mean() > 20
    for name in ("Solarize", "Color", "ShearX"):
        one_level_less = np.abs(dali_operation(name, 6, images) - timm_operation(name, 7, images))
        assert one_level_less.mean() > MEAN_TOLERANCE[name] or np.mean(one_level_less > 8) > FAR_SHARE[name], name


# ---------------------------------------------------------------------------------------------
# The draws: which operations run, in which order, with which arguments

def probe_augmentation(name: str, code: int, levels: np.ndarray):
    """A stand-in for operation `name` that appends (code, its signed level) to a record tensor."""
    def mark(data, level):
        record = types.Constant(np.array([[[0, 1]]], dtype=np.float32)) * level
        return fn.cat(data, record + types.Constant(np.array([[[code, 0]]], dtype=np.float32)), axis=1)

    def mark_without_level(data, _):
        return fn.cat(data, types.Constant(np.array([[[code, 0]]], dtype=np.float32)), axis=1)

    if TIMM_ARGUMENT[name][0] is None:
        return augmentation(mark_without_level, name=name)
    return augmentation(mark, mag_range=levels, randomly_negate=TIMM_ARGUMENT[name][1], name=name,
                        mag_to_param=do_not_convert(lambda level: np.float32(level)),
                        augmentation_cls=TabulatedAugmentation)


def dali_draws(policy_name: str, count: int = DRAWS) -> list[tuple]:
    """Per image, the sequence of (operation, timm argument) the DALI policy applied."""
    policy = DaliAutoAugment(policy_name, SIZE)
    names = list(TIMM_ARGUMENT)
    batch = 500

    @pipeline_def(enable_conditionals=True, batch_size=batch, num_threads=1, device_id=None, seed=7)
    def pipeline():
        start = types.Constant(np.full((1, 1, 2), -1, dtype=np.float32))
        records = fn.cat(start, start, axis=1)  # a batch node (constants alone are not one)
        return policy(records, lambda name: probe_augmentation(name, names.index(name), policy.levels))

    pipe = pipeline()
    pipe.build()
    hparams = next(op.hparams for ops in policy.policy for op in ops)
    draws = []
    for _ in range(count // batch):
        (out,) = pipe.run()
        for i in range(batch):
            record = np.array(out[i])[0, 2:]
            draws.append(tuple((names[int(code)], argument_key(timm_argument(names[int(code)], level, hparams)))
                               for code, level in record))
    return draws


def timm_draws(policy_name: str, count: int = DRAWS) -> list[tuple]:
    """Per image, the sequence of (operation, argument) timm's transform applied (seeded)."""
    transform = timm_transform(policy_name, SIZE)
    ops = transform.ops if hasattr(transform, "ops") else [op for sub in transform.policy for op in sub]
    applied = []
    for op in ops:
        op.aug_fn = lambda img, *args, name=op.name, **_: applied.append((name, argument_key(args[0] if args else None))) or img
    random_state, numpy_state = random.getstate(), np.random.get_state()
    random.seed(11)
    np.random.seed(11)
    image, draws = Image.new("RGB", (4, 4)), []
    try:
        for _ in range(count):
            applied.clear()
            transform(image)
            draws.append(tuple(applied))
    finally:
        random.setstate(random_state)
        np.random.set_state(numpy_state)
    return draws


def argument_key(argument):
    return None if argument is None else round(float(argument), 3)


def same_distribution(a: list, b: list) -> float:
    """p-value of a two-sample chi-square test on categorical draws (rare categories pooled)."""
    counts_a, counts_b = collections.Counter(a), collections.Counter(b)
    keys = sorted(set(counts_a) | set(counts_b), key=repr)
    table = np.array([[counts_a[k] for k in keys], [counts_b[k] for k in keys]], dtype=float)
    expected = table.sum(0) * len(a) / (len(a) + len(b))
    rare = expected < 5
    if rare.any():
        table = np.concatenate([table[:, ~rare], table[:, rare].sum(1, keepdims=True)], axis=1)
    return stats.chi2_contingency(table)[1]


@pytest.fixture(scope="module", params=POLICIES)
def draws(request):
    return request.param, dali_draws(request.param), timm_draws(request.param)


def test_operations_and_their_order_are_drawn_as_timm_draws_them(draws):
    name, dali, timm = draws
    operations = lambda records: [tuple(op for op, _ in seq) for seq in records]  # noqa: E731
    assert same_distribution(operations(dali), operations(timm)) > 1e-3, name
    counts = lambda records: [len(seq) for seq in records]  # noqa: E731
    assert same_distribution(counts(dali), counts(timm)) > 1e-3, name


def test_arguments_are_drawn_as_timm_draws_them(draws):
    """Per operation, the arguments it got: exact categories for fixed magnitudes (signs included),
    a two-sample Kolmogorov–Smirnov test where the magnitude is noisy."""
    name, dali, timm = draws
    dali_args, timm_args = collections.defaultdict(list), collections.defaultdict(list)
    for records, args in ((dali, dali_args), (timm, timm_args)):
        for seq in records:
            for op, argument in seq:
                args[op].append(argument)
    assert set(dali_args) == set(timm_args), name
    noisy = "mstd" in name
    for op in timm_args:
        if noisy and timm_args[op][0] is not None:
            p = stats.ks_2samp(dali_args[op], timm_args[op]).pvalue
        else:
            p = same_distribution(dali_args[op], timm_args[op])
        assert p > 1e-3, (name, op, p)


def test_the_draw_comparison_has_power():
    """A policy with a mistake is caught: timm never negating (a lost sign) and another policy."""
    dali = dali_draws("v0")
    assert same_distribution(dali, timm_draws("original")) < 1e-6
    original = timm_aa._randomly_negate
    timm_aa._randomly_negate = lambda v: v
    try:
        unsigned = timm_draws("v0")
    finally:
        timm_aa._randomly_negate = original
    assert same_distribution(dali, unsigned) < 1e-6


# ---------------------------------------------------------------------------------------------
# In the loader: the policy changes the pixels, not the loader contract

def test_the_train_loader_with_auto_augment_keeps_order_seed_and_resume(demo_cfg):
    from pipelines.loading import build_loader

    def epoch(*overrides, start_batch=0):
        loader = build_loader(demo_cfg("loader=dali", "data.dali.threads=2", *overrides), "train")
        loader.set_epoch(1, start_batch)
        batches = list(loader)
        return (np.concatenate([x.numpy() for x, _ in batches]), np.concatenate([y.numpy() for _, y in batches]),
                loader.pipelines_built)

    plain_images, plain_labels, _ = epoch()
    images, labels, built = epoch("data.auto_augment=v0")
    again_images, again_labels, _ = epoch("data.auto_augment=v0")
    assert built == 1 and np.array_equal(labels, plain_labels)  # same images in the same order
    assert np.array_equal(images, again_images)  # a function of the seed
    changed = np.abs(images.astype(int) - plain_images).reshape(len(images), -1).max(1) > 0
    assert 0.5 < changed.mean() < 1  # v0 leaves an image alone with probability ~0.18 (timm's too)
    _, tail, _ = epoch("data.auto_augment=v0", start_batch=3)
    assert np.array_equal(tail, labels[3 * 64:])  # mid-epoch resume starts after the consumed batches
    other_seed, _, _ = epoch("data.auto_augment=v0", "seed=1")
    assert not np.array_equal(other_seed, images)


@pytest.mark.slow
def test_the_efficientnet_recipe_trains_on_the_demo_set_with_dali_auto_augment(digits_root, tmp_path):
    """configs/effnet_b0_advprop.yaml as it is (AdvProp, RMSprop-TF, label smoothing, loader=dali,
    AutoAugment v0), pointed at the digits and made small: 32 px, timm's tiny EfficientNet (the full
    B0 does not learn 1,400 digits in a few epochs on any loader), BN momentum and LR for 110 steps."""
    run_dir = tmp_path / "effnet"
    train_in_process(f"config={REPO / 'configs' / 'effnet_b0_advprop.yaml'}", "data.dataset=digits",
                     f"data.root={digits_root}", "data.image_size=32", "data.crop_ratio=1.0", "data.min_scale=0.6",
                     "data.hflip=false", "data.dali.threads=2", "model=test_efficientnet", "batch_size=64",
                     "epochs=5", "schedule.warmup_epochs=1", "bn_momentum=0.1", "optimizer.lr_per_256=0.064",
                     "ema_decay=0", "checkpoint_every_steps=0", "log_every=5", f"output_dir={run_dir}", "tracker=none")
    config = (run_dir / "config.yaml").read_text()
    assert "loader: dali" in config and "auto_augment: v0" in config and "method: advprop" in config
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["clean_top1"] > 60  # chance is 10 %
    losses = [json.loads(line).get("train/loss/clean") for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [loss for loss in losses if loss is not None]
    assert np.mean(losses[-3:]) < 0.5 * np.mean(losses[:3])
