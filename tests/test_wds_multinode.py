"""Two machines on one: two `accelerate launch --num_machines 2 --machine_rank {0,1}` launches
(torchrun rendezvous on 127.0.0.1, gloo, CPU) reading one shard set, as nodes on shared storage do.

    pytest -q tests/test_wds_multinode.py     # ~2 min on 2 cores
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, free_port
from wds_sets import numbered_set

pytestmark = pytest.mark.processes


def launch_two_machines(script: Path, *args: str, timeout: int = 900) -> list[subprocess.CompletedProcess]:
    """The same command on 'machine' 0 and 1 (one process each), as a SLURM job step runs it per node."""
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    launches = [subprocess.Popen(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2",
         "--machine_rank", str(machine), "--num_processes", "2", "--main_process_ip", "127.0.0.1",
         "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no",
         str(script), *args], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for machine in (0, 1)]
    results = []
    for launch in launches:
        out, err = launch.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess(launch.args, launch.returncode, out, err))
    for result in results:
        assert result.returncode == 0, result.stderr[-3000:]
    return results


@pytest.fixture(scope="module")
def numbered(digits_root, tmp_path_factory) -> Path:
    return numbered_set(digits_root, tmp_path_factory.mktemp("numbered"))


@pytest.mark.parametrize("backend", ["torchvision", pytest.param("dali", marks=pytest.mark.skipif(
    not __import__("importlib").util.find_spec("nvidia.dali"), reason="DALI not installed"))])
def test_two_machines_read_disjoint_parts_covering_the_set(backend, numbered, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    launch_two_machines(REPO / "tests" / "wds_rank_samples.py", str(tmp_path), "data.dataset=webdataset",
                        f"data.root={numbered}", f"loader={backend}", "data.image_size=32", "batch_size=32",
                        "data.workers=1", "data.dali.threads=1", "tracker=none")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["machine"] for r in ranks] == [0, 1] and {r["world"] for r in ranks} == {2}
    assert ranks[0]["steps"] == ranks[1]["steps"] == 1437 // 2 // 32  # the same number of steps
    train = [r["train"] for r in ranks]
    assert not set(train[0]) & set(train[1]) and len(set(train[0] + train[1])) == 2 * 22 * 32  # disjoint
    assert sorted(ranks[0]["val"] + ranks[1]["val"]) == list(range(360))  # val: every sample once


@pytest.mark.slow  # a 2-process training run
def test_the_trainer_runs_across_two_machines(numbered, digits_root, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    converted = tmp_path / "digits-wds"
    from pipelines.writers.shards import convert_folder
    for split in ("train", "val"):
        convert_folder(digits_root / split, converted, split=split, shard_size=300, workers=1)
    run_dir = tmp_path / "run"
    launch_two_machines(REPO / "train" / "run.py", "data.dataset=webdataset", f"data.root={converted}",
                        "data.image_size=32", "epochs=1", "method=vanilla", "model=test_resnet",
                        "eval_robust=false", "tracker=none", "batch_size=32", "log_every=1", "data.workers=1",
                        f"output_dir={run_dir}")
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if "train/loss/clean" in line] == list(range(1, 23))  # 718 // 32
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["val_images"] == 360 and summary["environment"]["processes"] == 2
