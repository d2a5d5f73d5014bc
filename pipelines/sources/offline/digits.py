"""The embedded demo data set: scikit-learn's handwritten digits as an RGB ImageFolder.

load_digits() ships inside scikit-learn (1,797 real 8×8 scans, 10 classes), so the demo needs no
download. Images are upscaled to `size` px PNGs under root/train/<digit>/ and root/val/<digit>/
with a stratified, seeded split. The folder is built once (atomically: a temp folder renamed into
place) and reused while it exists.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image


def build_digits_imagefolder(root: str | Path, *, size: int = 32, val_fraction: float = 0.2,
                             seed: int = 0) -> Path:
    root = Path(root)
    if (root / "train").is_dir() and (root / "val").is_dir():
        return root
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    indices = np.arange(len(pixels))
    train_idx, val_idx = train_test_split(indices, test_size=val_fraction, random_state=seed,
                                          stratify=digits.target)
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        for split, split_idx in (("train", train_idx), ("val", val_idx)):
            for i in split_idx:
                folder = staging / split / str(digits.target[i])
                folder.mkdir(parents=True, exist_ok=True)
                image = Image.fromarray(pixels[i], mode="L").resize((size, size), Image.BICUBIC)
                image.convert("RGB").save(folder / f"{i:04d}.png")
        try:
            staging.rename(root)
        except OSError:  # another process finished first: keep theirs
            if not (root / "val").is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root
