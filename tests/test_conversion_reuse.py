"""Converters and loaders share one image check, cached by the folder's contents: an image that a
run, tools/check_images.py or another conversion checked is not decoded again to be checked, so a
conversion decodes it once, to write it. And loader=ffcv reads its .beton alone: its classes and
what it left out come from the .beton's side, not from the source folder."""
from __future__ import annotations

import importlib.util
import json
import shutil

import pytest

import pipelines.sources.folder.image_check as image_check
import pipelines.sources.folder.listing_cache as listing_cache
from conftest import photo_folder, spoil
from pipelines.loading import build_loader
from pipelines.sources.folder.image_check import check_images
from pipelines.sources.folder.listing import list_image_folder
from pipelines.writers.shards import convert_folder

HAVE_FFCV = importlib.util.find_spec("ffcv") is not None


@pytest.fixture
def decodes(monkeypatch):
    """The paths the image check decodes (in this process: fewer than 64 files)."""
    decoded, decode = [], image_check.decode_problem
    monkeypatch.setattr(image_check, "decode_problem", lambda path: decoded.append(path) or decode(path))
    return decoded


def test_a_checked_folder_is_not_decoded_again_to_be_converted_to_shards(tmp_path, decodes):
    root = photo_folder(tmp_path / "data", {"train": 4})
    bad = spoil(root / "train")
    left_out = check_images(list_image_folder(root / "train"))  # what a run with loader=torchvision does first
    assert len(decodes) == 14
    decodes.clear()
    summary = convert_folder(root / "train", tmp_path / "shards", split="train", workers=1)
    assert decodes == [] and (summary["written"], summary["skipped"]) == (11, 3)
    skipped = (tmp_path / "shards" / "train.skipped.txt").read_text()
    assert all(f"{path}\t{reason}" in skipped for path, reason in left_out) and len(left_out) == len(bad)

    again = photo_folder(tmp_path / "other", {"train": 4})
    convert_folder(again / "train", tmp_path / "other-shards", split="train", workers=1)
    assert len(decodes) == 12  # a conversion checks a new folder once...
    decodes.clear()
    assert check_images(list_image_folder(again / "train")) == [] and decodes == []  # ...for the loaders too


@pytest.mark.skipif(not HAVE_FFCV, reason="no FFCV")
def test_a_checked_folder_is_decoded_once_to_be_written_to_a_beton(tmp_path, decodes):
    from pipelines.writers.beton import convert_imagefolder
    from pipelines.writers.beton_storage import StorageSettings

    root = photo_folder(tmp_path / "data", {"train": 4})
    spoil(root / "train")
    check_images(list_image_folder(root / "train"))
    decodes.clear()
    summary = convert_imagefolder(root / "train", tmp_path / "train.beton", StorageSettings(max_resolution=32),
                                  workers=1)
    assert decodes == [] and (summary["written"], summary["skipped"]) == (11, 3)  # the writer's decode alone


@pytest.mark.skipif(not HAVE_FFCV, reason="no FFCV")
def test_ffcv_reads_classes_and_left_out_from_the_beton_not_the_folder(demo_cfg, tmp_path, monkeypatch):
    from pipelines.writers.beton import convert_imagefolder
    from pipelines.writers.beton_storage import StorageSettings

    root = photo_folder(tmp_path / "data", {"train": 4, "val": 2})
    bad = spoil(root / "train")
    betons = {split: tmp_path / "betons" / f"{split}.beton" for split in ("train", "val")}
    for split, beton in betons.items():
        convert_imagefolder(root / split, beton, StorageSettings(max_resolution=32), workers=1)
    shutil.move(root, tmp_path / "elsewhere")  # the source is gone
    monkeypatch.setattr(listing_cache, "list_image_folder", lambda folder: pytest.fail(f"walked {folder}"))
    cfg = demo_cfg("loader=ffcv", "data.dataset=imagefolder", f"data.root={root}", "data.image_size=16",
                   "batch_size=4", "data.workers=1", f"data.ffcv.train_beton={betons['train']}",
                   f"data.ffcv.val_beton={betons['val']}")
    train = build_loader(cfg, "train")
    assert train.classes == ["astronaut", "cat", "coffee"] == json.loads(betons["train"].with_name(
        "train.beton.json").read_text())["classes"]
    assert {path for path, _ in train.left_out} == set(bad) and train.sampler.n == 11
    train.set_epoch(0)
    assert sum(len(labels) for _, labels in train) == 8  # two whole batches of 4
