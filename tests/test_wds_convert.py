"""tools/convert_wds.py: ImageFolder → tar shards + _info.json + DALI index files, read back by
webdataset's, timm's and DALI's own readers; bad files skipped and counted; nothing half-written.

    pytest -q tests/test_wds_convert.py     # ~1 min on 2 cores
"""
from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.sources.offline.photos import build_photo_imagefolder
from pipelines.sources.shards.index import read_index, scan_tar
from conftest import tool_in_process
from wds_sets import convert_wds, digest, folder_samples, reference_samples


def shard_paths(out: Path, split: str) -> list[str]:
    info = json.loads((out / "_info.json").read_text())
    return [str(out / name) for name in info["splits"][split]["filenames"]]


@pytest.fixture(scope="module")
def digit_shards(digits_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wds") / "digits"
    for split, size in (("train", 500), ("val", 100)):  # as a user runs it: a process per split
        result = convert_wds(digits_root / split, out, "--split", split, "--shard-size", size, "--workers", 2)
        assert result.returncode == 0, result.stderr[-2000:]
    return out


def test_shards_hold_the_folders_images_and_labels(digits_root, digit_shards):
    info = json.loads((digit_shards / "_info.json").read_text())
    assert info["classes"] == [str(d) for d in range(10)] and info["num_classes"] == 10
    for split, count in (("train", 1437), ("val", 360)):
        entry = info["splits"][split]
        assert entry["num_samples"] == count and sum(entry["shard_lengths"]) == count
        assert len(entry["filenames"]) == -(-count // (500 if split == "train" else 100))
        # the same bytes under the same class index, read by webdataset (a reader we did not write)
        assert reference_samples(shard_paths(digit_shards, split)) == folder_samples(digits_root / split)
    first = read_index(digit_shards / "train-0000.idx")
    assert len(first) == 500 and [ext for ext, *_ in first[0]] == ["cls", "png"]
    labels = [int(Path(digit_shards / "train-0000.tar").read_bytes()[s[0][1]:s[0][1] + s[0][2]]) for s in first]
    assert len(set(labels)) == 10  # a seeded random order: every shard holds every class


def test_timm_reads_the_info_file(digit_shards, digits_root):
    """timm's own WebDataset reader (timm/data/readers/reader_wds.py) on our _info.json."""
    pytest.importorskip("webdataset")
    from timm.data.readers.reader_wds import ReaderWds
    reader = ReaderWds(str(digit_shards), split="val", is_training=False)
    assert reader.num_samples == 360
    labels = Counter(int(target) for _, target in reader)
    assert labels == Counter(label for _, label in folder_samples(digits_root / "val").elements())


def test_dali_reads_the_index_files(digit_shards, digits_root):
    """DALI's own webdataset reader, given our index files, yields every sample once."""
    pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn, pipeline_def

    paths = shard_paths(digit_shards, "val")

    @pipeline_def(batch_size=40, num_threads=1, device_id=None)
    def read():
        image, label = fn.readers.webdataset(paths=paths, index_paths=[p[:-4] + ".idx" for p in paths],
                                             ext=["png", "cls"], missing_component_behavior="error")
        return image, label

    pipe = read()
    pipe.build()
    seen = Counter()
    for _ in range(360 // 40):
        images, labels = pipe.run()
        seen.update((digest(np.array(images[i]).tobytes()), int(bytes(np.array(labels[i])))) for i in range(40))
    assert seen == folder_samples(digits_root / "val")


def build_bad_folder(root: Path) -> tuple[int, dict[str, str]]:
    """Photos beside the files that break conversions. Returns (good count, {bad name: reason word})."""
    photos = sorted(build_photo_imagefolder(root.parent / "photos", count=12).rglob("*.jpg"))  # real photo JPEGs
    for index, path in enumerate(photos):
        folder = root / ("cat" if index % 2 else "dog")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{index}.jpg").write_bytes(path.read_bytes())
    whole = (root / "cat" / "1.jpg").read_bytes()
    (root / "cat" / "truncated.jpg").write_bytes(whole[:len(whole) // 2])
    (root / "cat" / "empty.jpg").write_bytes(b"")
    (root / "dog" / "notes.jpg").write_text("a text file with an image name\n")
    (root / "dog" / "README.txt").write_text("a stray file\n")
    os.symlink(root / "dog", root / "cat" / "loop")  # a second path to a folder: each image once
    Image.open(root / "dog" / "0.jpg").convert("CMYK").save(root / "dog" / "cmyk.jpg")
    Image.open(root / "dog" / "0.jpg").save(root / "dog" / "bitmap.bmp")  # re-encoded as PNG
    return 14, {"truncated.jpg": "truncated", "empty.jpg": "empty", "notes.jpg": "identify",
                "README.txt": "no image extension"}


def test_bad_files_are_skipped_with_reasons_and_counted(tmp_path):
    good, bad = build_bad_folder(tmp_path / "src")
    out = tmp_path / "out"
    result = convert_wds(tmp_path / "src", out, "--split", "train", "--shard-size", 4, "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout.splitlines()[-1])
    assert summary == {**summary, "found": good + len(bad), "written": good, "skipped": len(bad) - 1,
                       "non_images": 1, "duplicates": 1, "shards": 4}  # README.txt: no image extension
    listed = dict(line.split("\t") for line in (out / "train.skipped.txt").read_text().splitlines())
    for name, word in bad.items():
        assert word in next(reason for path, reason in listed.items() if path.endswith(name)).lower()
    assert any(path.endswith("loop") for path in listed)  # the symlinked folder, not its images again
    stored = [name for tar in shard_paths(out, "train") for sample in scan_tar(tar) for _, _, _, name in sample]
    assert sum(name.endswith("_bitmap.png") for name in stored) == 1 and len(stored) == 2 * good


def run_main(capsys, *args) -> tuple[int, str]:
    """tools/convert_wds.py's command line in this process (a refusal costs no interpreter start)."""
    result = tool_in_process("convert_wds.py", *args)
    return result.returncode, result.stderr


def test_refusals_change_nothing(digits_root, tmp_path, capsys):
    out = tmp_path / "set"
    assert run_main(capsys, digits_root / "val", out, "--split", "val", "--shard-size", 200)[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    for args, words in [((digits_root / "val", out, "--split", "val"), "--overwrite"),
                        ((digits_root / "val", digits_root / "val" / "shards"), "inside the input"),
                        ((digits_root / "val", out / "_info.json"), "is a file"),
                        ((digits_root / "nowhere", tmp_path / "other"), "does not exist")]:
        code, err = run_main(capsys, *args)
        assert code == 2 and words in err and len(err.splitlines()) == 1, err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not (digits_root / "val" / "shards").exists() and not (tmp_path / "other").exists()
    # --overwrite replaces the split: new shards listed, the old ones gone
    assert run_main(capsys, digits_root / "val", out, "--split", "val", "--shard-size", 100, "--overwrite")[0] == 0
    assert sorted(p.name for p in out.glob("*.tar")) == [f"val-000{i}.tar" for i in range(4)]
    assert reference_samples(shard_paths(out, "val")) == folder_samples(digits_root / "val")


def test_a_failed_conversion_leaves_the_set_as_it_was(digits_root, tmp_path, monkeypatch):
    import pipelines.writers.shards as writer

    out = tmp_path / "set"
    writer.convert_folder(digits_root / "val", out, split="val", shard_size=100, workers=1)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    encoded, calls = writer.encoded_image, []

    def fail_on_the_150th(path):
        calls.append(path)
        if len(calls) == 150:
            raise OSError(28, "No space left on device")
        return encoded(path)

    monkeypatch.setattr(writer, "encoded_image", fail_on_the_150th)
    with pytest.raises(OSError):
        writer.convert_folder(digits_root / "train", out, split="train", shard_size=100, workers=1)
    with pytest.raises(OSError):  # over the existing split too
        calls.clear()
        writer.convert_folder(digits_root / "val", out, split="val", shard_size=50, workers=1, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no shard, no staging folder, same info


def test_a_split_with_other_classes_is_refused(digits_root, tmp_path, capsys):
    out = tmp_path / "set"
    assert run_main(capsys, digits_root / "val", out, "--split", "val", "--workers", 1)[0] == 0
    (tmp_path / "letters" / "a").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "letters" / "a" / "0.png")
    code, err = run_main(capsys, tmp_path / "letters", out, "--split", "train")
    assert code == 2 and "other classes" in err
