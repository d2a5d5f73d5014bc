"""tools/bench_step.py runs end to end and its --json line has every method's ratio (no timing asserts)."""
import json
import subprocess
import sys

from conftest import REPO


def test_bench_step_prints_ratios_as_json():
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "bench_step.py"), "--batch", "10", "--size", "32", "--warmup", "1",
         "--rounds", "1", "--steps", "1", "--methods", "advprop_pgd1,fast_advprop", "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ratios = json.loads(result.stdout.strip().splitlines()[-1])
    assert list(ratios) == ["vanilla", "advprop_pgd1", "fast_advprop"]
    assert ratios["vanilla"] == 1.0 and all(r > 0 for r in ratios.values())
    assert "× vanilla" in result.stdout
