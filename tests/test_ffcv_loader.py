"""loader=ffcv: every image back with its label, shards, order and resolution (runs on it: tests/test_batch_augment_training.py).

Most tests read a folder of uniformly coloured images of many sizes: a center or random crop of
one is still that colour, so each output image says which file it came from, even after JPEG.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("ffcv")
# Freeing an ffcv Loader makes numba's dispatcher finalizer raise a harmless KeyError.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

from pipelines.backends.ffcv.betons import is_current  # noqa: E402
from pipelines.backends.ffcv.loader import train_resolution  # noqa: E402
from pipelines.writers.beton import StorageSettings, convert_imagefolder  # noqa: E402
from pipelines.loading import build_loader  # noqa: E402
from train.config import load_config  # noqa: E402
from conftest import REPO, two_processes  # noqa: E402

CLASSES = ["zebra", "apple", "mango"]  # sorted: apple 0, mango 1, zebra 2
SIZES = [(40, 30), (30, 40), (64, 64), (120, 50), (17, 23), (300, 200), (21, 90)]
COUNT = 26
SETTINGS = StorageSettings(max_resolution=64, write_mode="proportion", compress_probability=0.5)


@pytest.fixture(scope="module")
def colors(tmp_path_factory):
    """(root with images/<class>/*.png and colors.beton, colours (n, 3), labels) — file order = sorted."""
    from PIL import Image

    root = tmp_path_factory.mktemp("colors")
    grid = np.array(np.meshgrid(*[np.arange(10, 250, 45)] * 3)).reshape(3, -1).T  # ≥ 45 apart
    palette = grid[np.random.default_rng(0).permutation(len(grid))[:COUNT]].astype(np.uint8)
    files = []
    for i, color in enumerate(palette):
        name, (w, h) = CLASSES[i % 3], SIZES[i % len(SIZES)]
        path = root / "images" / name / f"{i:02d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.broadcast_to(color, (h, w, 3)).copy()).save(path)
        files.append((str(path), sorted(CLASSES).index(name), color))
    files.sort()  # the writer's order: by class folder, then name
    summary = convert_imagefolder(root / "images", root / "colors.beton", SETTINGS, workers=2)
    assert summary["written"] == COUNT
    return root, np.array([f[2] for f in files], dtype=float), [f[1] for f in files]


def colors_cfg(root: Path, *overrides: str):
    beton = root / "colors.beton"
    return load_config(["loader=ffcv", "data.dataset=imagefolder", f"data.root={root}", "data.train_dir=images",
                        "data.val_dir=images", f"data.ffcv.train_beton={beton}", f"data.ffcv.val_beton={beton}",
                        "data.image_size=16", "data.crop_ratio=0.875", "data.min_scale=0.3", "data.workers=1",
                        "batch_size=5", "tracker=none", *overrides])


def identify(images: torch.Tensor, palette: np.ndarray) -> list[int]:
    """Index of the source file of each (uniformly coloured) image."""
    pixels = images.permute(0, 2, 3, 1).reshape(len(images), -1, 3).double().numpy()
    assert (pixels.max(1) - pixels.min(1)).max() <= 8, "an output image is not one uniform colour"
    distances = np.linalg.norm(pixels.mean(1)[:, None] - palette[None], axis=2)
    assert distances.min(1).max() < 8, "an output colour matches no source file"
    return distances.argmin(1).tolist()


def read_epoch(loader, palette, epoch=0, start_batch=0):
    loader.set_epoch(epoch, start_batch)
    ids, labels, batches = [], [], []
    for images, y in loader:
        assert images.dtype == torch.uint8 and images.is_contiguous(memory_format=torch.channels_last)
        assert y.dtype == torch.int64 and y.shape == (len(images),)
        ids += identify(images, palette)
        labels += y.tolist()
        batches.append(images.clone())  # ffcv reuses the buffer for later batches
    return ids, labels, torch.cat(batches)


def test_val_gives_every_image_once_with_its_label_deterministically(colors):
    root, palette, expected_labels = colors
    loader = build_loader(colors_cfg(root), "val")
    assert loader.classes == sorted(CLASSES)
    assert (loader.num_samples, len(loader)) == (COUNT, -(-COUNT // 5))  # last batch of 1 kept
    ids, labels, images = read_epoch(loader, palette)
    assert sorted(ids) == list(range(COUNT))
    assert labels == [expected_labels[i] for i in ids]
    assert images.shape == (COUNT, 3, 16, 16)
    _, _, again = read_epoch(loader, palette)
    assert torch.equal(images, again)


def test_train_order_is_a_seeded_permutation_per_epoch_and_resumes_mid_epoch(colors):
    root, palette, expected_labels = colors
    loader = build_loader(colors_cfg(root), "train")
    assert len(loader) == COUNT // 5
    epoch0, labels, _ = read_epoch(loader, palette, epoch=0)
    assert len(epoch0) == len(set(epoch0)) == COUNT // 5 * 5  # incomplete batch dropped, no repeats
    assert labels == [expected_labels[i] for i in epoch0]
    assert read_epoch(loader, palette, epoch=0)[0] == epoch0
    epoch1 = read_epoch(loader, palette, epoch=1)[0]
    assert epoch1 != epoch0
    assert read_epoch(loader, palette, epoch=1, start_batch=2)[0] == epoch1[10:]
    assert len(loader) == COUNT // 5 - 2


def test_progressive_resizing_changes_the_train_resolution_per_epoch(colors):
    root, palette, _ = colors
    cfg = colors_cfg(root, "data.ffcv.progressive.min_res=16", "data.ffcv.progressive.max_res=32",
                     "data.ffcv.progressive.start_epoch=1", "data.ffcv.progressive.end_epoch=3")
    assert [train_resolution(cfg, e) for e in range(5)] == [16, 16, 24, 32, 32]
    loader = build_loader(cfg, "train")
    for epoch, size in [(0, 16), (2, 24), (4, 32)]:
        ids, _, images = read_epoch(loader, palette, epoch=epoch)
        assert images.shape[2:] == (size, size) and len(set(ids)) == len(ids)
    assert build_loader(cfg, "val").decoder.output_size == (16, 16)  # val stays at its size


def test_center_crop_matches_torchvision_geometry(tmp_path):
    """Same photo, FFCV val vs torchvision val (224/256-style resize + center crop)."""
    skimage_data = pytest.importorskip("skimage.data")
    from PIL import Image
    from pipelines.backends.torchvision.loader import image_transform

    (tmp_path / "val" / "cat").mkdir(parents=True)
    Image.fromarray(skimage_data.chelsea()).save(tmp_path / "val" / "cat" / "chelsea.png")  # 451×300
    convert_imagefolder(tmp_path / "val", tmp_path / "val.beton", StorageSettings(max_resolution=0, write_mode="raw"))
    cfg = load_config(["loader=ffcv", "data.dataset=imagefolder", f"data.root={tmp_path}", "data.train_dir=val",
                       f"data.ffcv.val_beton={tmp_path / 'val.beton'}", "data.image_size=96",
                       "data.crop_ratio=0.875", "tracker=none"])
    ffcv_image = next(iter(build_loader(cfg, "val")))[0][0].float()
    with Image.open(tmp_path / "val" / "cat" / "chelsea.png") as photo:
        same = image_transform(cfg, "val")(photo.convert("RGB")).float()
        cfg.data.crop_ratio = 0.7
        other = image_transform(cfg, "val")(photo.convert("RGB")).float()
    difference = (ffcv_image - same).abs().mean().item()
    assert difference < 6, difference  # interpolation differences only
    assert (ffcv_image - other).abs().mean().item() > 2 * difference  # the check can tell geometries apart


def test_is_current_notices_other_settings_and_incomplete_files(colors, tmp_path):
    root, _, _ = colors
    beton = root / "colors.beton"
    assert is_current(beton, root / "images", SETTINGS)
    assert not is_current(beton, root / "images", StorageSettings(max_resolution=64, jpeg_quality=80))
    assert not is_current(beton, root, SETTINGS)  # another source folder
    copy = tmp_path / "copy.beton"
    copy.write_bytes(beton.read_bytes()[:-1000])
    Path(f"{copy}.json").write_text(Path(f"{beton}.json").read_text())
    assert not is_current(copy, root / "images", SETTINGS)


SHARD_SCRIPT = """
import json, sys
sys.path[:0] = [{repo!r}, {tests!r}]
from accelerate import Accelerator
from pipelines.loading import build_loader
from test_ffcv_loader import colors_cfg
state = Accelerator()  # as train/run.py: reads ACCELERATE_USE_CPU
assert state.num_processes == 2, state
out = {{}}
for split in ("train", "val"):
    loader = build_loader(colors_cfg(__import__("pathlib").Path({root!r})), split,
                          rank=state.process_index, world_size=state.num_processes)
    loader.set_epoch(1)
    out[split] = [[x.double().mean((1, 2)).tolist() for x in images] for images, _ in loader]
json.dump(out, open(f"{out_dir}/rank{{state.process_index}}.json", "w"))
"""


@pytest.mark.processes
def test_two_processes_read_disjoint_shards_covering_val_once(colors, tmp_path):
    root, palette, _ = colors
    script = tmp_path / "shard.py"
    script.write_text(SHARD_SCRIPT.format(repo=str(REPO), tests=str(REPO / "tests"), root=str(root), out_dir=str(tmp_path)))
    # accelerate 1.15: `--cpu --num_processes 2` starts one process, and `--multi_gpu` without CUDA
    # starts two that each believe they are alone; with ACCELERATE_USE_CPU they form a gloo group.
    result = subprocess.run([*two_processes(), str(script)], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "ACCELERATE_USE_CPU": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    shards = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]

    def ids(split, rank):
        means = np.array([m for batch in shards[rank][split] for m in batch]).reshape(-1, 3)
        return np.linalg.norm(means[:, None] - palette[None], axis=2).argmin(1).tolist()

    val = ids("val", 0) + ids("val", 1)
    assert sorted(val) == list(range(COUNT))  # every val image once over both processes
    train0, train1 = ids("train", 0), ids("train", 1)
    assert len(train0) == len(train1) == COUNT // 2 // 5 * 5  # equal shards, whole batches
    assert not set(train0) & set(train1)


def test_an_epoch_keeps_the_runs_torch_threads(colors):
    """ffcv sets torch's threads to its workers' count at every epoch; the model keeps the run's."""
    root, palette, _ = colors
    loader = build_loader(colors_cfg(root, "data.workers=1"), "val")
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        read_epoch(loader, palette)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(threads)


@pytest.mark.gpu
@pytest.mark.timeout(120)  # `pytest -m gpu` must finish in 2 minutes: a hang fails here
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches_equal_cpu_batches(colors):
    """On CUDA ffcv copies on its own stream (ToDevice): same val images, on the device, channels-last."""
    root, palette, _ = colors
    cfg = colors_cfg(root)
    cpu_images = read_epoch(build_loader(cfg, "val"), palette)[2]
    loader = build_loader(cfg, "val", device="cuda")
    loader.set_epoch(0)
    batches = []
    for images, labels in loader:
        assert images.is_cuda and labels.is_cuda and images.is_contiguous(memory_format=torch.channels_last)
        batches.append(images.cpu())
    assert torch.equal(torch.cat(batches), cpu_images)
