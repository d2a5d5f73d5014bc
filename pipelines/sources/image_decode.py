"""The one rule turning an image file into 8-bit RGB on the PIL paths (the torchvision loader, the
FFCV and shard writers and the up-front check), so they give the pixels DALI's decoder gives:

  16-bit grey (I;16, I;16B, I;16L, 16-bit PGM read as I)  round(v / 257), not PIL's clip at 255
  32-bit float (F)                                          round(v × 255) clipped to [0, 255]
  EXIF orientation                                          applied (DALI rotates; PIL would not)
  everything else (1, L, LA, P with transparency, RGBA,     PIL's convert("RGB"): alpha dropped,
  CMYK, YCbCr...)                                           palette expanded — what DALI does too
Measured against DALI 2.4's CPU decoder on every mode above (tests/test_same_pixels.py).
"""
from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps

from pipelines.sources.shards.member import image_file, image_file_size  # a path, or an image inside a tar shard

SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # "I": PIL reads 16-bit PGMs so


def to_rgb(image: Image.Image) -> Image.Image:
    """A new 8-bit RGB image from image (still open: it is loaded here) by the rule above."""
    ImageOps.exif_transpose(image, in_place=True)
    if image.mode in SIXTEEN_BIT_MODES:
        values = np.clip(np.asarray(image, dtype=np.int64), 0, 65535)
        image = Image.fromarray(((values + 128) // 257).astype(np.uint8))  # round(v / 257), exact
    elif image.mode == "F":
        image = Image.fromarray(np.clip(np.rint(np.asarray(image) * 255), 0, 255).astype(np.uint8))
    return image.convert("RGB")  # a copy even when RGB already: the file's image is closed after


def open_rgb(path: str) -> Image.Image:
    """The file at path, decoded to 8-bit RGB (torchvision's ImageFolder `loader`)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # palette transparency, large-image warnings
        with Image.open(path) as image:
            return to_rgb(image)


def decode_bytes(data: bytes) -> Image.Image:
    """An image file's bytes (a folder's file, a shard's sample), decoded to 8-bit RGB."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # palette transparency, large-image warnings
        with Image.open(io.BytesIO(data)) as image:
            return to_rgb(image)


def decode_problem(path: str) -> tuple[str, tuple[int, int]]:
    """('', (width, height)) for a file that decodes, else (the reason it does not, (0, 0))."""
    try:
        if image_file_size(path) == 0:
            return "empty file (0 bytes)", (0, 0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(image_file(path)) as image:
                size = image.size  # before a rotation: the longer and shorter sides are what count
                image.draft("RGB", (1, 1))  # JPEG: decode at 1/8 scale, still reads every byte
                to_rgb(image)
    except Image.DecompressionBombError as error:
        return f"too large to decode safely: {error}", (0, 0)
    except Exception as error:  # PIL raises many types for bad files; each is a reason, not a crash
        return f"not a readable image: {type(error).__name__}: {error}", (0, 0)
    return "", size
