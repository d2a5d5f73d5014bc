"""tools/evaluate.py reads WebDataset shards (--data: a shard set's folder, or a .tar pattern) as it
reads the ImageFolder they were made from: the same numbers on the trained demo run."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import tool_in_process
from pipelines.writers.shards import convert_folder
from tools.robustness import sets
from tools.robustness.load import load_any
from wds_sets import write_with_shardwriter


@pytest.fixture(autouse=True)
def index_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def test_evaluate_reads_shards_as_the_folder(trained_demo_run, digits_root, tmp_path, one_thread):
    from accelerate import Accelerator
    model, cfg, classes = load_any(trained_demo_run / "final_model")
    ctx = sets.EvalContext(model, cfg, classes, Accelerator(cpu=True), workers=0)
    folder = sets.clean(ctx, digits_root / "val")
    converted = tmp_path / "wds"
    convert_folder(digits_root / "val", converted, split="val", shard_size=100, workers=1)
    pattern = write_with_shardwriter(digits_root / "val", tmp_path / "sw", maxcount=100)  # no names: model indices
    for source in (converted, Path(pattern)):
        shards = sets.clean(ctx, source)
        assert shards["images"] == folder["images"] == 360, source
        assert (shards["top1"], shards["top5"]) == (folder["top1"], folder["top5"])
        assert shards["loss"] == pytest.approx(folder["loss"])  # summed in another order
    result = tool_in_process("evaluate.py", trained_demo_run, "--data", converted, "--workers", "0", "--json",
                             tmp_path / "out.json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "out.json").read_text())["clean"]["images"] == 360
