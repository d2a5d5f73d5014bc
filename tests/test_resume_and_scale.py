"""A run killed mid-way resumes to the same weights; two CPU processes shard and log once.
The interrupted runs are processes (a kill, a signal, a launcher are the point); the straight runs
they are compared with run in this process where one process is all they need."""
import json
import signal
import subprocess
import sys
import time

import pytest

from safetensors.torch import load_file

from conftest import REPO, run_train, torch_default_threads, train_in_process, two_processes

SHORT = ["tracker=none", "model=test_resnet", "epochs=3", "attack.steps=1", "eval_robust=false", "log_every=1",
         "ema_decay=0.9"]  # advprop PGD-1 on timm's small test ResNet, 22 steps an epoch


def last_weights(run_dir):
    return load_file(str(run_dir / "checkpoints" / "last" / "model.safetensors"))


def train_losses(run_dir):
    """step → (clean loss, adversarial loss) as logged; a resumed run's lines overwrite nothing."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {line["step"]: (line["train/loss/clean"], line["train/loss/adv"]) for line in lines
            if "train/loss/clean" in line}


def start_run(args, run_dir):
    return subprocess.Popen([sys.executable, str(REPO / "train" / "run.py"), *args, f"output_dir={run_dir}"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def first_failure(stderr: str) -> str:
    """From a launcher's stderr, the first process's error or traceback (the launcher's own report
    of which rank failed comes after it)."""
    starts = [stderr.find(mark) for mark in ("Traceback", "error:") if mark in stderr]
    return stderr[min(starts):][:4000] if starts else stderr[-4000:]


def wait_for(condition, process, what):
    deadline = time.time() + 600
    while not condition():
        assert process.poll() is None, f"run ended before {what}: {first_failure(process.stderr.read())}"
        assert time.time() < deadline, f"no {what} in 10 minutes"
        time.sleep(0.05)


def assert_same_run(a, b):
    wa, wb = last_weights(a), last_weights(b)
    assert wa.keys() == wb.keys() and all(wa[k].equal(wb[k]) for k in wa)
    ema_a, ema_b = (load_file(str(d / "checkpoints" / "last" / "ema.safetensors")) for d in (a, b))
    assert all(ema_a[k].equal(ema_b[k]) for k in ema_a)
    assert train_losses(a) == train_losses(b)  # the loss of every step, bit for bit
    finals = [json.loads((d / "summary.json").read_text())["clean_top1"] for d in (a, b)]
    assert finals[0] == finals[1]


@pytest.fixture(scope="module")
def straight_run(digits_root, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    train_in_process(f"data.root={digits_root}", *SHORT, f"output_dir={run_dir}")
    return run_dir


TIMINGS = ("perf/", "epoch_seconds", "final/train_seconds", "final/train_img_per_s", "final/steady_img_per_s",
           "final/data_wait_fraction")


def logged_lines(run_dir):
    """metrics.jsonl without its timings (they differ between any two runs)."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if not k.startswith(TIMINGS)} for line in lines]


def test_resume_after_kill_equals_uninterrupted_run(digits_root, straight_run, tmp_path):
    args = [f"data.root={digits_root}", *SHORT]
    run_dir = tmp_path / "killed"
    process = start_run(args, run_dir)
    # killed in epoch 2, a few steps after the first checkpoint: those steps' lines are in metrics.jsonl
    wait_for(lambda: (run_dir / "checkpoints" / "epoch_0001").exists() and max(train_losses(run_dir)) >= 25,
             process, "step 25")
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (run_dir / "checkpoints" / "epoch_0003").exists()
    resumed = train_in_process(*args, f"output_dir={run_dir}")
    assert "resuming from" in resumed.stdout and "metrics.jsonl: dropped its last" in resumed.stdout
    assert_same_run(straight_run, run_dir)
    assert logged_lines(run_dir) == logged_lines(straight_run)  # one line per step, none twice


def test_sigterm_mid_epoch_checkpoints_and_resumes_exactly(digits_root, straight_run, tmp_path):
    args = [f"data.root={digits_root}", *SHORT]
    run_dir = tmp_path / "preempted"
    process = start_run(args, run_dir)
    wait_for(lambda: len(train_losses(run_dir)) >= 27 if (run_dir / "metrics.jsonl").exists() else False,
             process, "step 27")  # epoch 2 has begun (22 steps an epoch)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-2000:]
    assert "stopped at step" in out and "SIGTERM" in err
    saved = [p for p in (run_dir / "checkpoints").glob("step_*")]
    assert len(saved) == 1
    state = json.loads((saved[0] / "train_state.json").read_text())
    assert state["epoch"] == 1 and 0 < state["batch"] < 22  # mid-epoch
    assert not (run_dir / "summary.json").exists()
    resumed = train_in_process(*args, f"output_dir={run_dir}")
    assert f"batch {state['batch']}" in resumed.stdout
    assert_same_run(straight_run, run_dir)


# two_processes(): `--cpu --num_processes 2` runs ONE process in accelerate 1.15 (multi-CPU needs
# mpirun there); torchrun through --multi_gpu on a machine without CUDA is real 2-process gloo training.


def worker_of_rank(launcher: subprocess.Popen, rank: int):
    """The training process of `rank` (not one of its DataLoader workers, which share its command line)."""
    import psutil

    deadline = time.time() + 120
    while time.time() < deadline:
        for child in psutil.Process(launcher.pid).children(recursive=True):
            try:
                if "train/run.py" in " ".join(child.cmdline()) and child.environ().get("RANK") == str(rank) \
                        and child.parent().environ().get("RANK") is None:  # its parent is the launcher
                    return child
            except psutil.Error:  # a short-lived helper process
                continue
        time.sleep(0.2)
    raise AssertionError(f"no worker of rank {rank} under the launcher")


TWO_PROCESS_ARGS = [*SHORT, "epochs=2", "method=fast_advprop", "attack.targeted=false"]


@pytest.fixture(scope="module")
def two_process_run(digits_root, tmp_path_factory):
    """fast_advprop, 2 epochs, in two CPU processes (gloo): the run the preempted one must equal,
    and the one whose sharding and logging are checked."""
    run_dir = tmp_path_factory.mktemp("two_processes") / "straight"
    result = run_train(f"data.root={digits_root}", *TWO_PROCESS_ARGS, f"output_dir={run_dir}", launcher=two_processes())
    (run_dir.parent / "stderr.txt").write_text(result.stderr)
    return run_dir


@pytest.mark.processes
def test_two_processes_preempted_on_one_rank_resume_exactly(digits_root, two_process_run, tmp_path):
    """SIGTERM reaches only rank 1 (the one that does not log): both ranks stop after the same step,
    checkpoint together, exit 0; the resumed 2-process run equals an uninterrupted one bit for bit.
    fast_advprop: its adversarial rows cross between the processes every step (seeded by the step)."""
    args = [f"data.root={digits_root}", *TWO_PROCESS_ARGS]
    run_dir = tmp_path / "preempted"
    env = {**__import__("os").environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([*two_processes(), str(REPO / "train" / "run.py"), *args, f"output_dir={run_dir}"],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    wait_for(lambda: len(train_losses(run_dir)) >= 14 if (run_dir / "metrics.jsonl").exists() else False,
             process, "step 14")  # epoch 2 has begun (11 steps an epoch per process)
    worker_of_rank(process, 1).terminate()
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-3000:]
    saved = list((run_dir / "checkpoints").glob("step_*"))
    assert len(saved) == 1 and {p.name for p in saved[0].glob("random_states_*.pkl")} == {
        "random_states_0.pkl", "random_states_1.pkl"}
    state = json.loads((saved[0] / "train_state.json").read_text())
    assert state["epoch"] == 1 and 0 < state["batch"] < 11
    resumed = run_train(*args, f"output_dir={run_dir}", launcher=two_processes())
    assert f"batch {state['batch']}" in resumed.stdout
    assert_same_run(two_process_run, run_dir)


@pytest.mark.processes
def test_two_cpu_processes_shard_and_log_once(digits_root, two_process_run):
    lines = [json.loads(line) for line in (two_process_run / "metrics.jsonl").read_text().splitlines()]
    train_steps = [line["step"] for line in lines if "train/loss/clean" in line]
    # 1,437 train images in 2 disjoint shards of 718 → 11 full batches of 64 per process, each epoch
    assert train_steps == list(range(1, 23))
    assert [line["epoch"] for line in lines if "val/top1" in line] == [1, 2]  # logged once, by the main process
    summary = json.loads((two_process_run / "summary.json").read_text())
    assert summary["val_images"] == 360  # each once
    assert summary["environment"]["cpu_threads"] == max(1, torch_default_threads() // 2)  # the cores, shared
    # on a Python with CPython's fork deadlock (train/fork_hazard.py), one warning, from the main process
    warnings = [line for line in (two_process_run.parent / "stderr.txt").read_text().splitlines() if "gh-112275" in line]
    assert len(warnings) == (sys.version_info[:3] < (3, 11, 10)), warnings
    checkpoints = [p for p in (two_process_run / "checkpoints").iterdir() if not p.is_symlink()]
    assert sorted(p.name for p in checkpoints) == ["epoch_0001", "epoch_0002"]
    assert all({p.name for p in folder.glob("random_states_*.pkl")} == {"random_states_0.pkl", "random_states_1.pkl"}
               for folder in checkpoints)
    # one process cannot continue it: the global batch, the LR and the shards would change
    before = (two_process_run / "metrics.jsonl").read_text()
    alone = train_in_process(f"data.root={digits_root}", f"output_dir={two_process_run}", *TWO_PROCESS_ARGS,
                             "epochs=3", check=False)
    assert alone.returncode == 2 and "processes (2 → 1" in alone.stderr, alone.stderr[-2000:]
    assert (two_process_run / "metrics.jsonl").read_text() == before


FEW_STEPS = ["model=test_resnet", "method=vanilla", "tracker=none", "eval_robust=false", "batch_size=16", "log_every=1"]


@pytest.mark.processes
def test_two_processes_a_sigterm_in_validation_stops_it_and_the_resumed_run_validates(few_digits, tmp_path):
    """Rank 1 is preempted as its first validation begins (its training is saved): both stop within
    a few validation batches, not after the whole validation; the same command then validates."""
    wrapper = tmp_path / "preempted_in_validation.py"
    wrapper.write_text(f"""
import os, runpy, signal, sys
import train.loop
evaluate, sent = train.loop.evaluate, []
def preempted(*args, **kwargs):
    if os.environ["RANK"] == "1" and not sent:
        sent.append(True)
        os.kill(os.getpid(), signal.SIGTERM)
    return evaluate(*args, **kwargs)
train.loop.evaluate = preempted
sys.argv[0] = {str(REPO / "train" / "run.py")!r}
runpy.run_path(sys.argv[0], run_name="__main__")
""")
    run_dir = tmp_path / "run"
    args = [f"data.root={few_digits}", f"output_dir={run_dir}", *FEW_STEPS, "epochs=2"]
    env = {**__import__("os").environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline"}
    stopped = subprocess.run([*two_processes(), str(wrapper), *args], cwd=REPO, capture_output=True, text=True,
                             env=env, timeout=900)
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    assert "before the validation of epoch 1 was done; its training is saved" in stopped.stdout
    state = json.loads((run_dir / "checkpoints" / "last" / "train_state.json").read_text())
    assert (state["epoch"], state["validated"]) == (1, False)
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert not [line for line in lines if "val/top1" in line]  # the validation was cut short

    resumed = run_train(*args, launcher=two_processes())
    assert "validating it" in resumed.stdout
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines if "val/top1" in line] == [1, 2]
    assert json.loads((run_dir / "summary.json").read_text())["val_images"] == 360


def start_two_processes(args):
    env = {**__import__("os").environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline"}
    return subprocess.Popen([*two_processes(), str(REPO / "train" / "run.py"), *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def folder_lock_is_free(folder) -> bool:
    import fcntl
    import os

    descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(descriptor)


def training_began(run_dir):
    metrics = run_dir / "metrics.jsonl"
    return lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 2


@pytest.mark.processes
def test_a_frozen_process_stops_the_other_with_a_collective_timeout(few_digits, tmp_path):
    """About a minute: two real processes start (~15 s), one is frozen, and the other must wait out
    its 20 s collective timeout (shorter would risk a false one on a loaded machine) and then end."""
    import psutil

    run_dir = tmp_path / "run"
    process = start_two_processes([f"data.root={few_digits}", f"output_dir={run_dir}", *FEW_STEPS, "epochs=100",
                                   "collective_timeout_s=20"])
    wait_for(training_began(run_dir), process, "training")
    launched = psutil.Process(process.pid).children(recursive=True)
    worker_of_rank(process, 1).suspend()  # SIGSTOP: alive, holding its sockets, answering nothing
    _, err = process.communicate(timeout=600)
    assert process.returncode != 0
    errors = [line for line in err.splitlines() if line.startswith("error: process 0 of 2 waited more than 20 s")]
    assert len(errors) == 1, err[-3000:]
    assert "(collective_timeout_s) for the other processes during training (epoch 1, step" in errors[0]
    assert "frozen" in errors[0] and "continues from the last checkpoint" in errors[0]
    _, alive = psutil.wait_procs(launched, timeout=60)
    assert not alive and folder_lock_is_free(run_dir)


@pytest.mark.processes
def test_no_process_outlives_a_killed_launcher(few_digits, tmp_path):
    """Even a frozen worker, which no SIGTERM reaches, ends with its launcher and frees the run's folder."""
    import psutil

    run_dir = tmp_path / "run"
    process = start_two_processes([f"data.root={few_digits}", f"output_dir={run_dir}", *FEW_STEPS, "epochs=100"])
    wait_for(training_began(run_dir), process, "training")
    launched = psutil.Process(process.pid).children(recursive=True)
    worker_of_rank(process, 1).suspend()
    assert not folder_lock_is_free(run_dir)  # rank 0 holds it
    process.kill()  # SIGKILL: the launcher cannot pass anything on
    process.wait()
    _, alive = psutil.wait_procs(launched, timeout=60)  # DataLoader workers end after their parent
    assert not alive, [p.cmdline()[:3] for p in alive]
    assert folder_lock_is_free(run_dir)
