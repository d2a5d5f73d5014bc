"""The ImageFolder walk all backends share: symlink loops and second paths count each file once."""
from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import pytest

from pipelines.sources.folder.listing import find_classes, list_image_folder
from pipelines.loading import build_loader


@pytest.fixture
def looped_folder(digits_root, tmp_path) -> Path:
    """30 real digit images in classes 0, 1, 2, plus links a user could leave behind."""
    root = tmp_path / "looped"
    for name in ("0", "1", "2"):
        (root / name).mkdir(parents=True)
        for image in sorted((digits_root / "train" / name).iterdir())[:10]:
            shutil.copy(image, root / name / image.name)
    os.symlink(".", root / "1" / "self")  # a loop: 1/self/self/self/...
    os.symlink("..", root / "1" / "up")  # the whole set again, under class 1
    os.symlink("../0", root / "2" / "zeros")  # another class's folder
    first_zero = sorted((root / "0").iterdir())[0]
    os.symlink(first_zero, root / "2" / "a_zero.png")  # another class's file
    outside = tmp_path / "extra"
    outside.mkdir()
    shutil.copy(first_zero, outside / "extra.png")
    os.symlink(outside, root / "2" / "more")  # a folder outside: followed once, its image counts
    os.symlink(tmp_path / "gone.png", root / "2" / "broken.png")
    return root


def test_each_real_file_is_listed_once_under_its_own_class(looped_folder):
    listing = list_image_folder(looped_folder)
    assert listing.classes == ["0", "1", "2"]
    real = [Path(path).resolve() for path, _ in listing.files]
    assert len(real) == len(set(real)) == 31  # 30 + the one reached through a link to an outside folder
    labels = {Path(path).parent.name if Path(path).parent.name != "more" else "2": label
              for path, label in listing.files}
    assert labels == {"0": 0, "1": 1, "2": 2}
    assert [label for _, label in listing.files] == sorted(label for _, label in listing.files)
    skipped = {Path(path).name: reason for path, reason in listing.skipped}
    assert set(skipped) == {"self", "up", "zeros", "a_zero.png", "broken.png"}
    assert "already listed" in skipped["self"] and "same file as" in skipped["a_zero.png"]


def test_every_backend_sees_the_same_files_in_the_same_order(looped_folder, demo_cfg, capsys):
    cfg = demo_cfg("data.dataset=imagefolder", f"data.root={looped_folder.parent}", f"data.val_dir={looped_folder.name}",
                   "batch_size=8")
    loaders = {"torchvision": build_loader(cfg, "val")}
    if importlib.util.find_spec("nvidia") and importlib.util.find_spec("nvidia.dali"):
        cfg.loader = "dali"
        loaders["dali"] = build_loader(cfg, "val")
    assert "5 entries skipped" in capsys.readouterr().out
    expected = [path for path, _ in list_image_folder(looped_folder).images()]
    assert [path for path, _ in loaders["torchvision"].dataset.samples] == expected
    if "dali" in loaders:
        assert loaders["dali"].files == expected
    for loader in loaders.values():
        assert loader.num_samples == 31 and sum(len(labels) for _, labels in loader) == 31


def test_a_file_given_as_folder_is_named_as_such(looped_folder):
    with pytest.raises(FileNotFoundError, match="is a file, not a folder"):
        find_classes(next((looped_folder / "0").iterdir()))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_classes(looped_folder / "nowhere")
