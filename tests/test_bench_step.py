"""tools/bench_step.py measures what it says: its ratios are its own step times' ratios, more
attack steps cost more, the attack-step cost is their slope (no timing thresholds here)."""
import json
import re
import subprocess
import sys

import pytest

from conftest import REPO


def test_bench_step_reports_consistent_ratios():
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "bench_step.py"), "--batch", "16", "--size", "32", "--warmup", "1",
         "--rounds", "1", "--steps", "2", "--methods", "advprop_pgd1,advprop_pgd5,fast_advprop", "--threads", "1",
         "--clock", "process", "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(result.stdout.strip().splitlines()[-1])
    rows = {m.group(1): (float(m.group(2)), float(m.group(3)))
            for m in re.finditer(r"^(\w+)\s+(\d+)\s+([\d.]+)\s", result.stdout, re.MULTILINE)}
    assert list(rows) == ["vanilla", "advprop_pgd1", "advprop_pgd5", "fast_advprop"]
    for name, (ms, ratio) in rows.items():  # each ratio is its best step time over vanilla's
        assert results[name] == pytest.approx(ratio, abs=0.006)
        assert results[name] == pytest.approx(ms / rows["vanilla"][0], rel=0.1, abs=0.05)
    assert results["vanilla"] == 1.0
    assert results["advprop_pgd5"] > results["advprop_pgd1"] > 1.5  # two forwards and an attack cost more
    assert results["attack_step"] == pytest.approx((results["advprop_pgd5"] - results["advprop_pgd1"]) / 4, abs=0.002)
    assert results["vanilla_img_per_s"] > 0
    assert "≤2.78" in result.stdout  # the CPU regression guard is shown beside advprop PGD-1


def test_pgd_step_cost_is_the_slope_over_attack_steps():
    from tools.bench_step import pgd_step_cost

    assert pgd_step_cost({"vanilla": 1.0, "advprop_pgd1": 2.8, "advprop_pgd5": 5.9}) == pytest.approx(0.775)
    assert pgd_step_cost({"vanilla": 1.0, "advprop_pgd1": 2.8, "fast_advprop": 1.3}) is None
