"""tools/bench_gpu.py without a GPU and without running its parts: every command it plans, for the
GPU and for --dry-run, parses (train/run.py's overrides through load_config, each tool's flags
through its own parser, the test files it names hold gpu-marked tests); a part the budget no longer
holds is reported, not run."""
import importlib
import json
from pathlib import Path

import pytest

from conftest import REPO, tool_in_process
from tools.bench_gpu import DRY, FULL, PART_NAMES, plan
from train.config import load_config


def planned(sizes, tmp_path) -> list:
    return plan(sizes, tmp_path / "work", tmp_path / "cache")


def check_parses(command: list[str]) -> str:
    """What the command runs, after checking its arguments the way it will read them."""
    if "train/run.py" in command:
        load_config(command[command.index("train/run.py") + 1:])
        return "train/run.py"
    if command[1:3] == ["-m", "pytest"]:
        files = [arg for arg in command if arg.endswith(".py")]
        assert files and all("mark.gpu" in (REPO / name).read_text() for name in files), files
        return "pytest"
    script = next(arg for arg in command if arg.startswith("tools/"))
    tool = importlib.import_module(script.removesuffix(".py").replace("/", "."))
    tool.parse_args(command[command.index(script) + 1:])
    return script


@pytest.mark.parametrize("sizes", [FULL, DRY], ids=["gpu", "dry-run"])
def test_every_planned_command_parses(sizes, tmp_path):
    parts = planned(sizes, tmp_path)
    assert ["versions", "photos"] + [part.name for part in parts] == PART_NAMES
    ran = {part.name: check_parses(part.command) for part in parts}
    assert set(ran.values()) == {"train/run.py", "pytest", "tools/bench_step.py", "tools/bench_loaders.py"}
    assert ran["train"] == ran["effnet_epoch"] == "train/run.py"


def test_a_bad_override_in_a_plan_would_be_caught(tmp_path):
    command = planned(FULL, tmp_path)[0].command
    with pytest.raises(Exception, match="nonsense"):
        check_parses([*command, "nonsense=1"])
    with pytest.raises(SystemExit):
        check_parses([arg.replace("--amp", "--amplifier") for arg in planned(FULL, tmp_path)[3].command])


def test_parts_the_budget_no_longer_holds_are_reported_not_run(tmp_path):
    result = tool_in_process("bench_gpu.py", "--dry-run", "--out", tmp_path, "--only", "steps", "train",
                             "--budget", "5")
    assert result.returncode == 0, result.stderr[-3000:]
    parts = json.loads((tmp_path / "results.json").read_text())["parts"]
    assert parts == {"steps": {"status": "not run (out of time)", "seconds": 0.0},
                     "train": {"status": "not run (out of time)", "seconds": 0.0}}
    rows = [line.split(" | ") for line in (tmp_path / "table.md").read_text().splitlines()
            if line.startswith("| ") and "---" not in line]
    cells = {row[0].lstrip("| "): row[1] for row in rows[1:]}
    assert cells["vanilla ResNet-50 b256 bf16 channels-last, model only, img/s: eager / compiled"] == \
        "not run (out of time) / –"
    assert result.stdout.rstrip().endswith(Path(tmp_path / "table.md").read_text().rstrip())  # and printed
