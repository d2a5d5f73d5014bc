"""One folder, every image format the walk accepts (torchvision's IMG_EXTENSIONS) in the modes users'
files come in: every backend gives the same classes and, at the val transform, the same pixels.
A file DALI cannot decode (1-bit, 32-bit integer TIFF) is reported by name, not decoded differently.

    pytest -q tests/test_same_pixels.py           # ~40 s on 2 cores
"""
from __future__ import annotations

import importlib.util
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as photos

from pipelines.sources.image_decode import open_rgb
from pipelines.loading import build_loader, prepare_dataset

HAVE_DALI = importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None
HAVE_FFCV = importlib.util.find_spec("ffcv") is not None
SIZE = 40  # square: the val transform (resize to 40, center crop 36) then moves no pixel
DALI_CANNOT = {"other/bilevel.tif", "other/int32.tif"}


def png16(path: Path, pixels: np.ndarray) -> None:
    """A 16-bit RGB PNG (PIL cannot write one)."""
    height, width, _ = pixels.shape
    raw = b"".join(b"\0" + row.astype(">u2").tobytes() for row in pixels)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def formats(tmp_path_factory) -> Path:
    """<root>/val/{jpeg,png,other}/...: 40×40 crops of a photo in every format and mode."""
    root = tmp_path_factory.mktemp("formats")
    rgb = np.asarray(Image.fromarray(photos.chelsea()).resize((SIZE, SIZE), Image.BILINEAR))
    gray = np.asarray(Image.fromarray(rgb).convert("L"))
    alpha = np.linspace(0, 255, SIZE, dtype=np.uint8)[None].repeat(SIZE, 0)
    mid_grey_16 = np.full((SIZE, SIZE), 32768, np.uint16)  # 16-bit mid-grey: 128, not PIL's clipped 255
    rotated = Image.fromarray(rgb[:, ::-1].copy())
    exif = rotated.getexif()
    exif[0x0112] = 6  # EXIF orientation: rotate 90° on display, as DALI does
    files = {
        "jpeg/rgb.jpg": Image.fromarray(rgb), "jpeg/gray.jpeg": Image.fromarray(gray),
        "jpeg/cmyk.jpg": Image.fromarray(rgb).convert("CMYK"),
        "png/rgb.png": Image.fromarray(rgb), "png/gray.png": Image.fromarray(gray),
        "png/gray16.png": Image.fromarray(mid_grey_16), "png/rgba.png": Image.fromarray(np.dstack([rgb, alpha])),
        "png/la.png": Image.fromarray(np.dstack([gray, alpha]), "LA"),
        "png/palette.png": Image.fromarray(rgb).convert("P"),
        "png/bilevel.png": Image.fromarray(gray > 128),
        "other/rgb.ppm": Image.fromarray(rgb), "other/gray.pgm": Image.fromarray(gray),
        "other/gray16.pgm": Image.fromarray((gray.astype(np.uint16) * 257 + 100).astype(np.uint16)),
        "other/rgb.bmp": Image.fromarray(rgb), "other/palette.bmp": Image.fromarray(rgb).convert("P"),
        "other/rgb.tif": Image.fromarray(rgb), "other/gray16.tiff": Image.fromarray(gray.astype(np.uint16) * 200),
        "other/float.tif": Image.fromarray(gray.astype(np.float32) / 255),
        "other/cmyk.tif": Image.fromarray(rgb).convert("CMYK"),
        "other/rgb.webp": Image.fromarray(rgb), "other/rgba.webp": Image.fromarray(np.dstack([rgb, alpha])),
        "other/bilevel.tif": Image.fromarray(gray > 128),
        "other/int32.tif": Image.fromarray(gray.astype(np.int32) * 100),
    }
    for name, image in files.items():
        (root / "val" / name).parent.mkdir(parents=True, exist_ok=True)
        image.save(root / "val" / name, **({"quality": 95} if name.endswith((".jpg", ".jpeg")) else {}))
    transparent = Image.fromarray(rgb).convert("P")
    transparent.save(root / "val" / "png" / "palette_transparent.png", transparency=0)
    rotated.save(root / "val" / "jpeg" / "exif_rotated.jpg", exif=exif.tobytes(), quality=95)
    png16(root / "val" / "png" / "rgb16.png", rgb.astype(np.uint16) * 257)
    return root


def formats_cfg(demo_cfg, root: Path, loader: str):
    return demo_cfg(f"loader={loader}", "data.dataset=imagefolder", f"data.root={root}", "data.train_dir=val",
                    "data.image_size=36", "data.crop_ratio=0.9", "batch_size=8", "data.workers=0",
                    "data.dali.threads=1", "data.ffcv.write_mode=raw", "data.ffcv.max_resolution=0")


def val_epoch(loader):
    loader.set_epoch(0)
    batches = [(x.clone(), y.clone()) for x, y in loader]
    return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])


def test_the_decode_rule_gives_dalis_pixels_for_16_bit_float_and_rotated_files(formats):
    val = formats / "val"
    assert np.asarray(open_rgb(str(val / "png" / "gray16.png"))).mean() == 128  # PIL's convert("RGB"): 255
    with Image.open(val / "png" / "gray16.png") as image:
        assert np.asarray(image.convert("RGB")).mean() == 255  # the clipping the rule avoids
    np.testing.assert_array_equal(open_rgb(str(val / "png" / "rgb16.png")), open_rgb(str(val / "png" / "rgb.png")))
    float_grey = np.asarray(open_rgb(str(val / "other" / "float.tif")))
    np.testing.assert_array_equal(float_grey, np.asarray(open_rgb(str(val / "png" / "gray.png"))))
    rotated = np.asarray(open_rgb(str(val / "jpeg" / "exif_rotated.jpg"))).astype(int)
    upright = np.asarray(open_rgb(str(val / "jpeg" / "rgb.jpg"))).astype(int)
    assert np.abs(np.rot90(rotated[:, ::-1], k=1) - upright).mean() > 20  # it was turned, and not just mirrored
    assert np.abs(np.rot90(rotated, k=1)[:, ::-1] - upright).mean() < 3


@pytest.mark.skipif(not (HAVE_DALI and HAVE_FFCV), reason="needs DALI and FFCV")
def test_every_backend_gives_the_same_classes_and_pixels(formats, demo_cfg, capsys):
    images, labels, left_out = {}, {}, {}
    for loader in ("torchvision", "dali", "ffcv"):
        cfg = formats_cfg(demo_cfg, formats, loader)
        prepare_dataset(cfg)
        val = build_loader(cfg, "val")
        assert val.classes == ["jpeg", "other", "png"]
        images[loader], labels[loader] = val_epoch(val)
        left_out[loader] = {str(Path(path).relative_to(formats / "val")) for path, _ in val.left_out}
    files = sorted(str(p.relative_to(formats / "val")) for p in (formats / "val").rglob("*.*"))
    assert len(images["torchvision"]) == len(files) == 26
    assert left_out == {"torchvision": set(), "dali": DALI_CANNOT, "ffcv": set()}
    output = capsys.readouterr().out
    assert all(f"{formats / 'val' / name} does not decode (DALI cannot decode it" in output for name in DALI_CANNOT)

    for loader in ("dali", "ffcv"):
        assert torch.equal(labels[loader], labels["torchvision"])
        for index, name in enumerate(files):
            if loader == "dali" and name in DALI_CANNOT:  # reported above; the next image stands in
                assert torch.equal(images[loader][index], images["torchvision"][index + 1]), name
                continue
            difference = (images[loader][index].int() - images["torchvision"][index].int()).abs()
            assert difference.max() <= 1, f"{loader} {name}: {difference.max()}"  # decoder rounding at most
    grey16 = files.index("png/gray16.png")
    assert all(images[loader][grey16].float().mean() == 128 for loader in images)
