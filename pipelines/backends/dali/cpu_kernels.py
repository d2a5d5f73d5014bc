"""Numba kernels for the AutoAugment operations DALI's CPU operators are slow at.

On a CPU pipeline DALI's warp_affine, coord_transform and full-image float arithmetic cost
0.3–0.7 ms of a 2-core machine per 224² image — about the decode of an image, for operations PIL
does in a fraction of that. These kernels compute what those DALI operators compute, 2–5× faster,
run by DALI's numba_function operator in DALI's own threads. GPU pipelines keep DALI's operators
(pipelines/backends/dali/augment_ops.py picks by device; tests/test_dali_cpu_kernels.py compares the two).
    - warp: bilinear, destination → source matrix, the image surrounded by a 1-pixel border of a
      fill colour and clamped beyond it (what DALI's warp of the padded image computes), in 8-bit
      fixed point like PIL's resampling (≤ 1 grey level from DALI's float result);
    - colour matrix: every pixel's RGB times a 3×3 matrix, rounded and saturated to uint8;
    - solarize, solarize-add, contrast, autocontrast: per-channel lookup tables of 256 entries,
      from the parameter and (contrast, autocontrast) the image's statistics.
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
                row0, row1 = image[y0 - 1], image[y0]
                for c in range(3):
                    top = np.int32(row0[x0 - 1, c]) * (ONE - weight_x) + np.int32(row0[x0, c]) * weight_x
                    bottom = np.int32(row1[x0 - 1, c]) * (ONE - weight_x) + np.int32(row1[x0, c]) * weight_x
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


@numba.njit(cache=True)
def _round_to_uint8(value):
    return np.uint8(min(max(value + 0.5, 0.0), 255.0))


@numba.njit(cache=True)
def apply_tables(out, image, tables):
    """out[..., c] = tables[c][image[..., c]]."""
    for y in range(image.shape[0]):
        for x in range(image.shape[1]):
            for c in range(3):
                out[y, x, c] = tables[c, image[y, x, c]]


@numba.njit(cache=True)
def solarize(out, image, threshold):
    """PIL's ImageOps.solarize: pixels at or above the threshold inverted."""
    table = np.empty((3, 256), dtype=np.uint8)
    for value in range(256):
        table[:, value] = value if value < threshold else 255 - value
    apply_tables(out, image, table)


@numba.njit(cache=True)
def solarize_add(out, image, addition):
    """timm's solarize_add: `addition` added (saturated) to pixels below 128."""
    table = np.empty((3, 256), dtype=np.uint8)
    for value in range(256):
        table[:, value] = min(255, value + addition) if value < 128 else value
    apply_tables(out, image, table)


@numba.njit(cache=True)
def contrast(out, image, factor):
    """Pixels moved away from (factor > 1) or toward the image's mean luma, as DALI's suite does:
    centre + (pixel - centre) * factor with the centre the luma-weighted mean of channel means."""
    sums = np.zeros(3, dtype=np.int64)
    for y in range(image.shape[0]):
        for x in range(image.shape[1]):
            for c in range(3):
                sums[c] += image[y, x, c]
    pixels = image.shape[0] * image.shape[1]
    centre = (0.299 * sums[0] + 0.587 * sums[1] + 0.114 * sums[2]) / pixels
    table = np.empty((3, 256), dtype=np.uint8)
    for value in range(256):
        table[:, value] = _round_to_uint8(centre + (value - centre) * factor)
    apply_tables(out, image, table)


@numba.njit(cache=True)
def auto_contrast(out, image):
    """Each channel stretched to 0–255 (a constant channel kept as it is)."""
    low, high = np.full(3, 255, dtype=np.int32), np.zeros(3, dtype=np.int32)
    for y in range(image.shape[0]):
        for x in range(image.shape[1]):
            for c in range(3):
                low[c], high[c] = min(low[c], image[y, x, c]), max(high[c], image[y, x, c])
    table = np.empty((3, 256), dtype=np.uint8)
    for c in range(3):
        scale = 255.0 / (high[c] - low[c]) if high[c] > low[c] else 1.0
        offset = low[c] if high[c] > low[c] else 0
        for value in range(256):
            table[c, value] = _round_to_uint8((value - offset) * scale)
    apply_tables(out, image, table)


# numba_function compiles its run function itself (njit, no options): thin runners call the kernels.

def _same_shape(outs, ins):
    for sample in range(len(outs[0])):
        outs[0][sample][:] = ins[0][sample]


def _run_warp(out, image, matrix, fill):
    warp_bilinear(out, image, matrix, fill)


def _run_colour_matrix(out, image, matrix):
    colour_matrix(out, image, matrix)


def _run_solarize(out, image, threshold):
    solarize(out, image, threshold[0])


def _run_solarize_add(out, image, addition):
    solarize_add(out, image, addition[0])


def _run_contrast(out, image, factor):
    contrast(out, image, factor[0])


def _run_auto_contrast(out, image):
    auto_contrast(out, image)


# operation → (runner, DALI type and dimensions of each per-sample parameter after the image)
OPERATIONS = {
    "warp": (_run_warp, ((types.FLOAT, 2), (types.UINT8, 1))),  # 2×3 matrix, fill colour
    "colour_matrix": (_run_colour_matrix, ((types.FLOAT, 2),)),  # 3×3 matrix
    "solarize": (_run_solarize, ((types.INT32, 0),)),  # threshold
    "solarize_add": (_run_solarize_add, ((types.UINT8, 0),)),  # addition
    "contrast": (_run_contrast, ((types.FLOAT, 0),)),  # factor
    "auto_contrast": (_run_auto_contrast, ()),
}


@functools.cache  # one compilation per process; every branch of a policy calls the same operator
def _operator(name: str) -> NumbaFunction:
    run_fn, parameters = OPERATIONS[name]
    return NumbaFunction(run_fn=run_fn, setup_fn=_same_shape, out_types=[types.UINT8], outs_ndim=[3],
                         in_types=[types.UINT8] + [dtype for dtype, _ in parameters],
                         ins_ndim=[3] + [max(ndim, 1) for _, ndim in parameters])


def run(name: str, images, *parameters):
    """Kernel `name` on a batch of HWC uint8 RGB images on the CPU, with per-sample parameters
    (DataNodes or constants, of the types OPERATIONS lists)."""
    # numba_function has no 0-d inputs: scalars travel as 1-element arrays
    parameters = [fn.reshape(parameter, shape=[1]) if ndim == 0 else parameter
                  for parameter, (_, ndim) in zip(parameters, OPERATIONS[name][1])]
    output = _operator(name)(images, *parameters)
    return fn.reshape(output, layout="HWC")  # numba_function's output has no layout; conditionals need it
