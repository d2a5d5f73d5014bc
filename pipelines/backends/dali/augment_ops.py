"""timm's AutoAugment/RandAugment operations as DALI augmentations, one per timm operation name.

timm turns an operation's level (0–10, optionally noisy, randomly negated for some) into an
argument — degrees, a shear factor, an enhancement factor, a threshold, bits to keep — and applies
a PIL function. Here `timm_argument` is that mapping, written out (tests/test_dali_auto_augment.py
checks it against timm's level functions), and `dali_augmentation(name, ...)` gives a DALI
augmentation that takes a signed level, maps it through `timm_argument` and applies the operation
PIL applies, implemented with DALI operators (tested against timm pixel by pixel):
  - geometric operations are one affine warp with PIL's destination→source matrix; the image is
    first padded with a 1-pixel border of the fill colour, because DALI fills with one value for
    all channels and timm fills with the per-channel ImageNet mean;
  - on CPU pipelines the warp, colour matrix, solarize(-add), contrast and autocontrast are numba
    kernels computing the same (pipelines/backends/dali/cpu_kernels.py): DALI's CPU operators are 2–7× slower;
  - DALI warps bilinearly; timm picks bilinear or bicubic at random per operation;
  - equalize follows OpenCV's lookup table (PIL's rounds a little differently); sharpness filters
    the 1-pixel border too (PIL leaves it as it was).
Every train image reaching AutoAugment is image_size × image_size (after RandomResizedCrop), so the
warp matrices are computed in numpy per level, once, when the pipeline is built.
"""
from __future__ import annotations

import math

import numpy as np
from nvidia.dali import fn, types
from nvidia.dali.auto_aug import augmentations as dali_ops
from nvidia.dali.auto_aug.core import _Augmentation, augmentation
from nvidia.dali.pipeline import do_not_convert

from pipelines.backends.dali import cpu_kernels as dali_cpu_kernels

LEVEL_DENOM = 10  # timm's _LEVEL_DENOM: level 10 is an operation's full strength


def _enhance(level, _hparams):
    return level / LEVEL_DENOM * 1.8 + 0.1


def _enhance_increasing(level, _hparams):
    return max(0.1, 1.0 + level / LEVEL_DENOM * 0.9)


def _posterize(level, _hparams):
    return int(level / LEVEL_DENOM * 4)


def _solarize(level, _hparams):
    return min(256, int(level / LEVEL_DENOM * 256))


# timm operation name → (argument of a *signed* level, whether timm negates the level at random).
TIMM_ARGUMENT = {
    "AutoContrast": (None, False),
    "Equalize": (None, False),
    "Invert": (None, False),
    "Rotate": (lambda level, _: level / LEVEL_DENOM * 30.0, True),
    "Posterize": (_posterize, False),
    "PosterizeIncreasing": (lambda level, h: 4 - _posterize(level, h), False),
    "PosterizeOriginal": (lambda level, h: _posterize(level, h) + 4, False),
    "Solarize": (_solarize, False),
    "SolarizeIncreasing": (lambda level, h: 256 - _solarize(level, h), False),
    "SolarizeAdd": (lambda level, _: min(128, int(level / LEVEL_DENOM * 110)), False),
    "Color": (_enhance, False),
    "ColorIncreasing": (_enhance_increasing, True),
    "Contrast": (_enhance, False),
    "ContrastIncreasing": (_enhance_increasing, True),
    "Brightness": (_enhance, False),
    "BrightnessIncreasing": (_enhance_increasing, True),
    "Sharpness": (_enhance, False),
    "SharpnessIncreasing": (_enhance_increasing, True),
    "ShearX": (lambda level, _: level / LEVEL_DENOM * 0.3, True),
    "ShearY": (lambda level, _: level / LEVEL_DENOM * 0.3, True),
    "TranslateX": (lambda level, h: level / LEVEL_DENOM * float(h["translate_const"]), True),
    "TranslateY": (lambda level, h: level / LEVEL_DENOM * float(h["translate_const"]), True),
    "TranslateXRel": (lambda level, h: level / LEVEL_DENOM * h.get("translate_pct", 0.45), True),
    "TranslateYRel": (lambda level, h: level / LEVEL_DENOM * h.get("translate_pct", 0.45), True),
}


def timm_argument(name: str, signed_level: float, hparams: dict):
    """The argument timm's PIL operation `name` gets for a level (negative: timm negated it)."""
    level_to_argument = TIMM_ARGUMENT[name][0]
    return None if level_to_argument is None else level_to_argument(signed_level, hparams)


# ---------------------------------------------------------------------------------------------
# Parameters: what each DALI operation takes, from timm's argument.

def affine_matrix(name: str, argument: float, size: int) -> np.ndarray:
    """PIL's destination→source matrix for the operation, shifted by the 1-pixel fill border."""
    if name == "Rotate":  # PIL's Image.rotate: counter-clockwise about the centre
        angle, centre = -math.radians(argument), size / 2
        cos, sin = math.cos(angle), math.sin(angle)
        matrix = [[cos, sin, centre - cos * centre - sin * centre],
                  [-sin, cos, centre + sin * centre - cos * centre]]
    else:
        pixels = argument * size if name.endswith("Rel") else argument
        matrix = {"ShearX": [[1, argument, 0], [0, 1, 0]], "ShearY": [[1, 0, 0], [argument, 1, 0]],
                  "TranslateX": [[1, 0, pixels], [0, 1, 0]], "TranslateXRel": [[1, 0, pixels], [0, 1, 0]],
                  "TranslateY": [[1, 0, 0], [0, 1, pixels]], "TranslateYRel": [[1, 0, 0], [0, 1, pixels]],
                  }[name]
    matrix = np.array(matrix, dtype=np.float32)
    matrix[:, 2] += 1  # source coordinates inside the padded image
    return matrix


def sharpness_kernel(factor: float) -> np.ndarray:
    """PIL's ImageEnhance.Sharpness as one filter: blend of its smoothing kernel and the image."""
    smooth = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], dtype=np.float32) / 13
    identity = np.zeros((3, 3), dtype=np.float32)
    identity[1, 1] = 1
    return ((1 - factor) * smooth + factor * identity).astype(np.float32)


def posterize_mask(bits: int) -> np.ndarray:
    """PIL's ImageOps.posterize keeps the `bits` most significant bits (timm: 8 or more keeps all)."""
    bits = min(int(bits), 8)
    return np.array(0xFF ^ (2 ** (8 - bits) - 1), dtype=np.uint8)


# ---------------------------------------------------------------------------------------------
# Operations. GPU pipelines run DALI's operators (`*_with_dali`, DALI's suite where it has PIL's
# form); CPU pipelines run numba kernels computing the same where DALI's CPU operators are slow.

@augmentation
def warp(data, matrix, *, size, fill):
    if data.device == "cpu":
        return dali_cpu_kernels.run("warp", data, matrix, types.Constant(np.asarray(fill, dtype=np.uint8)))
    return warp_with_dali(data, matrix, size, fill)


def warp_with_dali(data, matrix, size, fill):
    padded = fn.crop(data, crop=(size + 2, size + 2), out_of_bounds_policy="pad", fill_values=fill)
    return fn.warp_affine(padded, matrix=matrix, size=(size, size), inverse_map=True,  # dst→src, like PIL
                          interp_type=types.INTERP_LINEAR)  # no fill_value: clamps to the border


def transform_colours_with_dali(data, matrix):
    """A per-pixel colour matrix (PIL's Color blend is one), rounded and saturated to uint8."""
    return fn.coord_transform(data, M=matrix, dtype=types.UINT8)


def colour_blend_matrix(factor: float) -> np.ndarray:
    """PIL's ImageEnhance.Color as a matrix: blend of the image and its ITU-R 601-2 luma grey."""
    luma = np.array([0.299, 0.587, 0.114])
    return (factor * np.eye(3) + (1 - factor) * np.outer(np.ones(3), luma)).astype(np.float32)


def solarize_with_dali(data, threshold):
    """PIL's ImageOps.solarize: invert pixels ≥ threshold (x ^ 255 == 255 - x for uint8)."""
    return data ^ ((data >= threshold) * types.Constant(255, dtype=types.UINT8))


def kernel_on_cpu(kernel: str, with_dali, param_device: str = "cpu"):
    """An augmentation running dali_cpu_kernels' `kernel` on CPU images, `with_dali` on GPU ones."""
    def apply(data, parameter):
        if data.device == "cpu":
            return dali_cpu_kernels.run(kernel, data, *(() if parameter is None else (parameter,)))
        return with_dali(data, parameter)
    return augmentation(apply, param_device=param_device)


color_matrix = kernel_on_cpu("colour_matrix", transform_colours_with_dali)
solarize = kernel_on_cpu("solarize", solarize_with_dali, param_device="auto")
solarize_add = kernel_on_cpu("solarize_add", dali_ops.solarize_add.op, dali_ops.solarize_add.param_device)
contrast = kernel_on_cpu("contrast", dali_ops.contrast.op, dali_ops.contrast.param_device)
auto_contrast = kernel_on_cpu("auto_contrast", dali_ops.auto_contrast.op)


@augmentation
def equalize(data, _):
    return fn.equalize(data)  # OpenCV's lookup table (DALI's suite still calls the deprecated alias)


@augmentation(param_device="auto")
def sharpness(data, kernel):
    return fn.filter(data, kernel)  # DALI's suite's op, without the deprecated alias


def _parameter(name: str, size: int):
    """(DALI augmentation, argument → its parameter) for a timm operation name."""
    if name in ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY", "TranslateXRel", "TranslateYRel"):
        return warp, lambda argument: affine_matrix(name, argument, size)
    if name.startswith("Posterize"):
        return dali_ops.posterize, posterize_mask
    if name.startswith("Solarize"):
        if name == "SolarizeAdd":
            return solarize_add, lambda add: np.uint8(add)
        return solarize, lambda threshold: np.int32(threshold)
    if name.startswith("Sharpness"):
        return sharpness, sharpness_kernel
    if name.startswith("Color"):
        return color_matrix, colour_blend_matrix
    enhance = {"Contrast": contrast, "Brightness": dali_ops.brightness}
    for prefix, op in enhance.items():
        if name.startswith(prefix):
            return op, lambda factor: np.float32(factor)
    return {"AutoContrast": auto_contrast, "Equalize": equalize,
            "Invert": dali_ops.invert}[name], None


class TabulatedAugmentation(_Augmentation):
    """DALI's augmentation, its table of parameters (one per level bin, 1,000 or more) computed
    outside autograph: converted, every bin costs a converted call, ~20 s per RandAugment pipeline."""

    @do_not_convert
    def _map_mags_to_params(self, magnitudes):
        return super()._map_mags_to_params(magnitudes)


@do_not_convert  # builds no graph, and the lambda below must stay plain Python too
def dali_augmentation(name: str, hparams: dict, levels: np.ndarray, size: int):
    """The DALI augmentation for timm operation `name`, with `levels` as its magnitude bins."""
    base, to_parameter = _parameter(name, size)
    if to_parameter is None:  # no magnitude
        return base.augmentation(name=name)
    # param_device stays the operation's own: "auto" (beside the images) where arithmetic or a
    # filter uses the parameter, CPU for operator arguments
    mag_to_param = do_not_convert(lambda level: to_parameter(timm_argument(name, level, hparams)))
    return base.augmentation(mag_range=levels, randomly_negate=TIMM_ARGUMENT[name][1], name=name,
                             mag_to_param=mag_to_param, augmentation_cls=TabulatedAugmentation)
