"""How a .beton stores its images (ffcv-imagenet's writer options), checked before any work: what
the FFCV converter takes and loader=ffcv's options (cfg.data.ffcv) default to."""
from __future__ import annotations

from dataclasses import dataclass

from pipelines.writers.conversion import ConversionError

WRITE_MODES = ("raw", "jpg", "smart", "proportion")
MAX_STORED_SIDE = 65_535  # .beton keeps width and height as uint16


@dataclass
class StorageSettings:
    """How images are stored (ffcv-imagenet's writer options). Defaults: ffcv-imagenet's ResNet-50 set."""
    max_resolution: int = 500  # longer side cap in px (0 = keep); the loader crops from this
    write_mode: str = "proportion"  # raw | jpg | smart | proportion
    compress_probability: float = 0.5  # proportion: share of images stored as JPEG (rest raw)
    jpeg_quality: int = 90
    smart_threshold: int = 256 * 256 * 3  # smart: images with more raw bytes than this go JPEG
    min_side: int = 8  # shorter stored side below this → skipped (crops of 0 px crash the decoder)

    def check(self) -> None:
        problems = [
            (self.write_mode in WRITE_MODES, f"write mode {self.write_mode!r} is not one of {WRITE_MODES}"),
            (0 <= self.compress_probability <= 1, f"compress probability {self.compress_probability} is not in [0, 1]"),
            (1 <= self.jpeg_quality <= 100, f"JPEG quality {self.jpeg_quality} is not in [1, 100]"),
            (self.max_resolution == 0 or self.max_resolution >= self.min_side,
             f"max resolution {self.max_resolution} is below the minimum side {self.min_side}"),
            (self.min_side >= 1, f"minimum side {self.min_side} must be ≥ 1"),
        ]
        for ok, problem in problems:
            if not ok:
                raise ConversionError(problem)


def stored_size(width: int, height: int, max_resolution: int) -> tuple[int, int]:
    """(width, height) after ffcv's resizer (longer side capped at max_resolution, truncating)."""
    if not max_resolution or max(width, height) <= max_resolution:
        return width, height
    ratio = max_resolution / max(width, height)
    return int(ratio * width), int(ratio * height)


def storage_problem(width: int, height: int, settings: StorageSettings) -> str:
    """'' for an image of this size that a .beton can store, else why not."""
    width, height = stored_size(width, height, settings.max_resolution)
    if max(width, height) > MAX_STORED_SIDE:
        return f"{width}×{height} px is too large for .beton (max {MAX_STORED_SIDE}); set a max resolution"
    if min(width, height) < settings.min_side:
        return f"too small: stored at {width}×{height} px, shorter side < {settings.min_side} px"
    return ""
