"""Numba kernels for the AutoAugment operations DALI's CPU operators are slow at.

On a CPU pipeline DALI's warp_affine and coord_transform cost ≈ 0.7 and ≈ 0.5 ms of a 2-core
machine per 224² image — about the decode of an image, for an operation PIL does in a fraction of
that. These kernels compute the same thing ≈ 3× faster, run by DALI's numba_function operator in
DALI's own threads. GPU pipelines keep DALI's operators (pipelines/dali_augment_ops.py picks).
    - warp: bilinear, destination → source matrix, the image surrounded by a 1-pixel border of a
      fill colour and clamped beyond it (what DALI's warp of the padded image computes), in 8-bit
      fixed point like PIL's resampling (≤ 1 grey level from DALI's float result);
    - colour matrix: every pixel's RGB times a 3×3 matrix, rounded and saturated to uint8.
"""
from __future__ import annotations

import functools

import numba
import numpy as np
from nvidia.dali import fn, types
from nvidia.dali.plugin.numba.experimental import NumbaFunction

ONE = 256  # 8-bit fixed point: interpolation weights are multiples of 1/256
SHIFT, HALF = 16, 1 << 15  # the product of two weights, and half of it for rounding


@numba.njit(cache=True)
def warp_bilinear(out, image, matrix, fill):
    height, width = image.shape[0], image.shape[1]
    for y in range(out.shape[0]):
        # source of the pixel centre (0.5, y + 0.5) in padded coordinates, as a pixel index
        source_x = matrix[0, 0] * 0.5 + matrix[0, 1] * (y + 0.5) + matrix[0, 2] - 0.5
        source_y = matrix[1, 0] * 0.5 + matrix[1, 1] * (y + 0.5) + matrix[1, 2] - 0.5
        for x in range(out.shape[1]):
            clamped_x = min(max(source_x, 0.0), width + 1.0)
            clamped_y = min(max(source_y, 0.0), height + 1.0)
            x0, y0 = int(clamped_x), int(clamped_y)
            weight_x = int((clamped_x - x0) * ONE + 0.5)
            weight_y = int((clamped_y - y0) * ONE + 0.5)
            if 1 <= x0 < width and 1 <= y0 < height:  # all four neighbours are image pixels
                for c in range(3):
                    top = np.int32(image[y0 - 1, x0 - 1, c]) * (ONE - weight_x) + np.int32(image[y0 - 1, x0, c]) * weight_x
                    bottom = np.int32(image[y0, x0 - 1, c]) * (ONE - weight_x) + np.int32(image[y0, x0, c]) * weight_x
                    out[y, x, c] = (top * (ONE - weight_y) + bottom * weight_y + HALF) >> SHIFT
            else:  # a neighbour is on the fill border (or clamped to it)
                x1, y1 = min(x0 + 1, width + 1), min(y0 + 1, height + 1)
                row0, row1, column0, column1 = 0 < y0 <= height, 0 < y1 <= height, 0 < x0 <= width, 0 < x1 <= width
                for c in range(3):
                    border = np.int32(fill[c])
                    top_left = np.int32(image[y0 - 1, x0 - 1, c]) if row0 and column0 else border
                    top_right = np.int32(image[y0 - 1, x1 - 1, c]) if row0 and column1 else border
                    bottom_left = np.int32(image[y1 - 1, x0 - 1, c]) if row1 and column0 else border
                    bottom_right = np.int32(image[y1 - 1, x1 - 1, c]) if row1 and column1 else border
                    top = top_left * (ONE - weight_x) + top_right * weight_x
                    bottom = bottom_left * (ONE - weight_x) + bottom_right * weight_x
                    out[y, x, c] = (top * (ONE - weight_y) + bottom * weight_y + HALF) >> SHIFT
            source_x += matrix[0, 0]
            source_y += matrix[1, 0]


@numba.njit(cache=True, fastmath=True)
def colour_matrix(out, image, matrix):
    for y in range(image.shape[0]):
        for x in range(image.shape[1]):
            red, green, blue = np.float32(image[y, x, 0]), np.float32(image[y, x, 1]), np.float32(image[y, x, 2])
            for c in range(3):
                value = matrix[c, 0] * red + matrix[c, 1] * green + matrix[c, 2] * blue + np.float32(0.5)
                out[y, x, c] = np.uint8(min(max(value, np.float32(0)), np.float32(255)))


# numba_function compiles its run function itself (njit, no options): thin wrappers call the kernels.

def _same_shape(outs, ins):
    for sample in range(len(outs[0])):
        outs[0][sample][:] = ins[0][sample]


def _run_warp(out, image, matrix, fill):
    warp_bilinear(out, image, matrix, fill)


def _run_colour_matrix(out, image, matrix):
    colour_matrix(out, image, matrix)


@functools.cache  # one compilation per process; every branch of a policy calls the same operator
def _warp_operator():
    return NumbaFunction(run_fn=_run_warp, setup_fn=_same_shape, in_types=[types.UINT8, types.FLOAT, types.UINT8],
                         ins_ndim=[3, 2, 1], out_types=[types.UINT8], outs_ndim=[3])


@functools.cache
def _colour_matrix_operator():
    return NumbaFunction(run_fn=_run_colour_matrix, setup_fn=_same_shape, in_types=[types.UINT8, types.FLOAT],
                         ins_ndim=[3, 2], out_types=[types.UINT8], outs_ndim=[3])


def warp(images, matrix, fill):
    """HWC uint8 images (CPU) warped by per-sample 2×3 float matrices (padded coordinates)."""
    return _as_images(_warp_operator()(images, matrix, types.Constant(np.asarray(fill, dtype=np.uint8))))


def transform_colours(images, matrix):
    """HWC uint8 RGB images (CPU) with every pixel multiplied by a per-sample 3×3 float matrix."""
    return _as_images(_colour_matrix_operator()(images, matrix))


def _as_images(output):
    """numba_function's output has no layout; the branches of a conditional must all say HWC."""
    return fn.reshape(output, layout="HWC")  # metadata only, no copy
