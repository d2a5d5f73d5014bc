"""The GPU session, rehearsed on the CPU: tools/gpu_session.sh --dry-run runs every part of
tools/bench_gpu.py with tiny sizes and leaves what the device call would bring back; a part the
budget no longer holds is reported, not run."""
import json
import os
import subprocess
import sys
import tarfile

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO))
from tools.bench_gpu import PART_NAMES  # noqa: E402


def measured_cells(table_md: str) -> dict[str, str]:
    rows = [line.split(" | ") for line in table_md.splitlines() if line.startswith("| ") and "---" not in line]
    return {row[0].lstrip("| "): row[1] for row in rows[1:]}


@pytest.mark.slow  # every part once: ~3 min on 2 idle cores (imports, DALI's numba kernels, two small runs)
@pytest.mark.timeout(1500)
def test_dry_run_runs_every_part_and_brings_back_what_the_device_would(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "GPU_SESSION_WORK": str(tmp_path / "work"),
           "GPU_SESSION_SECONDS": "1400"}
    result = subprocess.run(["bash", str(REPO / "tools" / "gpu_session.sh"), "--dry-run"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=1450)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert [str(f) for f in files] == ["logs.tar.gz", "results.json", "session.log", "table.md"]  # ≤ 8 come back
    assert all((out / f).stat().st_size < 16 * 2**20 for f in files)
    results = json.loads((out / "results.json").read_text())
    assert {name: part["status"] for name, part in results["parts"].items()} == {name: "ok" for name in PART_NAMES}
    assert results["versions"]["python"] and "not importable" not in results["versions"]["nvidia.dali"]
    cells = measured_cells((out / "table.md").read_text())
    assert len(cells) == 15 and not [row for row, cell in cells.items() if "–" in cell or "not run" in cell], cells
    assert "skipped" in cells["pytest -m gpu (beside the compiled EfficientNet epoch)"]  # no CUDA here
    with tarfile.open(out / "logs.tar.gz") as logs:
        names = logs.getnames()
    assert {f"{name}.log" for name in PART_NAMES if name not in ("versions", "photos")} <= set(names)
    assert "tests.xml" in names and "train_run/summary.json" in names
    session_log = (out / "session.log").read_text()
    assert "== versions" in session_log and "== tools/bench_gpu.py" in session_log and "== done" in session_log
    assert "could not install" not in session_log and "install failed" not in session_log  # a carry here: checked


def test_parts_the_budget_no_longer_holds_are_reported_not_run(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "tools" / "bench_gpu.py"), "--dry-run", "--out", str(tmp_path),
                             "--only", "steps", "train", "--budget", "5"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    parts = json.loads((tmp_path / "results.json").read_text())["parts"]
    assert parts == {"steps": {"status": "not run (out of time)", "seconds": 0.0},
                     "train": {"status": "not run (out of time)", "seconds": 0.0}}
    cells = measured_cells((tmp_path / "table.md").read_text())
    assert cells["vanilla ResNet-50 b256 bf16 channels-last, model only, img/s: eager / compiled"] == \
        "not run (out of time) / –"
