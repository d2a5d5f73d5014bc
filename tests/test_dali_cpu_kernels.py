"""The numba kernels CPU pipelines run for AutoAugment (warps, colour matrices, solarize,
solarize-add, contrast, autocontrast) compute what the DALI operators GPU pipelines run compute
(both run here on the CPU), to within one grey level."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("nvidia.dali", reason="nvidia-dali is not installed (./setup.sh installs it)")
from nvidia.dali import fn, pipeline_def, types  # noqa: E402

from conftest import small_photos  # noqa: E402

from pipelines.backends.dali import cpu_kernels as dali_cpu_kernels  # noqa: E402
from pipelines.backends.augment_policy import IMAGENET_MEAN_255  # noqa: E402
from pipelines.backends.dali.augment_ops import (affine_matrix, colour_blend_matrix, dali_ops,  # noqa: E402
                                        solarize_with_dali, transform_colours_with_dali, warp_with_dali)

SIZE = 96
FILL = [float(c) for c in IMAGENET_MEAN_255]
WARPS = [("Rotate", 3.0), ("Rotate", -17.0), ("Rotate", 30.0), ("ShearX", 0.3), ("ShearY", -0.3),
         ("TranslateXRel", 0.45), ("TranslateYRel", -0.2), ("TranslateX", 7.0), ("TranslateY", -2.5)]


def run_both(images, parameter, kernel, with_dali):
    """(kernel output, DALI operators' output) for every image, the parameter (if any) per sample."""

    @pipeline_def(batch_size=len(images), num_threads=1, device_id=None, seed=1)
    def pipeline():
        batch = fn.external_source(source=lambda: images, batch=True, layout="HWC")
        per_sample = None
        if parameter is not None:
            per_sample = fn.external_source(source=lambda: [parameter] * len(images), batch=True)
        return kernel(batch, per_sample), with_dali(batch, per_sample)

    pipe = pipeline()
    pipe.build()
    ours, theirs = pipe.run()
    stack = lambda out: np.stack([np.array(out[i]) for i in range(len(images))]).astype(int)  # noqa: E731
    return stack(ours), stack(theirs)


def warp_kernel(images, matrix):
    return dali_cpu_kernels.run("warp", images, matrix, types.Constant(np.array(IMAGENET_MEAN_255, dtype=np.uint8)))


def kernel(name):
    return lambda images, parameter: dali_cpu_kernels.run(name, images, *([] if parameter is None else [parameter]))


@pytest.mark.parametrize("name,argument", WARPS)
def test_warp_kernel_is_dalis_warp(name, argument):
    matrix = affine_matrix(name, argument, SIZE)
    ours, dalis = run_both(small_photos(SIZE), matrix, warp_kernel,
                           lambda im, m: warp_with_dali(im, m, SIZE, FILL))
    assert ours.shape == dalis.shape == (3, SIZE, SIZE, 3)
    difference = np.abs(ours - dalis)
    assert difference.max() <= 1, (name, argument, difference.max())  # 8-bit fixed point vs float
    assert difference.mean() < 0.05, (name, argument, difference.mean())


def test_warp_fills_uncovered_pixels_with_the_fill_colour():
    """A translation by 10 pixels to the left leaves the right 9 columns to the fill colour (the
    10th blends it with the border pixel)."""
    images = small_photos(SIZE)
    ours, _ = run_both(images, affine_matrix("TranslateX", 10.0, SIZE),
                       warp_kernel, lambda im, m: warp_with_dali(im, m, SIZE, FILL))
    assert (ours[:, :, -9:, :] == np.array(IMAGENET_MEAN_255)).all()
    np.testing.assert_array_equal(ours[:, :, :-10, :], np.stack(images)[:, :, 10:, :])  # whole-pixel shift: exact


@pytest.mark.parametrize("factor", [0.1, 0.7, 1.0, 1.9])
def test_colour_matrix_kernel_is_dalis_coord_transform(factor):
    ours, dalis = run_both(small_photos(SIZE), colour_blend_matrix(factor), kernel("colour_matrix"),
                           transform_colours_with_dali)
    difference = np.abs(ours - dalis)
    assert difference.max() <= 1, (factor, difference.max())
    if factor == 1.0:
        np.testing.assert_array_equal(ours, np.stack(small_photos(SIZE)))


def low_contrast_photos():
    """The photos squeezed into 60–180 and one with a constant (zero-range) blue channel."""
    images = [(60 + im.astype(np.float32) * 120 / 255).astype(np.uint8) for im in small_photos(SIZE)]
    images[0] = images[0].copy()
    images[0][..., 2] = 77
    return images


LOOKUPS = [("solarize", solarize_with_dali, np.int32(t)) for t in (0, 100, 128, 256)]
LOOKUPS += [("solarize_add", dali_ops.solarize_add.op, np.uint8(a)) for a in (0, 50, 110)]
LOOKUPS += [("contrast", dali_ops.contrast.op, np.float32(f)) for f in (0.1, 0.55, 1.0, 1.9)]
LOOKUPS += [("auto_contrast", dali_ops.auto_contrast.op, None)]


@pytest.mark.parametrize("name,with_dali,parameter", LOOKUPS, ids=[f"{n}-{p}" for n, _, p in LOOKUPS])
def test_lookup_kernels_are_dalis_operators(name, with_dali, parameter):
    images = low_contrast_photos()
    ours, dalis = run_both(images, parameter, kernel(name), with_dali)
    difference = np.abs(ours - dalis)
    assert difference.max() <= 1, (name, parameter, difference.max())
    assert difference.mean() < 0.05, (name, parameter, difference.mean())
    if name == "auto_contrast":  # stretched to the full range, the constant channel left alone
        assert ours[1:].min() == 0 and ours[1:].max() == 255
        assert (ours[0, ..., 2] == 77).all() and ours[0, ..., :2].min() == 0
    if name == "solarize" and parameter == 256:
        np.testing.assert_array_equal(ours, np.stack(images))
