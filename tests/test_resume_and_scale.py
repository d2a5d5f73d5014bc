"""A run killed mid-way resumes to the same weights; two CPU processes shard and log once."""
import json
import signal
import subprocess
import sys
import time

from safetensors.torch import load_file

from conftest import REPO, run_train

SHORT = ["tracker=none", "epochs=3", "attack.steps=1", "eval_robust=false", "log_every=2"]


def last_weights(run_dir):
    return load_file(str(run_dir / "checkpoints" / "last" / "model.safetensors"))


def test_resume_after_kill_equals_uninterrupted_run(digits_root, tmp_path):
    args = [f"data.root={digits_root}", *SHORT]
    run_train(*args, f"output_dir={tmp_path / 'straight'}")

    interrupted = tmp_path / "interrupted"
    process = subprocess.Popen([sys.executable, str(REPO / "train" / "run.py"), *args, f"output_dir={interrupted}"],
                               cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not (interrupted / "checkpoints" / "epoch_0001").exists():
        assert process.poll() is None and time.time() < deadline, "run ended before its first checkpoint"
        time.sleep(0.1)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (interrupted / "checkpoints" / "epoch_0003").exists()

    resumed = run_train(*args, f"output_dir={interrupted}")
    assert "resuming from" in resumed.stdout
    straight, again = last_weights(tmp_path / "straight"), last_weights(interrupted)
    assert straight.keys() == again.keys()
    assert all(straight[k].equal(again[k]) for k in straight)
    finals = [json.loads((d / "summary.json").read_text())["clean_top1"] for d in (tmp_path / "straight", interrupted)]
    assert finals[0] == finals[1]


def test_two_cpu_processes_shard_and_log_once(digits_root, tmp_path):
    # `--cpu --num_processes 2` runs ONE process in accelerate 1.15 (multi-CPU needs mpirun there);
    # torchrun through --multi_gpu on a machine without CUDA is real 2-process gloo training.
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    run_train(f"data.root={digits_root}", f"output_dir={tmp_path}", "tracker=none", "epochs=1",
              "attack.steps=1", "log_every=1", launcher=launcher)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_steps = [line["step"] for line in lines if "train/loss/clean" in line]
    # 1,437 train images in 2 disjoint shards of 718 → 11 full batches of 64 per process
    assert train_steps == list(range(1, 12))
    assert sum("val/top1" in line for line in lines) == 1
    assert json.loads((tmp_path / "summary.json").read_text())["val_images"] == 360  # each once
    checkpoints = [p for p in (tmp_path / "checkpoints").iterdir() if not p.is_symlink()]
    assert [p.name for p in checkpoints] == ["epoch_0001"]
    assert {p.name for p in checkpoints[0].glob("random_states_*.pkl")} == {"random_states_0.pkl",
                                                                           "random_states_1.pkl"}
