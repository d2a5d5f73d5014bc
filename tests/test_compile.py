"""compile=true: the attack and the training forward share compiled graphs, each compiled once,
the demo trains as it does eagerly, and without inductor the run stays eager with one warning."""
import json

import pytest

from conftest import run_train, train_in_process

TINY = ["model=test_resnet", "tracker=none", "epochs=3", "eval_robust=false"]  # timm's small test ResNet


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_compiled_demo_trains_like_eager_and_compiles_once(digits_root, tmp_path):
    """About a minute on 2 cores: inductor compiles every graph a run needs (train main and aux
    norms, the frozen-weight attack, evaluation) in C++ on the CPU; that compilation is the point."""
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    train_in_process(f"data.root={digits_root}", f"output_dir={eager}", *TINY)
    result = train_in_process(f"data.root={digits_root}", f"output_dir={compiled}", *TINY, "compile=true")
    assert "training eagerly" not in result.stderr
    accuracy = {run: json.loads((run / "summary.json").read_text())["clean_top1"] for run in (eager, compiled)}
    assert min(accuracy.values()) > 85 and abs(accuracy[eager] - accuracy[compiled]) < 5, accuracy
    graphs = [line["compile/graphs"] for line in read_jsonl(compiled / "metrics.jsonl") if "compile/graphs" in line]
    # epoch 1 compiled every graph the run needs (train main/aux, the frozen-weight attack,
    # evaluation); later epochs compile nothing: no recompilation per step or per epoch
    assert len(graphs) == 3 and 3 <= graphs[0] <= 10 and graphs == [graphs[0]] * 3, graphs


def test_compile_without_a_working_compiler_trains_eagerly(few_digits, tmp_path, monkeypatch):
    """A process of its own: inductor reads CXX when it is imported and keeps the kernels it built."""
    monkeypatch.setenv("CXX", "/bin/false")  # inductor's C++ compiler on CPU (run_train passes os.environ on)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))  # nothing cached from earlier runs
    result = run_train(f"data.root={few_digits}", f"output_dir={tmp_path / 'run'}", *TINY, "epochs=1", "compile=true")
    warnings = [line for line in result.stderr.splitlines() if "compile=true" in line]
    assert len(warnings) == 1 and "training eagerly" in warnings[0], result.stderr[-2000:]
    assert (tmp_path / "run" / "summary.json").exists()
