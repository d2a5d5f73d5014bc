"""tools/bench_loaders.py's WebDataset modes: folder vs. shards of the same images in one run, and the
first batch on a set of many shards (no timing asserts: the figures are docs/speed.md's)."""
import json

from conftest import tool_in_process


def bench(*args, cache):
    result = tool_in_process("bench_loaders.py", *args, "--cache-dir", cache, "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stdout


def test_shards_mode_measures_each_backend_from_the_folder_and_from_shards(digits_root, tmp_path):
    summary, out = bench("--data", digits_root / "val", "--backends", "torchvision", "--workers", "1", "--epochs", "2",
                         "--batch-size", "32", "--image-size", "32", "--shards", cache=tmp_path)
    runs = {(r["backend"], r["source"]): r for r in summary["runs"]}
    assert set(runs) == {("torchvision", "folder"), ("torchvision", "shards")}
    assert runs["torchvision", "shards"]["images_per_epoch"] == runs["torchvision", "folder"]["images_per_epoch"] == 352
    shards = runs["torchvision", "shards"]
    assert summary["torchvision_shards_ratio"] == shards["shards_ratio"] == shards["img_s"] / summary["torchvision"]
    assert "× folder" in out and (tmp_path / "val-wds" / "_info.json").is_file()  # the shard copy, kept


def test_first_batch_mode_times_a_set_of_many_shards(tmp_path):
    """About 20 s: it writes 30 shards and reads the first batch twice, with and without index files;
    a set of many shards is what the mode is for."""
    summary, out = bench("--first-batch-shards", 30, "--backends", "torchvision", "--batch-size", "8", cache=tmp_path)
    rows = summary["first_batch"]
    assert [(r["backend"], r["shards"], r["case"]) for r in rows] == [
        ("torchvision", 30, "index files"), ("torchvision", 30, "no index files (built now)")]
    assert all(r["seconds"] > 0 for r in rows)
    info = json.loads((tmp_path / "synthetic-30-wds" / "_info.json").read_text())
    assert info["splits"]["train"]["shard_lengths"] == [2] * 30
