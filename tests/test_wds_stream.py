"""Remote shards (here `pipe:cat ...` URLs, which webdataset opens like http:// ones), streamed by
loader=torchvision: what holds (pipelines/backends/torchvision/stream.py) — disjoint whole shards per process, equal
steps, val each sample once, order a function of (seed, epoch), resume continuing the stream, bad
samples and shards reported.

    pytest -q tests/test_wds_stream.py     # ~1 min on 2 cores
"""
from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest

from pipelines.loading import build_loader, prepare_dataset
from pipelines.sources.shards.spec import ShardSetError
from wds_sets import numbered_set


@pytest.fixture(scope="module")
def numbered(digits_root, tmp_path_factory) -> Path:
    return numbered_set(digits_root, tmp_path_factory.mktemp("numbered"), maxcount=100)  # 15 train, 4 val shards


def stream_cfg(demo_cfg, root: Path, *overrides: str, train_shards: int = 15):
    return demo_cfg("data.dataset=webdataset", f"data.root={root}", "data.image_size=32", "data.workers=2",
                    f"data.train_shards=pipe:cat {root}/train/train-{{0000..{train_shards - 1:04d}}}.tar",
                    f"data.val_shards=pipe:cat {root}/val/val-{{0000..0003}}.tar", *overrides)


def epoch_labels(loader, epoch: int, start_batch: int = 0) -> list[int]:
    loader.set_epoch(epoch, start_batch)
    return [label for _, labels in loader for label in labels.tolist()]


def test_processes_stream_disjoint_shards_in_equal_steps_and_val_counts_each_once(demo_cfg, numbered):
    cfg = stream_cfg(demo_cfg, numbered, "batch_size=32")
    prepare_dataset(cfg)
    train = [build_loader(cfg, "train", rank=r, world_size=2) for r in (0, 1)]
    seen = [epoch_labels(loader, 0) for loader in train]
    # 15 shards of 100 (the last 37): 7 each; the 7 smallest hold 637 samples → 19 batches of 32
    assert len(train[0]) == len(train[1]) == 19 and len(seen[0]) == len(seen[1]) == 19 * 32
    assert not set(seen[0]) & set(seen[1]) and all(len(set(s)) == len(s) for s in seen)  # no sample twice
    for labels, loader in zip(seen, train):  # each process reads whole shards, its own
        shards = {label // 100 for label in labels}
        assert shards <= set(loader.epoch_shards()) and len(shards) == 7
    val = [epoch_labels(build_loader(cfg, "val", rank=r, world_size=2), 0) for r in (0, 1)]
    assert sorted(val[0] + val[1]) == list(range(360))


def test_order_follows_seed_and_epoch_and_resume_continues_the_stream(demo_cfg, numbered):
    loader = build_loader(stream_cfg(demo_cfg, numbered, "batch_size=64", train_shards=5), "train")
    first, again, other = epoch_labels(loader, 1), epoch_labels(loader, 1), epoch_labels(loader, 2)
    assert first == again != other and len(first) == len(loader) * 64
    assert [label // 100 for label in first[:64]] != sorted(label // 100 for label in first[:64])  # shuffled
    assert epoch_labels(loader, 1, start_batch=4) == first[4 * 64:]


def test_bad_samples_and_shards_are_reported_and_the_steps_kept(demo_cfg, numbered, tmp_path, capfd):
    root = Path(shutil.copytree(numbered, tmp_path / "set"))
    (root / "val" / "val-0001.tar").unlink()  # cat fails: a shard that cannot be opened
    cut = root / "val" / "val-0002.tar"
    cut.write_bytes(cut.read_bytes()[:cut.stat().st_size // 2])  # ends early
    with tarfile.open(root / "val" / "val-0003.tar", "a") as tar:  # one more sample, its image broken
        for ext, data in (("cls", b"359"), ("png", b"\x89PNG\r\n\x1a\n not really")):
            member = tarfile.TarInfo(f"broken.{ext}")
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    info = json.loads((root / "_info.json").read_text())
    info["splits"]["val"]["shard_lengths"][3] += 1
    (root / "_info.json").write_text(json.dumps(info))
    val = build_loader(stream_cfg(demo_cfg, root), "val")
    labels = epoch_labels(val, 0)
    assert len(labels) == len(set(labels)) and set(labels) < set(range(360)) and 100 + len(labels) < 360
    out = capfd.readouterr().out
    assert "shard pipe:cat" in out and "val-0001.tar: read 0 of its 100 samples" in out
    assert "val-0002.tar: read" in out and "key broken" in out and "the stream's next sample is used" in out
    assert len(val.left_out) == 4  # a shard unopened, a shard short (and its cut last sample), an image broken


def test_streaming_needs_shard_lengths_and_the_torchvision_loader(demo_cfg, numbered):
    pattern = f"pipe:cat {numbered}/val/val-{{0000..0003}}.tar"
    for overrides, words in [((f"data.root={numbered}/nowhere", f"data.val_shards={pattern}",
                               f"data.train_shards={pattern}", "data.num_classes=360"), "sample count"),
                             (("loader=dali",), "loader=torchvision only")]:
        with pytest.raises(ShardSetError, match=words):
            prepare_dataset(stream_cfg(demo_cfg, numbered, *overrides))
