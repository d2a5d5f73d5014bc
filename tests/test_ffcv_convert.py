"""tools/convert_ffcv.py on real photos and on a folder full of the files that break conversions."""
from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("ffcv")
skimage_data = pytest.importorskip("skimage.data")

REPO = Path(__file__).resolve().parents[1]


def convert(*args, check_rc=None):
    result = subprocess.run([sys.executable, str(REPO / "tools" / "convert_ffcv.py"), *map(str, args)],
                            capture_output=True, text=True, timeout=300)
    if check_rc is not None:
        assert result.returncode == check_rc, result.stdout + result.stderr
    return result


def jpeg_bytes(pixels: np.ndarray, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90, **options)
    return buffer.getvalue()


def build_nasty_folder(root: Path) -> tuple[dict, dict]:
    """An ImageFolder with every kind of bad input; returns ({good file: class}, {bad file: reason word})."""
    astronaut, coffee, chelsea = skimage_data.astronaut(), skimage_data.coffee(), skimage_data.chelsea()
    files = {
        "cat/plain.jpg": jpeg_bytes(chelsea),
        "cat/café au lait ü.jpg": jpeg_bytes(coffee),  # unicode and spaces in the name
        "cat/cmyk.jpg": jpeg_bytes(np.asarray(Image.fromarray(astronaut).convert("CMYK"))[..., :4]
                                   if False else astronaut, ),
        "cat/truncated.jpg": jpeg_bytes(astronaut)[:20_000],
        "cat/empty.jpg": b"",
        "cat/notes.jpg": b"this is a text file with an image name\n",
        "cat/README.txt": b"stray file\n",
        "dog/gray.jpg": jpeg_bytes(skimage_data.camera()),
        "dog/big.jpg": jpeg_bytes(np.asarray(Image.fromarray(astronaut).resize((6000, 4000)))),
        "dog/tiny.png": None,  # 3×3 px: below the minimum side
        "dog/sliver.png": None,  # 4000×4 px: 500×0 after the max-resolution cap
        "dog/alpha.png": None,
        "dog/palette.gif": None,
    }
    (root / "empty_class").mkdir(parents=True)
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        if content is not None:
            (root / name).write_bytes(content)
    buffer = io.BytesIO()
    Image.fromarray(astronaut).convert("CMYK").save(buffer, "JPEG", quality=90)
    (root / "cat/cmyk.jpg").write_bytes(buffer.getvalue())
    Image.fromarray(astronaut[:3, :3]).save(root / "dog/tiny.png")
    Image.fromarray(np.tile(coffee[:4, :1], (1, 4000, 1))).save(root / "dog/sliver.png")
    rgba = np.dstack([coffee, np.linspace(0, 255, coffee.shape[1], dtype=np.uint8)[None].repeat(coffee.shape[0], 0)])
    Image.fromarray(rgba, "RGBA").save(root / "dog/alpha.png")
    Image.fromarray(chelsea).convert("P").save(root / "dog/palette.gif")
    good = {"cat/plain.jpg": 1, "cat/café au lait ü.jpg": 1, "cat/cmyk.jpg": 1, "dog/gray.jpg": 2,
            "dog/big.jpg": 2, "dog/alpha.png": 2, "dog/palette.gif": 2}
    bad = {"cat/truncated.jpg": "truncated", "cat/empty.jpg": "empty", "cat/notes.jpg": "identify",
           "cat/README.txt": "identify", "dog/tiny.png": "too small", "dog/sliver.png": "too small"}
    return good, bad
