"""tools/convert_ffcv.py on a folder full of the files that break conversions, and on bad sources."""
from __future__ import annotations

import io
import json
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("ffcv")
skimage_data = pytest.importorskip("skimage.data")

from conftest import tool_in_process  # noqa: E402


def convert(*args):
    return tool_in_process("convert_ffcv.py", *args)


def save_jpeg(pixels: np.ndarray, path: Path, mode: str | None = None) -> bytes:
    image = Image.fromarray(pixels)
    buffer = io.BytesIO()
    (image.convert(mode) if mode else image).save(buffer, "JPEG", quality=90)
    path.write_bytes(buffer.getvalue())
    return buffer.getvalue()


def build_nasty_folder(root: Path) -> tuple[dict, dict]:
    """Every kind of bad input beside good ones. Returns ({good file: class index}, {bad file: reason
    word}); NON_IMAGES are there too."""
    astronaut, coffee, chelsea = skimage_data.astronaut(), skimage_data.coffee(), skimage_data.chelsea()
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
    save_jpeg(chelsea, root / "cat/plain.jpg")
    save_jpeg(coffee, root / "cat/café au lait ü.jpg")  # unicode and spaces in the name
    save_jpeg(astronaut, root / "cat/cmyk.jpg", mode="CMYK")
    whole = save_jpeg(astronaut, root / "cat/truncated.jpg")
    (root / "cat/truncated.jpg").write_bytes(whole[:len(whole) * 2 // 3])
    (root / "cat/empty.jpg").write_bytes(b"")
    (root / "cat/notes.jpg").write_text("a text file with an image name\n")
    (root / "cat/README.txt").write_text("a stray file\n")
    save_jpeg(skimage_data.camera(), root / "dog/gray.jpg")  # single-channel JPEG
    save_jpeg(np.asarray(Image.fromarray(astronaut).resize((6000, 4000))), root / "dog/big.jpg")
    Image.fromarray(astronaut[:3, :3]).save(root / "dog/tiny.png")  # 3×3 px
    Image.fromarray(np.tile(coffee[:4, :1], (1, 4000, 1))).save(root / "dog/sliver.png")  # 4000×4 → 500×0
    alpha = np.linspace(0, 255, coffee.shape[1], dtype=np.uint8)[None].repeat(coffee.shape[0], 0)
    Image.fromarray(np.dstack([coffee, alpha]), "RGBA").save(root / "dog/alpha.png")
    Image.fromarray(chelsea).convert("P").save(root / "dog/palette.png")
    Image.fromarray(chelsea).convert("P").save(root / "dog/palette.gif")  # no loader reads .gif: not converted
    (root / "dog/.DS_Store").write_bytes(b"\0\0\0\1Bud1")
    good = {"cat/plain.jpg": 0, "cat/café au lait ü.jpg": 0, "cat/cmyk.jpg": 0, "dog/gray.jpg": 1,
            "dog/big.jpg": 1, "dog/alpha.png": 1, "dog/palette.png": 1}
    bad = {"cat/truncated.jpg": "truncated", "cat/empty.jpg": "empty", "cat/notes.jpg": "identify",
           "dog/tiny.png": "too small", "dog/sliver.png": "too small"}
    return good, bad


NON_IMAGES = ["cat/README.txt", "dog/.DS_Store", "dog/palette.gif"]


@pytest.fixture(scope="module")
def nasty_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("nasty") / "src"
    return root, *build_nasty_folder(root)


def read_beton(beton: Path):
    """All (image, label) pairs of a .beton, in file order, through ffcv's own loader."""
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import CenterCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import ToTensor

    loader = Loader(str(beton), batch_size=4, num_workers=1, order=OrderOption.SEQUENTIAL, drop_last=False,
                    pipelines={"image": [CenterCropRGBImageDecoder((32, 32), ratio=1.0), ToTensor()],
                               "label": [IntDecoder(), ToTensor()]})
    images, labels = [], []
    for x, y in loader:
        images.append(x.clone())
        labels += y.flatten().tolist()
    return np.concatenate(images), labels


def test_nasty_folder_keeps_every_good_image_and_reports_every_bad_one(nasty_folder, tmp_path):
    src, good, bad = nasty_folder
    out = tmp_path / "out" / "nasty.beton"
    result = convert(src, out, "--max-resolution", 500, "--workers", 2, "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert (summary["found"], summary["written"], summary["skipped"], summary["non_images"]) == (
        len(good) + len(bad) + len(NON_IMAGES), len(good), len(bad), len(NON_IMAGES))
    assert "3 files without an image extension ignored" in result.stdout

    skipped = dict(line.split("\t") for line in Path(f"{out}.skipped.txt").read_text().splitlines())
    assert {str(Path(p).relative_to(src)) for p in skipped} == set(bad) | set(NON_IMAGES)
    for name, word in bad.items():
        assert word in skipped[str(src / name)], skipped
    assert all("no image extension" in skipped[str(src / name)] for name in NON_IMAGES)
    metadata = json.loads(Path(f"{out}.json").read_text())
    assert metadata["classes"] == ["cat", "dog"]  # sorted folder names
    assert {str(Path(p).relative_to(src)) for p, _ in metadata["left_out"]} == set(bad)  # what the loader reports

    images, labels = read_beton(out)
    assert Counter(labels) == Counter(good.values())
    assert images.shape[1:] == (32, 32, 3) and images.std() > 10  # real pixels, not placeholders
    from ffcv.reader import Reader
    sizes = Reader(str(out)).metadata["f0"]
    assert sizes["width"].max() <= 500 and sizes["height"].max() <= 500  # the 6000×4000 one was capped
    assert sorted(p.name for p in out.parent.iterdir()) == ["nasty.beton", "nasty.beton.json", "nasty.beton.skipped.txt"]


def test_limit_takes_a_spread_subset(nasty_folder, tmp_path):
    result = convert(nasty_folder[0], tmp_path / "few.beton", "--limit", 4, "--json")
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["written"] + summary["skipped"] == 4


@pytest.mark.parametrize("case", ["missing", "empty", "only_empty_classes", "no_images"])
def test_bad_source_is_a_clear_error_and_writes_nothing(tmp_path, case):
    src = tmp_path / "src"
    if case != "missing":
        src.mkdir()
    if case in ("only_empty_classes", "no_images"):
        (src / "a").mkdir()
        (src / "b").mkdir()
    if case == "no_images":
        (src / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    out = tmp_path / "out" / "x.beton"
    result = convert(src, out)
    assert result.returncode == 2
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: ") and str(src) in last_line
    assert "Traceback" not in result.stderr
    assert not out.parent.exists() or not any(out.parent.iterdir())


def test_bad_setting_is_a_clear_error(nasty_folder, tmp_path):
    result = convert(nasty_folder[0], tmp_path / "x.beton", "--jpeg-quality", 0)
    assert result.returncode == 2 and "JPEG quality" in result.stderr
    assert not any(tmp_path.iterdir())


def test_symlink_loops_convert_each_real_image_once(nasty_folder, tmp_path):
    src = tmp_path / "looped"
    shutil.copytree(nasty_folder[0], src)
    os.symlink(".", src / "cat" / "self")  # torchvision's walk would follow it until the path is too long
    os.symlink("..", src / "dog" / "up")
    out = tmp_path / "looped.beton"
    result = convert(src, out, "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    good, bad = nasty_folder[1:]
    assert (summary["found"], summary["written"], summary["duplicates"]) == (len(good) + len(bad) + len(NON_IMAGES),
                                                                             len(good), 2)
    listed = dict(line.split("\t") for line in Path(f"{out}.skipped.txt").read_text().splitlines())
    assert "already listed" in listed[str(src / "cat" / "self")] and str(src / "dog" / "up") in listed
    assert "2 duplicate paths (symlinks) ignored" in result.stdout


@pytest.mark.parametrize("case", ["inside_source", "folder", "exists"])
def test_output_that_would_destroy_something_is_refused_before_writing(nasty_folder, tmp_path, case):
    src = tmp_path / "src"
    shutil.copytree(nasty_folder[0], src)
    out = {"inside_source": src / "cat" / "plain.jpg", "folder": tmp_path / "existing",
           "exists": tmp_path / "old.beton"}[case]
    if case == "folder":
        out.mkdir()
    if case == "exists":
        out.write_bytes(b"an earlier conversion")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    result = convert(src, out)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert {"inside_source": "inside the input", "folder": "is a folder", "exists": "--overwrite"}[case] in result.stderr
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before  # nothing written or changed
    if case == "exists":
        assert convert(src, out, "--overwrite").returncode == 0
