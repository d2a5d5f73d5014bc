"""The data layer's caches: a warm start reads a folder's listing instead of walking it and a shard
set's table instead of parsing every index; any change of the data makes them stale; and a damaged
cache file of any kind is built again after one warning line — never a reason to fail."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import pipelines.sources.folder.image_check as image_check
import pipelines.sources.folder.listing_cache as listing_cache
import pipelines.sources.shards.table as table_module
from conftest import photo_folder, spoil
from pipelines.cache_files import cache_folder, folder_key
from pipelines.sources.folder.image_check import check_images, report_path
from pipelines.sources.folder.listing import list_image_folder
from pipelines.sources.folder.listing_cache import folder_listing, listing_path
from pipelines.sources.shards.index import cached_index_path
from pipelines.sources.shards.spec import ShardSplit
from pipelines.sources.shards.table import build_table
from wds_sets import write_with_shardwriter


def same_listing(a, b) -> bool:
    return (a.classes == b.classes and list(a.files) == list(b.files) and a.fingerprint() == b.fingerprint()
            and a.skipped == b.skipped)


@pytest.fixture
def walks(monkeypatch):
    """Counts the folder walks; each folder_listing call acts as a new process's (no memo)."""
    counted, walk = [], listing_cache.list_image_folder
    monkeypatch.setattr(listing_cache, "list_image_folder", lambda root: counted.append(root) or walk(root))
    monkeypatch.setattr(listing_cache, "_CHECKED", {})
    return counted


def warnings_in(capsys) -> list[str]:
    return [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]


# ---------------------------------------------------------------------------------------------
# The listing

def test_a_warm_start_reads_the_listing_and_a_change_walks_again(tmp_path, walks, monkeypatch):
    root = photo_folder(tmp_path / "data", {"train": 4}) / "train"
    os.symlink(tmp_path / "gone.jpg", root / "cat" / "broken.jpg")
    first = folder_listing(root)
    assert walks == [root] and listing_path(root).is_file()
    assert listing_path(root).parent == report_path(first).parent  # beside the image check's cache
    monkeypatch.setattr(listing_cache, "_CHECKED", {})
    assert same_listing(folder_listing(root), first) and walks == [root]  # read, not walked

    def changed(change) -> None:
        monkeypatch.setattr(listing_cache, "_CHECKED", {})
        walks.clear()
        change()
        listing = folder_listing(root)
        assert walks == [root] and same_listing(listing, list_image_folder(root))

    cat = root / "cat" / "01.jpg"
    changed(lambda: cat.write_bytes(cat.read_bytes() + b"\0"))  # edited in place: size and mtime
    changed(lambda: os.utime(cat, ns=(1, 1)))  # only its mtime
    changed(lambda: shutil.copy(cat, root / "coffee" / "new.jpg"))  # a file added
    changed(lambda: (root / "astronaut" / "00.jpg").unlink())  # one removed
    changed(lambda: (root / "astronaut" / "deeper").mkdir())  # a folder added
    changed(lambda: shutil.copy(cat, tmp_path / "gone.jpg"))  # a broken link mended
    assert str(root / "cat" / "broken.jpg") in [path for path, _ in folder_listing(root).files]


def test_in_one_process_a_listing_is_reused_while_its_folders_hold(tmp_path, walks):
    root = photo_folder(tmp_path / "data", {"train": 2}) / "train"
    folder_listing(root)
    folder_listing(root, recheck_files=False)
    assert walks == [root]
    shutil.copy(root / "cat" / "00.jpg", root / "cat" / "new.jpg")  # the class folder's mtime changes
    assert len(folder_listing(root, recheck_files=False)) == 7 and walks == [root, root]


# ---------------------------------------------------------------------------------------------
# Damaged cache files: one warning, built again

def cut(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])


def test_a_damaged_listing_cache_is_walked_again_with_one_warning(tmp_path, walks, capsys, monkeypatch):
    root = photo_folder(tmp_path / "data", {"train": 3}) / "train"
    first = folder_listing(root)
    for damage in (cut, lambda path: path.write_bytes(b"not a numpy file")):
        damage(listing_path(root))
        monkeypatch.setattr(listing_cache, "_CHECKED", {})
        capsys.readouterr()
        assert same_listing(folder_listing(root), first)
        lines = warnings_in(capsys)
        assert len(lines) == 1 and str(listing_path(root)) in lines[0] and "it is built again" in lines[0]
    monkeypatch.setattr(listing_cache, "_CHECKED", {})
    walks.clear()
    assert same_listing(folder_listing(root), first) and walks == []  # rewritten whole: read again


def test_damaged_image_check_files_are_checked_again_with_one_warning(tmp_path, capsys, monkeypatch):
    root = photo_folder(tmp_path / "data", {"train": 4}) / "train"
    bad = spoil(root)
    listing = list_image_folder(root)
    left_out = check_images(listing)
    assert set(dict(left_out)) == set(bad)
    report = report_path(listing)
    good = cache_folder("image-check") / f"{folder_key(root)}.good.npy"
    decoded, decode = [], image_check.decode_problem
    monkeypatch.setattr(image_check, "decode_problem", lambda path: decoded.append(path) or decode(path))

    report.write_text(report.read_text() + "a line without a tab\n")  # an edited report
    capsys.readouterr()
    assert check_images(listing) == left_out
    lines = warnings_in(capsys)
    assert len(lines) == 1 and str(report) in lines[0] and "damaged" in lines[0]
    assert len(decoded) == len(bad)  # only the files not known to decode: the good stamps held

    for damage in (cut, lambda path: np.save(path, np.arange(3.0))):  # truncated; another array
        report.unlink()
        damage(good)
        decoded.clear()
        assert check_images(listing) == left_out
        lines = warnings_in(capsys)
        assert len(lines) == 1 and str(good) in lines[0] and "damaged" in lines[0]
        assert len(decoded) == len(listing.image_indices())  # every image file decoded again
    assert check_images(listing) == left_out and warnings_in(capsys) == []  # all rebuilt


# ---------------------------------------------------------------------------------------------
# Shard tables and the index files cached for shards without one

def shard_split(pattern: str, count: int) -> ShardSplit:
    from webdataset.shardlists import expand_urls
    return ShardSplit("train", pattern, expand_urls(pattern), None, count, None, None)


@pytest.fixture
def shards(tmp_path, digits_root):
    folder = tmp_path / "few"
    for name in ("0", "1"):
        shutil.copytree(digits_root / "val" / name, folder / name)
    pattern = write_with_shardwriter(folder, tmp_path / "shards", maxcount=20)
    return shard_split(pattern, len(list_image_folder(folder)))


def test_a_shard_table_is_read_from_its_cache_until_a_shard_changes(shards, monkeypatch):
    first = build_table(shards)
    indexed, index_all = [], table_module.index_all
    monkeypatch.setattr(table_module, "index_all", lambda tars, workers=0: indexed.append(tars) or index_all(tars))
    again = build_table(shards)
    assert indexed == [] and again.shards == first.shards
    assert all(np.array_equal(getattr(again, name), getattr(first, name)) for name in ("starts", "image", "label"))
    assert again.where(len(again) - 1) == first.where(len(first) - 1)
    os.utime(shards.urls[1], ns=(1, 1))  # a shard changed (its mtime): the table is built again
    build_table(shards)
    assert len(indexed) == 1


def test_damaged_shard_caches_are_built_again_with_one_warning(shards, capsys):
    first = build_table(shards)
    table = cache_folder("shard-tables") / f"{table_module.table_key(shards.urls)}.npz"
    index = cached_index_path(shards.urls[0], os.stat(shards.urls[0]))
    assert index.is_file() and table.is_file()
    capsys.readouterr()
    cut(table)
    again = build_table(shards)
    lines = warnings_in(capsys)
    assert len(lines) == 1 and str(table) in lines[0] and "it is built again" in lines[0]
    assert np.array_equal(again.image, first.image)

    table.unlink()
    index.write_text("v1.2 3\nthis is not an index\n")
    again = build_table(shards)
    lines = warnings_in(capsys)
    assert len(lines) == 1 and str(index) in lines[0]
    assert np.array_equal(again.image, first.image)
    assert build_table(shards) is not None and warnings_in(capsys) == []
