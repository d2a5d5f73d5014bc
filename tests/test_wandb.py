"""W&B as a user sees it, read from what W&B itself recorded in offline runs (no server, no mock):
the model artifacts and their metadata, the metric definitions, the run's environment, a resumed
run adding no duplicate artifact, evaluate.py naming the artifact it evaluated, compare_methods.py's
group and comparison; the run picture written without W&B; and online W&B without a network (or
with a local server that refuses every request) running offline after one warning."""
import contextlib
import http.server
import json
import threading

import pytest
from PIL import Image

from conftest import free_port, tool_in_process, train_in_process
from wandb_records import logged_values, records_of

RUN = ["model=test_resnet", "tracker=wandb", "attack.steps=1", "ema_decay=0.9", "wandb_log_checkpoints=all"]


def artifacts(run_dir):
    """(name, aliases, metadata) of the model artifacts (W&B logs tables as artifacts of their own)."""
    return [(a.name, sorted(a.aliases), json.loads(a.metadata)) for a in records_of(run_dir, "artifact")
            if a.type == "model"]


@pytest.fixture(scope="module")
def wandb_run(digits_root, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("wandb") / "run"
    train_in_process(f"data.root={digits_root}", f"output_dir={run_dir}", *RUN, "epochs=2")
    return run_dir


def test_the_trained_model_is_a_model_artifact_with_what_it_takes_to_use_it(wandb_run):
    run_id = (wandb_run / "wandb_id.txt").read_text().strip()
    logged = artifacts(wandb_run)
    main = [(aliases, meta) for name, aliases, meta in logged if name == f"model-{run_id}"]
    ema = [(aliases, meta) for name, aliases, meta in logged if name == f"model-{run_id}-ema"]
    assert [meta["epoch"] for _, meta in main] == [1, 2] and [meta["epoch"] for _, meta in ema] == [2]
    final_aliases, final = main[-1]
    assert {"latest", "epoch-2"} <= set(final_aliases) and "epoch-1" in main[0][0]
    summary = json.loads((wandb_run / "summary.json").read_text())
    assert final["clean_top1"] == summary["clean_top1"] and final["robust_top1"] == summary["robust_top1"]
    assert (final["model"], final["num_classes"], final["classes"]) == ("test_resnet", 10, [str(i) for i in range(10)])
    assert (final["normalization"], final["image_size"], final["crop_ratio"], final["method"]) == (
        "imagenet", 32, 1.0, "advprop")
    assert final["attack"]["steps"] == 1 and "val_top1" in main[0][1]
    best = [meta["epoch"] for aliases, meta in main if "best" in aliases]
    assert best  # the best epoch carries the alias
    files = [sorted(entry.path for entry in a.manifest.contents) for a in records_of(wandb_run, "artifact")
             if a.type == "model"]
    assert files and all(names == ["README.md", "config.json", "model.safetensors"] for names in files), files


def test_metrics_are_defined_for_the_dashboard(wandb_run):
    defined = {(m.name or m.glob_name): m for m in records_of(wandb_run, "metric")}
    assert defined["train/*"].step_metric == defined["perf/*"].step_metric == "optimizer_step"
    assert defined["val/*"].step_metric == defined["val_ema/*"].step_metric == "epoch"
    assert defined["val/top1"].summary.max and defined["val_ema/top1"].summary.max
    assert defined["val/loss"].summary.min and defined["train/loss/clean"].summary.min
    assert {"perf/img_per_s", "perf/data_wait", "perf/lr", "optimizer_step"} <= set(logged_values(wandb_run))


def test_a_run_says_how_it_ran(wandb_run):
    config = {item.key: json.loads(item.value_json) for record in records_of(wandb_run, "config")
              for item in record.update}
    environment = json.loads((wandb_run / "summary.json").read_text())["environment"]
    assert config["environment"] == environment
    assert environment["precision"] == "fp32" and environment["processes"] == 1 and environment["loader"] == "torchvision"
    assert environment["device"].startswith("CPU") and environment["torch"] and environment["timm"]


def test_resuming_adds_no_duplicate_artifact(wandb_run, digits_root):
    before = artifacts(wandb_run)
    again = train_in_process(f"data.root={digits_root}", f"output_dir={wandb_run}", *RUN, "epochs=2")
    assert "redoing the final evaluation" in again.stdout
    assert artifacts(wandb_run) == before
    run_id = (wandb_run / "wandb_id.txt").read_text().strip()
    offline_runs = sorted((wandb_run / "wandb").glob("offline-run-*"))  # each start, one W&B run: the same id
    assert len(offline_runs) == 2 and all(r.name.endswith(run_id) and list(r.glob("*.wandb")) for r in offline_runs)
    train_in_process(f"data.root={digits_root}", f"output_dir={wandb_run}", *RUN, "epochs=3")  # extended: a new end
    added = artifacts(wandb_run)[len(before):]
    assert sorted(meta["epoch"] for _, _, meta in added) == [3, 3]  # main and EMA, epochs 1-2 not again


def test_evaluate_names_the_artifact_it_evaluated(wandb_run, digits_root):
    result = tool_in_process("evaluate.py", wandb_run / "final_model", "--data", digits_root / "val",
                             "--limit", "64", "--wandb-run")
    assert result.returncode == 0, result.stderr[-2000:]
    run_id = (wandb_run / "wandb_id.txt").read_text().strip()
    epoch = max(meta["epoch"] for _, _, meta in artifacts(wandb_run))
    assert f"model-{run_id}:epoch-{epoch}" in result.stdout
    updates = [json.loads(item.value_json) for record in records_of(wandb_run, "config") for item in record.update
               if item.key == "evaluated_model"]
    assert updates[-1]["artifact"] == f"model-{run_id}:epoch-{epoch}"


def test_the_run_picture_without_wandb(wandb_run, tmp_path):
    picture = Image.open(wandb_run / "run.png")  # written by the run itself
    assert picture.format == "PNG" and picture.size[0] > 800
    assert picture.info["Panels"].split(", ") == ["training loss", "val top-1", "robust top-1", "learning rate",
                                                  "throughput", "waiting for data"]
    tool = tool_in_process("plot_run.py", wandb_run, "--out", tmp_path / "again.png")
    assert tool.returncode == 0 and Image.open(tmp_path / "again.png").size == picture.size
    missing = tool_in_process("plot_run.py", tmp_path)
    assert missing.returncode == 2 and "not a run folder" in missing.stderr


def test_compare_methods_puts_its_runs_in_one_group_with_the_comparison(few_digits, tmp_path):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(f"recipe: configs/demo.yaml\ncommon: [data.root={few_digits}, model=test_resnet, epochs=1, "
                     f"eval_attack=pgd1]\nruns:\n  vanilla: [method=vanilla]\n  advprop_pgd1: [method=advprop, "
                     f"attack=pgd1]\n")
    out = tmp_path / "compare"
    result = tool_in_process("compare_methods.py", "--sweep", sweep, "--out", out)  # its runs: processes of their own
    assert result.returncode == 0, result.stderr[-3000:]
    group = "compare_methods-compare"
    for name in ("vanilla", "advprop_pgd1"):
        assert records_of(out / name, "run")[0].run_group == group
    comparison = records_of(out, "run")
    assert comparison[0].run_group == group and comparison[0].display_name == "comparison"
    logged = logged_values(out)
    assert logged["comparison/table/_type"] == "table-file" and logged["comparison/table/nrows"] == 2
    assert logged["comparison/clean_vs_robust_table/_type"] == "table-file"  # the scatter plot's data


@contextlib.contextmanager
def refusing_server():
    """A local W&B server that answers every request 401 (an API key it does not know)."""
    class Refuse(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.send_response(401)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"errors": [{"message": "user is not logged in"}]}')

        do_GET = do_POST

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()


@pytest.mark.parametrize("server, warned", [
    ("unreachable", "the W&B server {url} cannot be reached (Connection refused)"),  # no network
    ("refusing", "W&B refused the online run (CommError: "),  # … returned error 401 … user is not logged in
])
def test_online_w_and_b_that_cannot_be_used_runs_offline_after_one_warning(few_digits, tmp_path, server, warned):
    run_dir = tmp_path / "run"
    with refusing_server() if server == "refusing" else contextlib.nullcontext(f"http://127.0.0.1:{free_port()}") \
            as url:
        result = train_in_process(f"data.root={few_digits}", f"output_dir={run_dir}", "model=test_resnet", "method=vanilla",
                           "epochs=1", "tracker=wandb", "eval_robust=false",
                           env={"WANDB_MODE": "online", "WANDB_API_KEY": "0" * 40, "WANDB_BASE_URL": url})
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:") and "W&B" in line]
    assert len(warnings) == 1, result.stderr[-3000:]
    assert warned.format(url=url) in warnings[0] and "logging to W&B offline instead" in warnings[0]
    assert "W&B run (offline)" in result.stdout
    assert records_of(run_dir, "run")  # the offline run is recorded, for `wandb sync`


def test_reachability_of_a_server():
    import socket

    from train.tracking import unreachable

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        assert unreachable(f"http://127.0.0.1:{server.getsockname()[1]}", timeout=5) is None
    assert unreachable(f"http://127.0.0.1:{free_port()}", timeout=5) == "Connection refused"
