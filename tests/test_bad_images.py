"""Bad files in a user's ImageFolder, on every loader: a truncated JPEG, a 0-byte file, a text file
named .jpg, stray notes.txt/.DS_Store, a file that breaks after it was checked. Each is named in
one line and counted; no run dies of one, and nothing is lost.

    pytest -q tests/test_bad_images.py            # ~20 s; with the real runs (slow) ~3 min on 2 cores
"""
from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from torchvision.datasets.folder import IMG_EXTENSIONS

import pipelines.sources.folder.image_check as image_check
from conftest import CLASSES, one_error_line, photo_folder, spoil, train_in_process
from pipelines.sources.folder.image_check import check_images, report_path
from pipelines.sources.folder.listing import EmptyClasses, list_image_folder
from pipelines.loading import build_loader, prepare_dataset
from train.model_loading import load_checkpoint_model

HAVE_DALI = importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None
HAVE_FFCV = importlib.util.find_spec("ffcv") is not None
FOLDER_LOADERS = ["torchvision", pytest.param("dali", marks=pytest.mark.skipif(not HAVE_DALI, reason="no DALI"))]
ALL_LOADERS = FOLDER_LOADERS + [pytest.param("ffcv", marks=pytest.mark.skipif(not HAVE_FFCV, reason="no FFCV"))]


def folder_cfg(demo_cfg, root: Path, loader: str, *overrides: str):
    return demo_cfg(f"loader={loader}", "data.dataset=imagefolder", f"data.root={root}", "data.image_size=32",
                    "data.crop_ratio=0.8", "batch_size=4", "data.workers=0", "data.dali.threads=1", *overrides)


def epoch(loader, epoch_number: int = 0):
    loader.set_epoch(epoch_number)
    batches = [(x.clone(), y.clone()) for x, y in loader]
    return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])


# ---------------------------------------------------------------------------------------------
# The check: once per folder contents, cached outside the folder

def test_check_names_each_bad_image_once_and_is_cached_by_the_folder_contents(tmp_path, monkeypatch):
    root = photo_folder(tmp_path / "data", {"train": 5})
    bad = spoil(root / "train")
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    listing = list_image_folder(root / "train")
    left_out = dict(check_images(listing))
    assert set(left_out) == set(bad) and all(word in left_out[path] for path, word in bad.items())
    report = report_path(listing)
    assert report.is_file() and root not in report.parents  # in the cache: data folders may be read-only
    assert dict(line.split("\t") for line in report.read_text().splitlines()[1:]) == left_out
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before  # nothing written into the data

    decoded, decode = [], image_check.decode_problem  # (fewer than 64 files: checked in this process)
    monkeypatch.setattr(image_check, "decode_problem", lambda path: decoded.append(path) or decode(path))
    assert dict(check_images(list_image_folder(root / "train"))) == left_out and decoded == []  # cached

    fixed = root / "train" / "cat" / "00.jpg"
    shutil.copy(root / "train" / "cat" / "01.jpg", fixed)
    (root / "train" / "coffee" / "new.jpg").write_bytes((root / "train" / "coffee" / "01.jpg").read_bytes())
    changed = list_image_folder(root / "train")
    assert changed.fingerprint() != listing.fingerprint()
    assert dict(check_images(changed)) == {path: reason for path, reason in left_out.items() if path != str(fixed)}
    # only the files not known to decode were decoded again: the fixed one, the new one, the bad ones
    assert sorted(decoded) == sorted([str(fixed), str(root / "train" / "coffee" / "new.jpg"),
                                      *(path for path in bad if path != str(fixed))])
    assert not report.exists()  # the report of the earlier contents is gone


@pytest.mark.parametrize("loader", FOLDER_LOADERS)
def test_a_folder_loader_leaves_bad_images_out_and_says_so_in_one_line_each(loader, demo_cfg, tmp_path, capsys):
    root = photo_folder(tmp_path / "data", {"train": 5, "val": 5})
    bad = spoil(root / "val")
    cfg = folder_cfg(demo_cfg, root, loader)
    prepare_dataset(cfg)
    val = build_loader(cfg, "val")
    images, labels = epoch(val)
    assert len(labels) == val.num_samples == 15 - 1  # 15 good JPEGs less the truncated one
    assert labels.tolist() == [0] * 5 + [1] * 4 + [2] * 5
    assert {path for path, _ in val.left_out} == set(bad)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert len(lines) == 2, lines
    assert "2 files without an image extension are not read (.DS_Store, notes.txt)" in lines[0]
    assert "3 images do not decode and are left out" in lines[1] and "empty file (0 bytes)" in lines[1]
    assert str(report_path(list_image_folder(root / "val"))) in lines[1]


@pytest.mark.parametrize("loader", FOLDER_LOADERS)
def test_an_image_that_breaks_mid_run_is_replaced_by_the_next_one_and_reported(loader, demo_cfg, tmp_path, capsys):
    root = photo_folder(tmp_path / "data", {"train": 6, "val": 6})
    cfg = folder_cfg(demo_cfg, root, loader)
    val = build_loader(cfg, "val")
    before, before_labels = epoch(val)
    victim = root / "val" / "cat" / "02.jpg"  # image 8 of 18: astronaut 0-5, cat 6-11
    victim.write_bytes(victim.read_bytes()[:300])  # changed after the check
    after, after_labels = epoch(val)
    assert len(after) == len(before) == 18
    assert torch.equal(after[8], before[9]) and after_labels[8] == before_labels[9]  # the next image stands in
    keep = [i for i in range(18) if i != 8]
    assert torch.equal(after[keep], before[keep]) and torch.equal(after_labels[keep], before_labels[keep])
    assert val.left_out == [(str(victim), val.left_out[0][1])] and "failed mid-run" in val.left_out[0][1]
    assert capsys.readouterr().out.count(f"warning: {victim} does not decode") == 1
    again, _ = epoch(val)  # the next epochs: replaced again, reported once
    assert torch.equal(again, after) and len(val.left_out) == 1


def test_torchvision_workers_replace_a_broken_train_image_deterministically(demo_cfg, tmp_path):
    """In DataLoader worker processes, an epoch's order stays a function of (seed, epoch)."""
    root = photo_folder(tmp_path / "data", {"train": 6})
    cfg = folder_cfg(demo_cfg, root, "torchvision", "data.workers=2", "data.check_images=false")
    victim = root / "train" / "coffee" / "03.jpg"
    victim.write_bytes(b"")
    first, first_labels = epoch(build_loader(cfg, "train"), 1)
    loader = build_loader(cfg, "train")
    second, second_labels = epoch(loader, 1)
    assert torch.equal(first, second) and torch.equal(first_labels, second_labels)
    assert [path for path, _ in loader.left_out] == [str(victim)]


@pytest.mark.parametrize("loader", ALL_LOADERS)
def test_an_empty_class_folder_is_refused_alike_by_every_backend(loader, demo_cfg, tmp_path):
    root = photo_folder(tmp_path / "data", {"train": 3, "val": 3})
    (root / "train" / "dog").mkdir()
    (root / "train" / "dog" / "notes.txt").write_text("no image here")
    (root / "val" / "dog").mkdir()
    (root / "val" / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really")  # none that decodes
    extensions = ", ".join(IMG_EXTENSIONS)
    with pytest.raises(EmptyClasses, match=re.escape(f"image folder {root / 'train'}: no image file ({extensions}) "
                                                     "in the class folders dog: every class needs one")):
        prepare_dataset(folder_cfg(demo_cfg, root, loader))
    assert not (root / "ffcv").exists() or not any((root / "ffcv").iterdir())
    (root / "train" / "dog" / "00.jpg").write_bytes((root / "train" / "cat" / "00.jpg").read_bytes())
    with pytest.raises(EmptyClasses, match=re.escape(f"image folder {root / 'val'}: no image file ({extensions}) "
                                                     "that decodes in the class folders dog: every class needs one")):
        prepare_dataset(folder_cfg(demo_cfg, root, loader))


def test_an_empty_class_folder_stops_a_run_with_one_line(tmp_path):
    root = photo_folder(tmp_path / "data", {"train": 3, "val": 3})
    (root / "val" / "dog").mkdir()
    result = train_in_process("data.dataset=imagefolder", f"data.root={root}", f"output_dir={tmp_path / 'run'}",
                              "tracker=none", check=False)
    assert one_error_line(result).startswith(f"error: image folder {root / 'val'}: no image file")
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------
# Real runs: bad images in train/ and val/, every loader

@pytest.mark.slow
@pytest.mark.parametrize("loader", ALL_LOADERS)
def test_a_run_with_bad_images_finishes_saves_every_epoch_and_counts_them(loader, tmp_path):
    root = photo_folder(tmp_path / "data", {"train": 8, "val": 4}, size=24)
    bad = {split: spoil(root / split) for split in ("train", "val")}
    run_dir = tmp_path / "run"
    result = train_in_process("data.dataset=imagefolder", f"data.root={root}", f"output_dir={run_dir}",
                              f"loader={loader}", "tracker=none", "model=test_resnet", "method=vanilla", "epochs=2",
                              "batch_size=4", "data.image_size=16", "data.crop_ratio=0.8", "eval_robust=false",
                              "image_log_every=0", "data.workers=1", "data.dali.threads=1")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["images_left_out"] == {"train": 3, "val": 3}
    assert summary["val_images"] == 3 * 4 - 1  # the truncated one is out; empty.jpg, text.jpg were extra
    assert re.search(r"images left out \(unreadable\) +train 3, val 3", result.stdout)
    assert result.stdout.count("3 images") == 2  # one line per split says how many, and where they are listed
    reports = _reports(root, loader)
    assert all(path in reports for path in [*bad["train"], *bad["val"]])
    for name in ("epoch_0001", "epoch_0002"):
        model, cfg, classes = load_checkpoint_model(run_dir / "checkpoints" / name)
        assert classes == CLASSES and cfg.epochs == 2
        assert all(torch.isfinite(p).all() for p in model.parameters())
    assert (run_dir / "final_model" / "model.safetensors").is_file()


def _reports(root: Path, loader: str) -> str:
    """What the run's reports list: the image check's (torchvision, dali) or the .beton's (ffcv)."""
    if loader == "ffcv":
        return "".join((root / "ffcv" / f"{split}.beton.skipped.txt").read_text() for split in ("train", "val"))
    return "".join(report_path(list_image_folder(root / split)).read_text() for split in ("train", "val"))
