"""tools/bench_step.py runs end to end and its --json line has every method's ratio (no timing asserts)."""
import json
import subprocess
import sys

import pytest

from conftest import REPO


def test_bench_step_prints_ratios_as_json():
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "bench_step.py"), "--batch", "10", "--size", "32", "--warmup", "1",
         "--rounds", "1", "--steps", "1", "--methods", "advprop_pgd1,advprop_pgd3,fast_advprop", "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ratios = json.loads(result.stdout.strip().splitlines()[-1])
    assert list(ratios) == ["vanilla", "advprop_pgd1", "advprop_pgd3", "fast_advprop"]
    assert ratios["vanilla"] == 1.0 and all(r > 0 for r in ratios.values())
    assert "× vanilla" in result.stdout
    assert "one PGD step with frozen weights" in result.stdout


def test_pgd_step_cost_is_the_slope_over_attack_steps():
    from tools.bench_step import pgd_step_cost

    assert pgd_step_cost({"vanilla": 1.0, "advprop_pgd1": 2.8, "advprop_pgd5": 5.9}) == pytest.approx(0.775)
    assert pgd_step_cost({"vanilla": 1.0, "advprop_pgd1": 2.8, "fast_advprop": 1.3}) is None
