"""Every backend reads tar shards (data.dataset=webdataset) under the loader contract: the folder's
classes and labels, disjoint equal shards per process, val each sample once, order a function of
(seed, epoch), exact mid-epoch resume; bad shards give one-line errors up front, bad samples a
report mid-epoch.

    pytest -q tests/test_wds_loaders.py     # ~3 min on 2 cores (three one-epoch training runs)
"""
from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch

from conftest import one_error_line, train_in_process
from pipelines.loading import build_loader, prepare_dataset
from pipelines.sources.shards.spec import ShardSetError
from pipelines.writers.shards import convert_folder
from wds_sets import numbered_set, reference_samples, write_with_shardwriter

BACKENDS = ["torchvision", pytest.param("dali", marks=pytest.mark.skipif(
    not __import__("importlib").util.find_spec("nvidia.dali"), reason="DALI not installed"))]


@pytest.fixture(autouse=True)
def index_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # indexes built here, not in ~/.cache


@pytest.fixture(scope="module")
def converted(digits_root, tmp_path_factory) -> Path:
    """The digits as tools/convert_wds.py writes them (info file, index files)."""
    out = tmp_path_factory.mktemp("wds") / "digits"
    for split in ("train", "val"):
        convert_folder(digits_root / split, out, split=split, shard_size=300, workers=1)
    return out


@pytest.fixture(scope="module")
def written(digits_root, tmp_path_factory) -> dict[str, str]:
    """The digits as webdataset's ShardWriter writes them: brace patterns, no info, no index files."""
    out = tmp_path_factory.mktemp("shardwriter")
    return {split: write_with_shardwriter(digits_root / split, out / split, maxcount=250) for split in ("train", "val")}


@pytest.fixture(scope="module")
def numbered(digits_root, tmp_path_factory) -> Path:
    return numbered_set(digits_root, tmp_path_factory.mktemp("numbered"))


def shard_cfg(demo_cfg, backend: str, *overrides: str):
    return demo_cfg("data.dataset=webdataset", f"loader={backend}", "data.image_size=32", "data.dali.threads=2",
                    "data.workers=0", *overrides)


def numbered_cfg(demo_cfg, numbered: Path, backend: str, *overrides: str):
    return shard_cfg(demo_cfg, backend, f"data.root={numbered}", *overrides)


def labels_of(loader) -> list[int]:
    return [label for _, labels in loader for label in labels.tolist()]


def val_samples(loader) -> Counter:
    return Counter((hashlib.sha1(image.numpy().tobytes()).hexdigest(), int(label))
                   for images, labels in loader for image, label in zip(images, labels))


# ---------------------------------------------------------------------------------------------
# The contract

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("writer", ["convert_wds", "ShardWriter"])
def test_shards_give_the_folders_classes_and_labels(backend, writer, demo_cfg, converted, written):
    source = ([f"data.root={converted}"] if writer == "convert_wds" else
              [f"data.train_shards={written['train']}", f"data.val_shards={written['val']}"])
    prepare_dataset(shard_cfg(demo_cfg, backend, *source))
    shards = build_loader(shard_cfg(demo_cfg, backend, *source), "val")
    folder = build_loader(demo_cfg(f"loader={backend}", "data.image_size=32", "data.dali.threads=2"), "val")
    assert shards.classes == folder.classes == [str(d) for d in range(10)]
    assert shards.num_samples == folder.num_samples == 360
    assert val_samples(shards) == val_samples(folder)  # the same decoded images under the same labels


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_processes_read_disjoint_equal_shards_and_val_counts_each_once(backend, demo_cfg, numbered):
    cfg = numbered_cfg(demo_cfg, numbered, backend, "batch_size=32")
    prepare_dataset(cfg)
    train = [build_loader(cfg, "train", rank=r, world_size=2) for r in (0, 1)]
    seen = []
    for loader in train:
        loader.set_epoch(0)
        seen.append(labels_of(loader))
    assert len(train[0]) == len(train[1]) == 1437 // 2 // 32 and len(seen[0]) == len(seen[1]) == 22 * 32
    assert not set(seen[0]) & set(seen[1]) and len(set(seen[0])) == len(seen[0])
    assert seen == [loader.sampler.indices() for loader in train]  # ShardSampler's order, read as is
    val = [labels_of(build_loader(cfg, "val", rank=r, world_size=2)) for r in (0, 1)]
    assert sorted(val[0] + val[1]) == list(range(360))


def test_every_backend_reads_the_same_order(demo_cfg, numbered):
    pytest.importorskip("nvidia.dali")
    orders = []
    for backend in ("torchvision", "dali"):
        loader = build_loader(numbered_cfg(demo_cfg, numbered, backend, "batch_size=64", "seed=3"), "train")
        loader.set_epoch(2)
        orders.append(labels_of(loader))
    assert orders[0] == orders[1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_order_follows_seed_and_epoch_and_resume_continues_exactly(backend, demo_cfg, numbered):
    loader = build_loader(numbered_cfg(demo_cfg, numbered, backend, "batch_size=64"), "train")
    epochs = []
    for epoch in (0, 1, 0):
        loader.set_epoch(epoch)
        epochs.append([(images.clone(), labels) for images, labels in loader])
    order = [[int(y) for _, labels in batches for y in labels] for batches in epochs]
    assert order[0] == order[2] != order[1] and sorted(order[0]) == sorted(set(order[0]))
    loader.set_epoch(0, start_batch=5)
    rest = list(loader)
    assert [int(y) for _, labels in rest for y in labels] == order[0][5 * 64:]  # nothing repeated, none skipped
    if backend == "torchvision":  # its crops are seeded per sample too: the very same images
        assert all(torch.equal(a[0], b[0]) for a, b in zip(epochs[0][5:], rest))


def test_start_reads_index_files_not_tars(demo_cfg, converted, monkeypatch):
    """With index files beside the shards (convert_wds writes them) a start scans no tar."""
    import pipelines.sources.shards.index as index
    monkeypatch.setattr(index, "scan_tar", lambda tar: pytest.fail(f"scanned {tar}"))
    monkeypatch.setattr("pipelines.sources.shards.source._TABLES", {})
    loader = build_loader(shard_cfg(demo_cfg, "torchvision", f"data.root={converted}"), "train")
    loader.set_epoch(0)
    assert len(next(iter(loader))[1]) == 64


@pytest.mark.slow  # three one-epoch runs
def test_one_epoch_trains_on_every_backend(converted, tmp_path):
    for backend in ("torchvision", "dali", "ffcv"):
        if backend != "torchvision" and not __import__("importlib").util.find_spec(
                {"dali": "nvidia.dali", "ffcv": "ffcv"}[backend]):
            continue
        run_dir = tmp_path / backend
        train_in_process("data.dataset=webdataset", f"data.root={converted}", f"loader={backend}",
                         "data.image_size=32", "epochs=1", "method=vanilla", "model=test_resnet", "eval_robust=false",
                         "tracker=none", "batch_size=32", "optimizer.lr_per_256=1.0", "log_every=4", "data.workers=1",
                         "data.dali.threads=2", f"output_dir={run_dir}")
        lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        losses = [line["train/loss/clean"] for line in lines if "train/loss/clean" in line]
        assert len(losses) == 11 and losses[-1] < 0.6 * losses[0], (backend, losses)  # it learns: labels fit images
        assert json.loads((run_dir / "summary.json").read_text())["val_images"] == 360
        config = json.loads((run_dir / "final_model" / "config.json").read_text())
        assert config["label_names"] == [str(d) for d in range(10)]


# ---------------------------------------------------------------------------------------------
# Bad shards

def copy_set(converted: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(converted, tmp_path / "set"))


def add_sample(tar_path: Path, key: str, files: dict[str, bytes]) -> None:
    """Append a sample to an uncompressed tar (and drop its index: the loader re-indexes)."""
    with tarfile.open(tar_path, "a") as tar:
        for ext, data in files.items():
            member = tarfile.TarInfo(f"{key}.{ext}")
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    tar_path.with_suffix(".idx").unlink(missing_ok=True)


@pytest.mark.parametrize("damage, words", [
    ("missing", "do not exist"), ("truncated", "truncated"), ("no cls", "no label file (cls)"),
    ("no image", "no image file"), ("not a tar", "not a readable uncompressed tar"),
    ("wrong length", "holds 301 samples but"),
])
def test_bad_shards_are_one_error_before_training(damage, words, demo_cfg, converted, tmp_path):
    root = copy_set(converted, tmp_path)
    shard = root / "train-0001.tar"
    if damage == "missing":
        shard.unlink()
    elif damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:shard.stat().st_size // 2])
    elif damage == "not a tar":
        shard.write_bytes(b"<html>404 not found</html>" * 50)
        shard.with_suffix(".idx").unlink()
    elif damage == "no cls":
        add_sample(shard, "extra", {"png": (root / "train-0000.tar").read_bytes()[1536:1600]})
    elif damage == "no image":
        add_sample(shard, "extra", {"cls": b"3"})
    else:
        add_sample(shard, "extra", {"png": b"x", "cls": b"3"})
    cfg = shard_cfg(demo_cfg, "torchvision", f"data.root={root}")
    with pytest.raises(ShardSetError, match=re.escape(words)) as error:
        prepare_dataset(cfg)
    assert "\n" not in str(error.value) and "train-0001.tar" in str(error.value)


def test_a_bad_shard_stops_the_trainer_with_one_line_and_writes_nothing(converted, tmp_path):
    root = copy_set(converted, tmp_path)
    (root / "val-0000.tar").unlink()
    result = train_in_process("data.dataset=webdataset", f"data.root={root}", "tracker=none",
                              f"output_dir={tmp_path / 'run'}", check=False)
    assert "val-0000.tar" in one_error_line(result) and not (tmp_path / "run").exists()


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_image_that_does_not_decode_is_replaced_reported_and_counted(backend, demo_cfg, converted, tmp_path, capfd):
    root = copy_set(converted, tmp_path)
    good = (root / "val-0000.tar").read_bytes()
    add_sample(root / "val-0001.tar", "broken", {"png": good[1536:1536 + 300], "cls": b"4"})  # a cut PNG
    add_sample(root / "train-0002.tar", "garbage", {"jpg": b"not an image at all", "cls": b"1"})
    info = json.loads((root / "_info.json").read_text())
    for split, shard in (("val", 1), ("train", 2)):
        info["splits"][split]["shard_lengths"][shard] += 1
        info["splits"][split]["num_samples"] += 1
    (root / "_info.json").write_text(json.dumps(info))
    cfg = shard_cfg(demo_cfg, backend, f"data.root={root}", "batch_size=64", "data.workers=1")  # across a worker queue
    prepare_dataset(cfg)  # nothing wrong up front: the bytes are there
    val = build_loader(cfg, "val")
    # the broken sample is the set's last (360); the next one that reads, sample 0, stands in for it
    assert labels_of(val) == [val.source.reader.read_label(i) for i in [*range(360), 0]]
    assert val.left_out == [(f"shard {root}/val-0001.tar key broken", val.left_out[0][1])]
    train = [build_loader(cfg, "train", rank=r, world_size=2) for r in (0, 1)]
    for loader in train:
        loader.set_epoch(0)
    assert [sum(len(y) for _, y in loader) for loader in train] == [len(train[0]) * 64] * 2  # full, in step
    assert [where for loader in train for where, _ in loader.left_out] == [f"shard {root}/train-0002.tar key garbage"]
    out = capfd.readouterr().out
    assert "val-0001.tar key broken" in out and "the next sample of the set is used in its place" in out


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_shard_gone_mid_run_is_one_warning_and_each_of_its_samples_counted(backend, demo_cfg, converted, tmp_path,
                                                                              capfd):
    root = copy_set(converted, tmp_path)
    cfg = shard_cfg(demo_cfg, backend, f"data.root={root}", "batch_size=64", "data.workers=1")
    prepare_dataset(cfg)
    val = build_loader(cfg, "val")
    lengths = json.loads((root / "_info.json").read_text())["splits"]["val"]["shard_lengths"]
    (root / "val-0001.tar").unlink()  # after its index was read: gone mid-run
    assert len(labels_of(val)) == sum(lengths)  # every batch full: the next readable samples stand in
    assert len(val.left_out) == lengths[1] and all("val-0001.tar key" in where for where, _ in val.left_out)
    warnings = [line for line in capfd.readouterr().out.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and f"shard {root}/val-0001.tar" in warnings[0], warnings
    assert "each of its samples is replaced by the next that reads" in warnings[0]


def test_a_shard_rewritten_under_its_old_index_is_indexed_again(demo_cfg, converted, tmp_path):
    root = copy_set(converted, tmp_path)
    shutil.copyfile(root / "val-0000.tar", root / "val-0001.tar")  # 300 other samples; the old 60-sample index stays
    info = json.loads((root / "_info.json").read_text())
    info["splits"]["val"].update(shard_lengths=[300, 300], num_samples=600)
    (root / "_info.json").write_text(json.dumps(info))
    loader = build_loader(shard_cfg(demo_cfg, "torchvision", f"data.root={root}"), "val")
    expected = reference_samples([str(root / "val-0000.tar"), str(root / "val-0001.tar")])
    assert Counter(labels_of(loader)) == Counter(label for _, label in expected.elements())


def test_convert_ffcv_accepts_shards_and_ffcv_reads_their_labels(demo_cfg, converted, written, tmp_path, capsys):
    pytest.importorskip("ffcv")
    from tools.convert_ffcv import main
    for source, name in ((converted, "info"), (written["val"], "pattern")):
        beton = tmp_path / f"{name}.beton"
        assert main([str(source), str(beton), "--split", "val", "--workers", "2", "--json"]) == 0
        summary = json.loads(capsys.readouterr().out.splitlines()[-1])
        assert summary["found"] == summary["written"] == 360 and summary["skipped"] == 0
        assert json.loads(Path(f"{beton}.json").read_text())["classes"] == [str(d) for d in range(10)]
        loader = build_loader(demo_cfg("loader=ffcv", "data.image_size=32", f"data.ffcv.val_beton={beton}",
                                       f"data.ffcv.train_beton={beton}"), "val")
        folder = build_loader(demo_cfg("data.image_size=32"), "val")
        assert Counter(labels_of(loader)) == Counter(labels_of(folder))


def test_dali_finds_an_image_that_passes_its_check_and_still_fails(demo_cfg, converted, tmp_path, capfd):
    """A JPEG with its start and end markers but a 0×0 frame header: DALI's pipeline stops on it;
    the DALI loader's recovery probes the batch's samples, replaces the culprit and goes on."""
    pytest.importorskip("nvidia.dali")
    from skimage import data as photos
    from PIL import Image
    buffer = io.BytesIO()
    Image.fromarray(photos.astronaut()).resize((64, 64)).save(buffer, "JPEG")
    whole = buffer.getvalue()
    root = copy_set(converted, tmp_path)
    frame = whole.find(b"\xff\xc0") + 5  # SOF0: marker, length, precision, then height and width
    add_sample(root / "val-0001.tar", "sneaky", {"jpg": whole[:frame] + bytes(4) + whole[frame + 4:], "cls": b"2"})
    info = json.loads((root / "_info.json").read_text())
    info["splits"]["val"]["shard_lengths"][1] += 1
    info["splits"]["val"]["num_samples"] += 1
    (root / "_info.json").write_text(json.dumps(info))
    val = build_loader(shard_cfg(demo_cfg, "dali", f"data.root={root}", "batch_size=64"), "val")
    assert labels_of(val) == [val.source.reader.read_label(i) for i in [*range(360), 0]]
    assert [where for where, _ in val.left_out] == [f"shard {root}/val-0001.tar key sneaky"]
    assert "DALI cannot decode it" in val.left_out[0][1] and val.pipelines_built == 2
