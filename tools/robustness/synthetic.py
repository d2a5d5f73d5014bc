"""ImageNet-C corruptions synthesised on the fly (the `imagecorruptions` package), for data sets
that have no ImageNet-C, e.g. the digits demo.

    loader = CorruptedLoader(val_loader, "fog", severity=3, seed=0)

Images are corrupted after the val resize/crop, as ImageNet-C corrupted 224 × 224 center crops.
The corruption runs on the CPU in this process (about 3 ms per 32 px image on average over the 15
corruptions, 15 ms for glass blur / brightness). Each (corruption, severity, rank) seeds its own
noise, so a rerun gives the same numbers.

imagecorruptions 1.1.2 predates NumPy 2, scikit-image 0.19 and setuptools 81; `_imagecorruptions()`
patches the three names it needs inside that package only (nothing global is changed).
"""
from __future__ import annotations

import importlib
import os
import sys
import types
import zlib
from functools import lru_cache

import numpy as np
import torch

from tools.robustness.folders import LoaderWrapper


@lru_cache(maxsize=None)
def _imagecorruptions():
    """The `imagecorruptions` module, working with today's NumPy, scikit-image and setuptools."""
    if "pkg_resources" not in sys.modules:  # setuptools ≥ 81 has no pkg_resources
        try:
            importlib.import_module("pkg_resources")
        except ImportError:
            shim = types.ModuleType("pkg_resources")
            shim.resource_filename = lambda package, name: os.path.join(
                os.path.dirname(importlib.import_module(package).__file__), name)
            sys.modules["pkg_resources"] = shim
    import imagecorruptions
    from imagecorruptions import corruptions
    from skimage.filters import gaussian

    def gaussian_compat(image, sigma=1, multichannel=None, **kwargs):  # skimage ≥ 0.19: channel_axis
        if multichannel:
            kwargs["channel_axis"] = -1
        return gaussian(image, sigma=sigma, **kwargs)

    class NumpyCompat(types.ModuleType):  # NumPy 2 removed np.float_
        def __getattr__(self, name):
            return np.float64 if name == "float_" else getattr(np, name)

    corruptions.gaussian = gaussian_compat
    corruptions.np = NumpyCompat("numpy")
    return imagecorruptions


def corrupt_batch(images: torch.Tensor, corruption: str, severity: int) -> torch.Tensor:
    """uint8 NCHW (any device, any memory format) → corrupted uint8 NCHW, same device and format."""
    corrupt = _imagecorruptions().corrupt
    hwc = images.permute(0, 2, 3, 1).cpu().numpy()
    out = np.stack([corrupt(np.ascontiguousarray(image), corruption_name=corruption, severity=severity)
                    for image in hwc])
    result = torch.from_numpy(out).permute(0, 3, 1, 2).to(images.device)
    return result.contiguous(memory_format=torch.channels_last)


class CorruptedLoader(LoaderWrapper):
    """Another loader's batches, corrupted."""

    def __init__(self, loader, corruption: str, severity: int, *, seed: int = 0, rank: int = 0):
        super().__init__(loader)
        self.corruption, self.severity = corruption, severity
        self.seed = zlib.crc32(f"{seed}/{corruption}/{severity}/{rank}".encode())

    def __iter__(self):
        state = np.random.get_state()  # imagecorruptions draws from NumPy's global generator
        np.random.seed(self.seed)
        try:
            for images, labels in self.loader:
                yield corrupt_batch(images, self.corruption, self.severity), labels
        finally:
            np.random.set_state(state)
