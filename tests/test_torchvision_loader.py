"""The loader contract on the reference backend: uint8 channels-last batches, labels, shards."""
import torch

from pipelines.loading import build_loader


def collect(loader):
    images, labels = zip(*loader)
    return torch.cat(images), torch.cat(labels)


def test_batches_follow_the_contract(demo_cfg):
    cfg = demo_cfg("batch_size=50")
    loader = build_loader(cfg, "train")
    loader.set_epoch(0)
    images, labels = next(iter(loader))
    assert images.dtype == torch.uint8 and images.shape == (50, 3, 32, 32)
    assert images.is_contiguous(memory_format=torch.channels_last)
    assert labels.dtype == torch.int64 and set(labels.tolist()) <= set(range(10))
    assert loader.classes == [str(d) for d in range(10)]
    assert len(loader) == 1437 // 50


def test_val_shards_cover_the_set_once_and_are_deterministic(demo_cfg):
    cfg = demo_cfg("batch_size=64")
    full_images, full_labels = collect(build_loader(cfg, "val"))
    assert len(full_labels) == 360
    shards = [collect(build_loader(cfg, "val", rank=r, world_size=2)) for r in (0, 1)]
    assert sum(len(labels) for _, labels in shards) == 360
    # rank r holds images r, r+2, ...: together exactly the full set, in the same order interleaved
    assert torch.equal(shards[0][0], full_images[0::2]) and torch.equal(shards[1][0], full_images[1::2])
    assert torch.equal(collect(build_loader(cfg, "val"))[0], full_images)  # no randomness in val


def test_train_shards_are_disjoint_and_reshuffled_per_epoch(demo_cfg):
    cfg = demo_cfg("batch_size=1")
    loaders = [build_loader(cfg, "train", rank=r, world_size=2) for r in (0, 1)]
    orders = []
    for epoch in (0, 1):
        for loader in loaders:
            loader.set_epoch(epoch)
        shard_indices = [loader.sampler.indices() for loader in loaders]
        assert not set(shard_indices[0]) & set(shard_indices[1])
        assert len(shard_indices[0]) == len(shard_indices[1]) == 1437 // 2
        orders.append(shard_indices[0])
    assert orders[0] != orders[1]


def test_skipping_batches_resumes_the_same_epoch(demo_cfg):
    cfg = demo_cfg("batch_size=32")
    loader = build_loader(cfg, "train")
    loader.set_epoch(3)
    whole = [batch for batch in loader]
    loader.set_epoch(3, start_batch=5)
    rest = [batch for batch in loader]
    assert len(rest) == len(whole) - 5
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(whole[5:], rest))


def test_autoaugment_is_a_function_of_seed_epoch_and_index(demo_cfg):
    """timm's AutoAugment draws from python's random: seeded per image like the crops."""
    cfg = demo_cfg("batch_size=64", "data.auto_augment=v0", "data.workers=2")
    loader = build_loader(cfg, "train")
    first = []
    for epoch in (0, 0, 1):
        loader.set_epoch(epoch)
        first.append(next(iter(loader))[0])
    assert torch.equal(first[0], first[1]) and not torch.equal(first[0], first[2])
    plain = build_loader(demo_cfg("batch_size=64"), "train")
    plain.set_epoch(0)
    assert not torch.equal(next(iter(plain))[0], first[0])  # the policy did something
