"""The DALI backend (pipelines/backends/dali/loader.py) on real images: the digits demo set and JPEGs cut from
scikit-image's photos. CPU pipeline here; the CUDA ("mixed" nvJPEG) path is in the gpu-marked tests.

    pytest -q tests/test_dali_loader.py
(DALI trains advprop and fast_advprop in tests/test_batch_augment_training.py.)
"""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from common.errors import UserInputError
from pipelines.loading import build_loader, prepare_dataset

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module")
def dali():
    return pytest.importorskip("nvidia.dali")


@pytest.fixture(scope="module")
def photo_root(tmp_path_factory):
    """A small ImageFolder of real photo JPEGs (~300×450, like ImageNet's), uneven class sizes, a
    stray non-image file; class folder names whose sorted order differs from creation order."""
    from PIL import Image
    from skimage import data as photos

    root = tmp_path_factory.mktemp("photos")
    sources = {"rocket": photos.rocket(), "cat": photos.chelsea(), "coffee": photos.coffee(),
               "astronaut": photos.astronaut()}
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for count, (name, photo) in enumerate(sources.items(), start=3):
            folder = root / split / name
            folder.mkdir(parents=True)
            h, w = photo.shape[:2]
            for k in range(count):  # distinct 3/4-size windows of the photo
                y, x = rng.integers(0, h // 4), rng.integers(0, w // 4)
                Image.fromarray(photo[y:y + 3 * h // 4, x:x + 3 * w // 4]).save(folder / f"{k}.jpg", quality=90)
            (folder / "notes.txt").write_text("not an image: every backend skips it")
    return root


def photo_cfg(demo_cfg, root, *overrides):
    # crop_ratio 0.8 → resize to 80, crop 64: an even margin, where DALI's and torchvision's centre
    # crops agree to the pixel (for odd margins they round the half-pixel offset differently).
    return demo_cfg(f"data.root={root}", "data.dataset=imagefolder", "data.image_size=64",
                    "data.crop_ratio=0.8", "data.dali.threads=2", *overrides)


def collect(loader):
    batches = list(loader)
    return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches]), batches


def epoch_labels(loader, dataset_labels):
    """The labels the loader must yield, in order: its own file list of this epoch."""
    return torch.tensor([dataset_labels[i] for i in loader.sampler.indices()])


# ---------------------------------------------------------------------------------------------

def test_val_round_trip_matches_torchvision(dali, demo_cfg, photo_root):
    cfg = photo_cfg(demo_cfg, photo_root, "loader=dali", "batch_size=4")
    loader = build_loader(cfg, "val")
    reference = build_loader(photo_cfg(demo_cfg, photo_root, "loader=torchvision", "batch_size=4"), "val")
    images, labels, batches = collect(loader)
    ref_images, ref_labels, _ = collect(reference)

    assert loader.classes == ["astronaut", "cat", "coffee", "rocket"] == reference.classes
    assert len(images) == loader.num_samples == 18 and len(batches) == len(loader) == 5  # last batch: 2
    assert [len(x) for x, _ in batches] == [4, 4, 4, 4, 2]
    assert labels.dtype == torch.int64 and labels.shape == (18,)
    assert torch.equal(labels, ref_labels)
    x = batches[0][0]
    assert x.dtype == torch.uint8 and x.shape == (4, 3, 64, 64)
    assert x.is_contiguous(memory_format=torch.channels_last)
    # Same pixels as torchvision's Resize + CenterCrop, image by image (decode/resize differ < 1 level).
    difference = (images.float() - ref_images.float()).abs().mean(dim=(1, 2, 3))
    assert difference.max() < 1.0, difference


def test_val_is_deterministic(dali, demo_cfg, photo_root):
    cfg = photo_cfg(demo_cfg, photo_root, "loader=dali", "batch_size=5")
    loader = build_loader(cfg, "val")
    first, first_labels, _ = collect(loader)
    loader.set_epoch(3)  # val ignores the epoch
    second, second_labels, _ = collect(loader)
    fresh, fresh_labels, _ = collect(build_loader(cfg, "val"))
    assert torch.equal(first, second) and torch.equal(first, fresh)
    assert torch.equal(first_labels, second_labels) and torch.equal(first_labels, fresh_labels)


def test_two_val_shards_count_every_image_once(dali, demo_cfg, photo_root):
    reference, _, _ = collect(build_loader(photo_cfg(demo_cfg, photo_root, "loader=torchvision"), "val"))
    cfg = photo_cfg(demo_cfg, photo_root, "loader=dali", "batch_size=4")
    shards = [collect(build_loader(cfg, "val", rank=rank, world_size=2))[0] for rank in (0, 1)]
    assert [len(s) for s in shards] == [9, 9]
    # Identify every yielded image by content: its nearest torchvision image, and that it is near.
    yielded = torch.cat(shards).float()
    distance = (yielded[:, None] - reference[None].float()).abs().mean(dim=(2, 3, 4))
    nearest = distance.min(dim=1)
    assert nearest.values.max() < 1.0
    assert sorted(nearest.indices.tolist()) == list(range(len(reference)))  # disjoint and complete


def test_two_train_shards_are_disjoint_equal_and_ordered(dali, demo_cfg, digits_root):
    cfg = demo_cfg("loader=dali", "data.dali.threads=2")
    loaders = [build_loader(cfg, "train", rank=rank, world_size=2) for rank in (0, 1)]
    dataset_labels = loaders[0].source.labels
    shard_indices = []
    for loader in loaders:
        loader.set_epoch(1)
        images, labels, batches = collect(loader)
        # DALI yields exactly this process's list, in order, in full batches only.
        assert torch.equal(labels, epoch_labels(loader, dataset_labels))
        assert all(len(x) == cfg.batch_size for x, _ in batches) and len(batches) == len(loader)
        assert images.shape[1:] == (3, 32, 32) and images.dtype == torch.uint8
        shard_indices.append(loader.sampler.indices())
    n = len(dataset_labels)
    per_process = (n // 2) // cfg.batch_size * cfg.batch_size
    assert [len(s) for s in shard_indices] == [per_process, per_process]
    assert not set(shard_indices[0]) & set(shard_indices[1])


def test_order_is_seeded_per_epoch_and_resumes_mid_epoch(dali, demo_cfg, digits_root):
    cfg = demo_cfg("loader=dali", "data.dali.threads=2")
    loader = build_loader(cfg, "train")
    loader.set_epoch(2)
    full_images, full, _ = collect(loader)
    again_images, again, _ = collect(loader)
    assert torch.equal(full, again)  # (seed, epoch) fixes the images and their order
    assert not torch.equal(full_images, again_images)  # one pipeline goes on drawing new crops
    batches_per_epoch = len(loader)

    loader.set_epoch(3)
    assert not torch.equal(collect(loader)[1], full)  # a new order each epoch
    assert loader.pipelines_built == 1  # kept across passes and epochs

    resumed = build_loader(cfg, "train")  # a fresh process after a restart
    resumed.set_epoch(2, start_batch=5)
    assert len(resumed) == batches_per_epoch - 5
    _, tail, batches = collect(resumed)
    assert len(batches) == len(resumed)
    assert torch.equal(tail, full[5 * cfg.batch_size:])


def test_an_abandoned_epoch_does_not_leak_into_the_next(dali, demo_cfg, digits_root):
    """DALI cannot reset a pipeline mid-epoch (a stop request, an exception): the next pass builds
    afresh, and its batches are its own epoch's, none prefetched from the one left behind."""
    cfg = demo_cfg("loader=dali", "data.dali.threads=2")
    loader = build_loader(cfg, "train")
    loader.set_epoch(0)
    for batch_number, _ in enumerate(loader):
        if batch_number == 2:
            break
    loader.set_epoch(1)
    _, labels, _ = collect(loader)
    assert torch.equal(labels, epoch_labels(loader, loader.source.labels))
    assert loader.pipelines_built == 2
    loader.set_epoch(2)
    _, labels, _ = collect(loader)
    assert torch.equal(labels, epoch_labels(loader, loader.source.labels)) and loader.pipelines_built == 2


def test_train_augments_real_photos(dali, demo_cfg, photo_root):
    cfg = photo_cfg(demo_cfg, photo_root, "loader=dali", "batch_size=4", "data.hflip=true", "data.min_scale=0.25")
    loader = build_loader(cfg, "train")
    epochs = []
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        images, labels, batches = collect(loader)
        assert len(images) == loader.num_samples == 16  # 18 images, the incomplete last batch dropped
        assert images.shape[1:] == (3, 64, 64) and batches[0][0].is_contiguous(memory_format=torch.channels_last)
        epochs.append((images, labels))
    assert not torch.equal(epochs[0][1], epochs[1][1])  # reshuffled
    assert images.float().std() > 20  # real photo content, not a constant fill


def test_missing_dali_is_one_clear_error(demo_cfg, monkeypatch):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # `import nvidia.dali` now fails
    monkeypatch.delitem(sys.modules, "pipelines.backends.dali.loader", raising=False)
    cfg = demo_cfg("loader=dali")
    for action in (lambda: prepare_dataset(cfg), lambda: build_loader(cfg, "train")):
        with pytest.raises(UserInputError, match="loader=dali is not available.*pip install nvidia-dali-cuda130"):
            action()


def test_bad_dali_settings_are_rejected(demo_cfg):
    from train.config import ConfigError
    with pytest.raises(ConfigError, match="data.dali.threads"):
        demo_cfg("loader=dali", "data.dali.threads=0")


# ---------------------------------------------------------------------------------------------
# CUDA: nvJPEG ("mixed") decoding and GPU resize on the process's device

@pytest.mark.gpu
@pytest.mark.timeout(120)  # `pytest -m gpu` must finish in 2 minutes: a hang fails here
@requires_cuda
def test_mixed_decoding_on_cuda_matches_cpu_pipeline(dali, demo_cfg, photo_root):
    cfg = photo_cfg(demo_cfg, photo_root, "loader=dali", "batch_size=4")
    gpu_images, gpu_labels, batches = collect(build_loader(cfg, "val", device="cuda:0"))
    cpu_images, cpu_labels, _ = collect(build_loader(cfg, "val", device="cpu"))
    x, y = batches[0]
    assert x.device.type == "cuda" and y.device.type == "cuda" and y.dtype == torch.int64
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(gpu_labels.cpu(), cpu_labels)
    difference = (gpu_images.cpu().float() - cpu_images.float()).abs().mean(dim=(1, 2, 3))
    assert difference.max() < 2.0, difference  # nvJPEG and libjpeg-turbo round differently


@pytest.mark.gpu
@pytest.mark.timeout(120)  # `pytest -m gpu` must finish in 2 minutes: a hang fails here
@requires_cuda
def test_mixed_train_follows_the_epoch_list_on_cuda(dali, demo_cfg, photo_root):
    cfg = photo_cfg(demo_cfg, photo_root, "loader=dali", "batch_size=4")
    loader = build_loader(cfg, "train", device="cuda:0")
    loader.set_epoch(1, start_batch=1)
    images, labels, batches = collect(loader)
    assert images.device.type == "cuda" and images.shape == (12, 3, 64, 64)
    assert torch.equal(labels.cpu(), epoch_labels(loader, loader.source.labels))


@pytest.mark.gpu
@pytest.mark.timeout(120)  # `pytest -m gpu` must finish in 2 minutes: a hang fails here
@requires_cuda
@pytest.mark.parametrize("policy", ["", "v0"])  # v0: AutoAugment on DALI's GPU operators, after nvJPEG
def test_mixed_train_pipeline_is_kept_across_epochs_on_cuda(dali, demo_cfg, photo_root, policy):
    cfg = photo_cfg(demo_cfg, photo_root, "loader=dali", "batch_size=4", "data.hflip=true", "data.min_scale=0.25",
                    f"data.auto_augment='{policy}'")
    loader = build_loader(cfg, "train", device="cuda:0")
    epochs = []
    for epoch in (0, 1, 2):
        loader.set_epoch(epoch)
        images, labels, batches = collect(loader)
        assert images.device.type == "cuda" and images.dtype == torch.uint8 and images.shape == (16, 3, 64, 64)
        assert batches[0][0].is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(labels.cpu(), epoch_labels(loader, loader.source.labels))  # this epoch's list, in order
        assert images.float().std() > 20  # real photo content, not a constant fill
        epochs.append(images)
    assert loader.pipelines_built == 1  # one nvJPEG pipeline for every epoch
    assert not torch.equal(epochs[0], epochs[1])
