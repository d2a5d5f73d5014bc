"""A loader backend is one record: a toy backend registered here is configured, validated, trained
end to end, resumed, reported and benchmarked from its record alone, reading the shared sources in
the shared order (pipelines/sampling.py) and replacing a failed image by the shared rule
(pipelines/substitution.py)."""
from __future__ import annotations

import importlib.metadata
import json
import shutil
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import one_error_line, train_in_process
from common.errors import UserInputError
from pipelines.backends import BACKENDS, Backend, register
from pipelines.batches import to_device_batch
from pipelines.loading import build_loader, prepare_dataset
from pipelines.sampling import ShardSampler
from pipelines.sources.image_decode import decode_bytes
from pipelines.substitution import LeftOut, first_readable
from train.config import ConfigError, load_config

QUICK = ["model=test_resnet", "method=vanilla", "tracker=none", "eval_robust=false", "data.workers=0",
         "data.dataset=imagefolder", "image_log_every=0", "log_every=5"]


# ----------------------------------------------------------------------------- a toy backend

@dataclass
class PlainConfig:
    resample: str = "bilinear"  # how images are resized to data.image_size: bilinear | nearest


class PlainLoader:
    """Decodes in this process, resizes the whole image (no augmentation): the Loader contract and
    nothing more."""

    def __init__(self, cfg, split, source, *, rank, world_size, device):
        self.source, self.classes, self.device = source, source.classes, device
        self.size, self.resample = cfg.data.image_size, getattr(Image.Resampling, cfg.data.plain.resample.upper())
        self.left_out = LeftOut(source.left_out, source.failure_line)
        self.sampler = ShardSampler(len(source), shuffle=split == "train", seed=cfg.seed, rank=rank,
                                    world_size=world_size, batch_size=cfg.batch_size)
        self.num_samples = len(self.sampler)

    def __len__(self) -> int:
        return self.sampler.num_batches

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.sampler.set_epoch(epoch, start_batch)
        self.num_samples = len(self.sampler)

    def decode(self, index: int):
        sample = self.source.read(index)
        try:
            image = decode_bytes(sample.image).resize((self.size, self.size), self.resample)
        except Exception as error:
            raise self.source.unreadable(index, error) from None
        return torch.from_numpy(np.asarray(image)).permute(2, 0, 1), sample.label

    def __iter__(self):
        indices = self.sampler.indices()
        for start in range(0, len(indices), self.sampler.batch_size):
            images, labels = [], []
            for index in indices[start:start + self.sampler.batch_size]:
                (image, label), failures = first_readable(index, len(self.source), self.decode)
                for where, reason, unit in failures:
                    self.left_out.failed_mid_run(where, reason, unit)
                images.append(image)
                labels.append(label)
            yield to_device_batch(torch.stack(images), torch.tensor(labels), self.device)


def make_loader(cfg, split, source, *, rank, world_size, device):
    return PlainLoader(cfg, split, source, rank=rank, world_size=world_size, device=device)


PLAIN = Backend(
    name="plain", module=__name__, install_hint="pip install numpy pillow", options=PlainConfig,
    checks=lambda cfg: [(cfg.data.plain.resample in ("bilinear", "nearest"), "data.plain.resample",
                         "must be bilinear or nearest")],
    may_change=("data.plain",), libraries={"plain": "numpy"},
    bench_overrides=lambda cfg, folder, cache_dir: ["data.plain.resample=nearest"],
    bench_label=lambda cfg: f"plain, {cfg.data.plain.resample}")


@pytest.fixture
def plain():
    register(PLAIN)
    yield PLAIN
    del BACKENDS[PLAIN.name]


# ----------------------------------------------------------------------------- the tests

def test_a_registered_backend_is_configured_and_validated_from_its_record(plain, few_digits):
    cfg = load_config([f"data.root={few_digits}", "loader=plain"])
    assert cfg.data.plain.resample == "bilinear"  # its options node, with its defaults
    with pytest.raises(ConfigError, match=r"data\.plain\.resample: 'cubic' must be bilinear or nearest"):
        load_config([f"data.root={few_digits}", "loader=plain", "data.plain.resample=cubic"])
    with pytest.raises(ConfigError, match="data.plain.nonsense"):
        load_config([f"data.root={few_digits}", "loader=plain", "data.plain.nonsense=1"])
    with pytest.raises(ConfigError, match="data.auto_augment: 'v0' is applied by loader=torchvision or loader=dali only"):
        load_config([f"data.root={few_digits}", "loader=plain", "data.auto_augment=v0"])
    with pytest.raises(ConfigError, match=r"loader: 'nowhere' must be one of \('torchvision', 'ffcv', 'dali', 'plain'\)"):
        load_config([f"data.root={few_digits}", "loader=nowhere"])


def test_a_registered_backend_reads_the_shared_sources_in_the_shared_order(plain, few_digits, tmp_path):
    cfg = load_config([f"data.root={few_digits}", "loader=plain", *QUICK, "batch_size=16", "data.image_size=16"])
    prepare_dataset(cfg)
    shards = [build_loader(cfg, "train", rank=rank, world_size=2) for rank in (0, 1)]
    reference = build_loader(load_config([f"data.root={few_digits}", *QUICK, "batch_size=16"]), "train", world_size=2)
    for loader in shards:
        loader.set_epoch(3)
    reference.set_epoch(3)
    assert [int(y) for _, labels in shards[0] for y in labels] == [int(y) for _, labels in reference for y in labels]
    seen = [index for loader in shards for index in loader.sampler.indices()]
    assert len(seen) == len(set(seen)) == 192  # 200 images, disjoint halves of whole batches

    victim = sorted((few_digits / "train" / "3").iterdir())[0]
    copy = tmp_path / "data"
    shutil.copytree(few_digits, copy)
    (copy / "train" / "3" / victim.name).write_bytes(b"not an image")  # breaks after the check
    cfg = load_config([f"data.root={copy}", "loader=plain", *QUICK, "batch_size=16", "data.image_size=16",
                       "data.check_images=false"])
    train = build_loader(cfg, "train")
    train.set_epoch(0)
    assert sum(len(labels) for _, labels in train) == 192  # the next image stood in
    assert [path for path, _ in train.left_out] == [str(copy / "train" / "3" / victim.name)]


def test_a_registered_backend_trains_resumes_and_is_reported(plain, few_digits, tmp_path, one_thread):
    run_dir = tmp_path / "run"
    common = [f"data.root={few_digits}", f"output_dir={run_dir}", "loader=plain", *QUICK, "batch_size=32"]
    train_in_process(*common, "epochs=1")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["environment"]["loader"] == "plain"
    assert summary["environment"]["plain"] == importlib.metadata.version("numpy")  # its libraries, from the record
    assert summary["val_images"] == 360 and summary["clean_top1"] > 10

    # its options may change on resume (its record's may_change); the data it reads may not
    resumed = train_in_process(*common, "epochs=2", "data.plain.resample=nearest")
    assert "resuming from" in resumed.stdout
    assert json.loads((run_dir / "checkpoints" / "last" / "train_state.json").read_text())["epoch"] == 2
    refused = train_in_process(*common, "epochs=3", "data.image_size=16", check=False)
    assert "data.image_size (32 → 16)" in one_error_line(refused)


def test_a_backend_whose_module_is_missing_says_how_to_install_it(few_digits):
    register(Backend(name="absent", module="no_such_loader_module", install_hint="pip install absent-loader"))
    try:
        cfg = load_config([f"data.root={few_digits}", "loader=absent", "tracker=none"])
        for action in (lambda: prepare_dataset(cfg), lambda: build_loader(cfg, "train")):
            with pytest.raises(UserInputError, match="loader=absent is not available here .*pip install absent-loader"):
                action()
    finally:
        del BACKENDS["absent"]


def test_a_registered_backend_is_benchmarked_and_named_in_the_loader_table(plain, few_digits, capsys):
    from tools.bench_loaders import main
    from tools.readme_figures import loader_table, loader_table_names

    assert main(["--data", str(few_digits / "val"), "--backends", "plain", "torchvision", "--workers", "0",
                 "--epochs", "2", "--image-size", "16", "--batch-size", "32", "--json"]) == 0
    out = capsys.readouterr().out
    summary = json.loads(out.strip().splitlines()[-1])
    assert [run["label"] for run in summary["runs"]] == ["plain, nearest", "torchvision"]  # its bench_overrides
    assert summary["plain"] > 0 and summary["plain_ratio"] > 0
    assert "| plain, nearest |" in loader_table(out.strip().splitlines()[-1])
    assert "plain, bilinear" in loader_table_names()  # the table's expected rows: the records' labels
