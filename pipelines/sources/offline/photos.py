"""A benchmark ImageFolder of real photo JPEGs at ImageNet-like size, built offline.

scikit-image ships a few real photos (astronaut, coffee, chelsea, rocket, ...). Each image here is
a random crop of one of them (area 25–100 %, aspect 3/4–4/3), possibly mirrored, resized so its
shorter side is 333–500 px (ImageNet's typical range) and saved as a quality-90 JPEG: many
distinct files whose decode cost is that of real photos. One class per source photo. Image i is a
function of (seed, i), so the set is deterministic and built by all cores at once; built once,
atomically (a temp folder renamed into place), then reused.

    python -c "from pipelines.sources.offline.photos import build_photo_imagefolder as b; print(b('data/photos'))"
"""
from __future__ import annotations

import functools
import multiprocessing
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

# Photos that ship inside scikit-image (no download); grayscale ones are stored as RGB.
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
          "retina", "stereo_motorcycle", "camera", "moon", "grass", "gravel", "brick", "coins", "clock")


@functools.lru_cache(maxsize=None)  # each worker decodes each photo once
def load_photo(name: str) -> np.ndarray:
    import skimage.data

    pixels = getattr(skimage.data, name)()
    if isinstance(pixels, tuple):  # stereo_motorcycle: (left, right, disparity)
        pixels = pixels[0]
    if pixels.ndim == 2:
        pixels = np.stack([pixels] * 3, axis=-1)
    return np.ascontiguousarray(pixels[..., :3])


def random_view(photo: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A random crop, maybe mirrored, resized to a shorter side of 333–500 px."""
    width, height = photo.size
    area = width * height * rng.uniform(0.25, 1.0)
    aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    crop_w = int(min(width, round(np.sqrt(area * aspect))))
    crop_h = int(min(height, round(np.sqrt(area / aspect))))
    left, top = rng.integers(0, width - crop_w + 1), rng.integers(0, height - crop_h + 1)
    view = photo.crop((left, top, left + crop_w, top + crop_h))
    if rng.random() < 0.5:
        view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    short = rng.integers(333, 501)
    scale = short / min(crop_w, crop_h)
    return view.resize((max(1, round(crop_w * scale)), max(1, round(crop_h * scale))), Image.BICUBIC)


def write_view(job: tuple[Path, int, int]) -> None:
    """Image `index` of the set: its photo, its view (seeded by (seed, index)), saved as JPEG."""
    folder, index, seed = job
    name = PHOTOS[index % len(PHOTOS)]
    photo = Image.fromarray(load_photo(name))
    (folder / name).mkdir(exist_ok=True)
    random_view(photo, np.random.default_rng([seed, index])).save(folder / name / f"{index:06d}.jpg", quality=90)


def build_photo_imagefolder(root: str | Path, *, count: int = 1800, seed: int = 0) -> Path:
    """root/<photo name>/<index>.jpg, `count` images spread evenly over the photos, made by all cores."""
    root = Path(root)
    if root.is_dir():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        for name in PHOTOS:
            (staging / name).mkdir()
        jobs = [(staging, index, seed) for index in range(count)]
        with multiprocessing.Pool() as pool:
            for _ in tqdm(pool.imap_unordered(write_view, jobs, chunksize=16), total=count,
                          desc=f"building {root.name}", unit="img"):
                pass
        try:
            staging.rename(root)
        except OSError:  # another process finished first: keep theirs
            if not root.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root
