"""A run folder is the user's asset: a second command never overwrites, mixes or loses it."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import DEMO_RUN, REPO, one_error_line, tool_in_process, train_in_process
from train.resume_rules import ResumeMismatch, check_same_run

QUICK = ["tracker=none", "model=test_resnet", "attack.steps=2", "eval_robust=false"]  # timm's small test ResNet


def fingerprint(folder: Path) -> dict[str, str]:
    """Every file (and link target) under folder with its content hash."""
    prints = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        if path.is_symlink():
            prints[key] = "→ " + str(path.readlink())
        elif path.is_file():
            prints[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return prints


@pytest.fixture
def finished_run(trained_demo_run, tmp_path) -> Path:
    """A copy of the trained demo run (8 epochs, test_resnet, advprop PGD-2), to be protected."""
    run_dir = tmp_path / "run"
    shutil.copytree(trained_demo_run, run_dir, symlinks=True)
    return run_dir


def refused(result, *words):
    line = one_error_line(result)
    assert all(word in line for word in words), line
    return line


@pytest.mark.parametrize("change, named", [
    ("model=resnet34", "model ('test_resnet' → 'resnet34')"),
    ("method=vanilla", "method ('advprop' → 'vanilla')"),
    ("batch_size=32", "batch_size (64 → 32)"),
    ("attack.eps=2", "attack.eps (4.0 → 2.0)"),
])
def test_resume_with_other_settings_is_refused_and_changes_nothing(finished_run, digits_root, change, named):
    before = fingerprint(finished_run)
    result = train_in_process(f"data.root={digits_root}", f"output_dir={finished_run}", "tracker=none", *DEMO_RUN,
                              "epochs=9", change, check=False)
    message = refused(result, named, "new output_dir")
    assert "damaged" not in result.stdout + result.stderr and "epoch_0008" in message
    assert fingerprint(finished_run) == before


def test_a_key_newer_than_the_run_counts_as_its_default(demo_cfg):
    """A run saved before drop_path_rate existed continues, unless the command sets the new key."""
    saved = OmegaConf.to_container(demo_cfg())
    del saved["drop_path_rate"]
    check_same_run(saved, demo_cfg(), where="an older run")
    with pytest.raises(ResumeMismatch, match=r"drop_path_rate \(0.0 → 0.1\)"):
        check_same_run(saved, demo_cfg("drop_path_rate=0.1"), where="an older run")


def test_resume_none_into_a_run_is_refused(finished_run, digits_root):
    before = fingerprint(finished_run)
    result = train_in_process(f"data.root={digits_root}", f"output_dir={finished_run}", "tracker=none", *DEMO_RUN,
                              "resume=none", check=False)
    refused(result, "already holds a run", "new output_dir")
    assert fingerprint(finished_run) == before


def test_every_checkpoint_unloadable_is_an_error_not_a_fresh_start(finished_run, digits_root):
    folders = [p for p in (finished_run / "checkpoints").iterdir() if not p.is_symlink()]
    for weights in (folder / "model.safetensors" for folder in folders):
        weights.write_bytes(weights.read_bytes()[:1000])
    before = fingerprint(finished_run)
    result = train_in_process(f"data.root={digits_root}", f"output_dir={finished_run}", "tracker=none", *DEMO_RUN,
                              "epochs=9", check=False)
    refused(result, f"none of the {len(folders)} checkpoints", "can be loaded", "resume=PATH")
    assert fingerprint(finished_run) == before


def test_second_run_into_a_busy_folder_is_refused_until_the_first_dies(few_digits, tmp_path):
    run_dir = tmp_path / "run"
    args = [f"data.root={few_digits}", f"output_dir={run_dir}", *QUICK]
    first = subprocess.Popen([sys.executable, str(REPO / "train" / "run.py"), *args, "epochs=100"], cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not (run_dir / "metrics.jsonl").exists():  # training has begun
            assert first.poll() is None and time.time() < deadline
            time.sleep(0.1)
        second = train_in_process(*args, "epochs=100", check=False)
        refused(second, f"output_dir {run_dir} is in use by another run (PID {first.pid})")
        assert first.poll() is None  # the first run goes on
    finally:
        first.kill()  # SIGKILL: no clean-up of any kind, as after a crash
        first.wait()
    again = train_in_process(*args, "epochs=1")  # the kernel dropped the dead run's lock
    assert (run_dir / "summary.json").exists(), again.stdout[-2000:]


class PipeReader(threading.Thread):
    """Everything a pipe has written so far (`text`), read in a thread so the writer never blocks."""

    def __init__(self, stream):
        super().__init__(daemon=True)
        self.stream, self.chunks = stream, []
        self.start()

    def run(self) -> None:
        while chunk := os.read(self.stream.fileno(), 65536):
            self.chunks.append(chunk)

    @property
    def text(self) -> str:
        return b"".join(self.chunks).decode(errors="replace")


def test_sigterm_in_the_final_evaluation_stops_at_once_and_a_rerun_redoes_it(few_digits, tmp_path):
    run_dir = tmp_path / "run"
    common = [f"data.root={few_digits}", f"output_dir={run_dir}", "tracker=none", "model=test_resnet",
              "attack.steps=1", "epochs=1", "eval_attack=pgd5"]
    # a robust evaluation without end (PGD-100000: hours), so a run that exits at all after the
    # signal stopped inside it
    process = subprocess.Popen([sys.executable, str(REPO / "train" / "run.py"), *common,
                                "eval_attack.steps=100000"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stderr = PipeReader(process.stderr)
    deadline = time.time() + 600
    while "robust val" not in stderr.text:  # its progress bar: the final evaluation has begun
        assert process.poll() is None and time.time() < deadline, stderr.text[-2000:]
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=120)
    stderr.join(timeout=60)
    err = stderr.text
    assert process.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "stopped the final evaluation" in err and "rerun the same command" in err
    assert not (run_dir / "summary.json").exists() and not (run_dir / "final_model").exists()
    trained = (run_dir / "checkpoints" / "last" / "model.safetensors").read_bytes()

    args = [*common, "eval_attack.steps=2"]  # evaluation settings may change on resume
    rerun = train_in_process(*args)
    assert "redoing the final evaluation and exports" in rerun.stdout
    assert (run_dir / "checkpoints" / "last" / "model.safetensors").read_bytes() == trained  # no training
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["val_images"] == 360 and "robust_top1" in summary
    assert (run_dir / "final_model" / "model.safetensors").exists()


# ----------------------------------------------------------------------------- a full disk

def mount_tmpfs(folder: Path, megabytes: int) -> bool:
    folder.mkdir(parents=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(folder)],
                            capture_output=True)
    return result.returncode == 0


def test_full_disk_during_a_checkpoint_keeps_the_previous_one(few_digits, tmp_path):
    disk = tmp_path / "small_disk"
    if not mount_tmpfs(disk, 5):  # a test_resnet checkpoint with optimizer state is ~3 MB: one fits
        pytest.skip("cannot mount a tmpfs here (not root?); test_checkpoint_save_hitting_enospc covers it")
    try:
        run_dir = disk / "run"
        result = train_in_process(f"data.root={few_digits}", f"output_dir={run_dir}", *QUICK, "epochs=3", check=False)
        assert result.returncode == 4, result.stderr[-3000:]
        assert f"no space left on {disk}" in result.stderr and "MB" in result.stderr
        assert "Traceback" not in result.stderr
        checkpoints = run_dir / "checkpoints"
        assert sorted(p.name for p in checkpoints.iterdir()) == ["best", "epoch_0001", "last"]  # no .tmp-*
        assert (checkpoints / "last").resolve().name == "epoch_0001"
        state = json.loads((checkpoints / "last" / "train_state.json").read_text())
        assert state["epoch"] == 1
    finally:
        subprocess.run(["umount", "-l", str(disk)])


def test_checkpoint_save_hitting_enospc(demo_cfg, tmp_path):
    """The same guarantee where no small filesystem can be mounted: ENOSPC injected at the write."""
    import timm
    from accelerate import Accelerator

    from models.factory import Normalized
    from train.checkpoint_io import DiskFull, save_checkpoint
    from train.run_state import TrainState
    from train.optim import create_optimizer

    cfg = demo_cfg()
    accelerator = Accelerator(cpu=True)
    model = Normalized(timm.create_model("resnet18", num_classes=10))
    accelerator.prepare(model, create_optimizer(cfg, model, 1))
    run_dir = tmp_path / "run"
    save_checkpoint(accelerator, run_dir, "epoch_0001", TrainState(epoch=1), cfg, list("0123456789"),
                    is_best=True, keep=2)
    before = fingerprint(run_dir)

    def disk_full(folder):
        Path(folder).mkdir()
        Path(folder, "model.safetensors").write_bytes(b"\0" * 1000)  # a partial write, then ENOSPC
        raise OSError(errno.ENOSPC, "No space left on device")

    accelerator.save_state = disk_full
    with pytest.raises(DiskFull, match=r"no space left on /.* a checkpoint needs about \d+ MB, \d+ MB are free"):
        save_checkpoint(accelerator, run_dir, "epoch_0002", TrainState(epoch=2), cfg, list("0123456789"),
                        is_best=False, keep=2)
    assert fingerprint(run_dir) == before  # no temporary folder, the previous checkpoint untouched


# ----------------------------------------------------------------------------- tools

def tool(name: str, *args):
    return tool_in_process(name, *args)


def test_export_never_writes_over_its_checkpoint_or_a_folder(finished_run, tmp_path):
    before = fingerprint(finished_run)
    best = finished_run / "checkpoints" / "best"
    refused(tool("export.py", best, best / "model.safetensors"), "inside the input")
    other = next(p for p in (finished_run / "checkpoints").iterdir() if p.name != best.resolve().name
                 and not p.is_symlink())
    refused(tool("export.py", best, other / "x.safetensors"), "inside the checkpoint folder")
    refused(tool("export.py", best, tmp_path), "is a folder")
    refused(tool("export.py", best, finished_run / "final_model"), "exists", "--overwrite")
    refused(tool("export.py", finished_run / "config.yaml", tmp_path / "x"), "is a file, not a folder")
    assert fingerprint(finished_run) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no temporary file anywhere

    from_run = tool("export.py", finished_run, tmp_path / "best")  # a run folder: its best
    assert from_run.returncode == 0 and str(best) in from_run.stdout, from_run.stderr
    again = tool("export.py", best, tmp_path / "best", "--overwrite")
    assert again.returncode == 0, again.stderr


def test_evaluate_refuses_a_model_name_that_contradicts_the_weights(trained_demo_run, digits_root):
    result = tool("evaluate.py", trained_demo_run / "final_model", "--data", digits_root / "val",
                  "--model", "resnet34")
    refused(result, "--model resnet34 does not match", "test_resnet")


def test_tools_refuse_a_checkpoint_whose_config_and_weights_are_different_models(finished_run, digits_root, tmp_path):
    mixed = tmp_path / "mixed"
    shutil.copytree(finished_run / "checkpoints" / "best", mixed)  # test_resnet weights …
    config = OmegaConf.load(mixed / "config.yaml")
    config.model = "resnet34"  # … and the config of another run
    OmegaConf.save(config, mixed / "config.yaml")
    for result in (tool("export.py", mixed, tmp_path / "out"),
                   tool("evaluate.py", mixed, "--data", digits_root / "val")):
        line = refused(result, f"checkpoint {mixed}: model.safetensors does not hold the model its config.yaml and "
                               f"classes.json describe (resnet34, 10 classes)", "missing", "copy the whole checkpoint")
        assert "state_dict" not in line
    assert not (tmp_path / "out").exists()
