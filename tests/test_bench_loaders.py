"""tools/bench_loaders.py runs every installed backend on one folder and reports ratios (no timing asserts)."""
import importlib.util
import json

from conftest import tool_in_process


def test_bench_loaders_measures_each_backend_on_the_same_images(digits_root, tmp_path):
    backends = ["torchvision"] + [b for b, module in (("ffcv", "ffcv"), ("dali", "nvidia.dali"))
                                  if importlib.util.find_spec(module) is not None]
    result = tool_in_process("bench_loaders.py", "--data", digits_root / "val", "--backends", *backends,
                             "--workers", "1", "--epochs", "2", "--batch-size", "32", "--image-size", "32",
                             "--cache-dir", tmp_path, "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["skipped"] == {}
    runs = {run["backend"]: run for run in summary["runs"]}
    assert list(runs) == backends
    for name, run in runs.items():
        assert run["images_per_epoch"] == 360 // 32 * 32  # the digits val split, whole train batches
        assert summary[name] == run["img_s"] > 0
        if name != "torchvision":
            assert summary[f"{name}_ratio"] == run["img_s"] / summary["torchvision"]
    assert "× torchvision" in result.stdout
    if "ffcv" in backends:  # the .beton is cached under --cache-dir with its storage settings in the name
        assert list(tmp_path.glob("val-r500-proportion-p0.5-q90.beton"))


def test_bench_loaders_applies_auto_augment_where_the_backend_can(digits_root, tmp_path):
    backends = ["torchvision", "ffcv"] + (["dali"] if importlib.util.find_spec("nvidia.dali") else [])
    result = tool_in_process("bench_loaders.py", "--data", digits_root / "val", "--backends", *backends,
                             "--workers", "1", "--epochs", "2", "--batch-size", "32", "--image-size", "32",
                             "--auto-augment", "v0", "--cache-dir", tmp_path, "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["auto_augment"] == "v0"
    assert "loader=torchvision or loader=dali only" in summary["skipped"]["ffcv"]  # nothing converted for it
    assert [run["backend"] for run in summary["runs"]] == [b for b in backends if b != "ffcv"]
    assert not list(tmp_path.glob("*.beton"))


def test_bench_loaders_rejects_a_missing_folder(tmp_path):
    result = tool_in_process("bench_loaders.py", "--data", tmp_path / "x")
    assert result.returncode == 2 and "is not a folder" in result.stderr
