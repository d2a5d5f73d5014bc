"""Messages that help: a class that differs is named, a poisoned checkpoint is called poisoned (with
an earlier one to resume from), and a signal at start-up or after the final table ends with the
documented exit status and one line, never the bare signal."""
from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from conftest import one_error_line, run_train, train_in_process, with_code

QUICK = ["model=test_resnet", "tracker=none", "eval_robust=false", "data.workers=0", "image_log_every=0"]


def renamed_class(root: Path, into: Path, splits=("train", "val"), old: str = "7", new: str = "7x") -> Path:
    """A copy of the digits set whose class `old` is called `new` in `splits`."""
    shutil.copytree(root, into)
    for split in splits:
        (into / split / old).rename(into / split / new)
    return into


def test_train_and_val_classes_that_differ_are_named(few_digits, tmp_path):
    data = renamed_class(few_digits, tmp_path / "data", splits=("val",))
    result = train_in_process(f"data.root={data}", f"output_dir={tmp_path / 'run'}", "epochs=1", *QUICK, check=False)
    line = one_error_line(result)
    assert "train and val folders have different classes: 10 vs 10 classes, only in train: '7'; only in val: '7x'" \
        in line, line
    assert not (tmp_path / "run").exists()


@pytest.fixture
def two_checkpoints(few_digits, tmp_path) -> Path:
    """A one-epoch run of test_resnet on 200 digits (4 steps) that checkpointed after step 2 and after the epoch."""
    run_dir = tmp_path / "run"
    train_in_process(f"data.root={few_digits}", f"output_dir={run_dir}", "epochs=1", "checkpoint_every_steps=2",
                     *QUICK)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if not p.is_symlink()) == \
        ["epoch_0001", "step_00000002"]
    return run_dir


def test_resuming_with_other_classes_names_the_class_that_differs(two_checkpoints, few_digits, tmp_path):
    data = renamed_class(few_digits, tmp_path / "data")
    result = train_in_process(f"data.root={data}", f"output_dir={two_checkpoints}", "epochs=2", *QUICK, check=False)
    line = one_error_line(result)
    assert "classes (10 vs 10 classes, only in the checkpoint: '7'; only in the data now: '7x')" in line, line


def poison(checkpoint: Path) -> None:
    """One NaN in the checkpoint's first floating weight (as a bad edit or an old, unguarded save leaves)."""
    weights = load_file(str(checkpoint / "model.safetensors"))
    name = next(k for k, v in weights.items() if v.is_floating_point())
    weights[name].view(-1)[0] = float("nan")
    save_file(weights, str(checkpoint / "model.safetensors"))


def test_a_poisoned_checkpoint_is_named_with_an_earlier_one_to_resume_from(two_checkpoints, few_digits):
    checkpoints = two_checkpoints / "checkpoints"
    poison(checkpoints / "epoch_0001")
    args = [f"data.root={few_digits}", f"output_dir={two_checkpoints}", "epochs=2", *QUICK]
    line = one_error_line(train_in_process(*args, check=False), code=3)
    assert f"checkpoint {checkpoints / 'epoch_0001'} itself holds NaN or infinite values (1 tensor: model " in line
    assert f"the newest earlier one with finite weights is {checkpoints / 'step_00000002'}" in line
    assert "step 4" not in line and "Lower the LR" not in line, line  # not the poisoned step's, not the LR's fault
    # resume=PATH through the `last` link: the same diagnosis; with no finite one left, a new run is the way
    poison(checkpoints / "step_00000002")
    line = one_error_line(train_in_process(*args, f"resume={checkpoints / 'last'}", check=False), code=3)
    assert "itself holds NaN" in line and f"no earlier checkpoint in {checkpoints} has finite weights" in line, line


@pytest.fixture
def bare_signal_fails_the_test():
    """A SIGTERM that no handler of the run takes raises here instead of killing pytest."""
    class BareSignal(Exception):
        pass

    def handler(signum, frame):
        raise BareSignal(f"signal {signum} reached the default handler")

    previous = signal.signal(signal.SIGTERM, handler)
    yield
    signal.signal(signal.SIGTERM, previous)


def test_a_signal_during_start_up_stops_at_once_with_128_plus_n(few_digits, tmp_path, monkeypatch,
                                                                 bare_signal_fails_the_test):
    import train.run as run
    build_loaders = run.build_loaders

    def signalled(*args, **kwargs):  # the signal comes while the data is being prepared
        os.kill(os.getpid(), signal.SIGTERM)
        return build_loaders(*args, **kwargs)

    monkeypatch.setattr(run, "build_loaders", signalled)
    result = train_in_process(f"data.root={few_digits}", f"output_dir={tmp_path / 'run'}", "epochs=1", *QUICK,
                              check=False)
    assert result.returncode == 128 + signal.SIGTERM and "Traceback" not in result.stderr, result.stderr
    assert "SIGTERM: stopped during start-up, before any training step: nothing to save" in result.stderr


def test_a_signal_after_the_final_table_ends_with_exit_0(few_digits, tmp_path, monkeypatch,
                                                         bare_signal_fails_the_test):
    import train.run as run
    print_table = run.print_table

    def table_then_signal(*args, **kwargs):
        print_table(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(run, "print_table", table_then_signal)
    result = train_in_process(f"data.root={few_digits}", f"output_dir={tmp_path / 'run'}", "epochs=1", *QUICK,
                              check=False)
    assert result.returncode == 0, result.stderr
    assert "SIGTERM: the run is finished and saved" in result.stderr and "final evaluation" not in result.stderr
    assert (tmp_path / "run" / "summary.json").is_file()


SIGNAL_WHILE_IMPORTING = """
import os, signal
import train.faults as faults
install = faults.stop_at_once_while_starting
def install_then_signal():  # run.py installs it before importing torch: the signal comes among the imports
    install()
    os.kill(os.getpid(), signal.SIGTERM)
faults.stop_at_once_while_starting = install_then_signal
"""


def test_a_signal_among_the_imports_ends_with_128_plus_n_not_the_bare_signal(tmp_path):
    """A subprocess: the imports before main() (seconds of them) are the point."""
    result = run_train(f"output_dir={tmp_path / 'run'}", launcher=with_code(SIGNAL_WHILE_IMPORTING), check=False)
    assert result.returncode == 128 + signal.SIGTERM, (result.returncode, result.stderr[-2000:])
    assert result.stderr.strip() == "SIGTERM: stopped during start-up, before any training step: nothing to save; " \
                                    "the same command starts the run again"
    assert not (tmp_path / "run").exists()


def test_a_pool_forked_during_start_up_ends_when_terminated():
    """The image check's pool is forked during start-up, when a signal stops the run at once: its
    workers must not keep that Python handler (a worker that blocks on its task queue right after
    Pool.terminate()'s SIGTERM never runs it, and terminate() then waits forever), nor stop on Ctrl-C."""
    import multiprocessing

    from train.faults import stop_at_once_while_starting

    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        stop_at_once_while_starting()
        with multiprocessing.get_context("fork").Pool(2) as pool:
            handlers = pool.map(worker_signal_handlers, range(4))
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
    assert set(handlers) == {(signal.SIG_DFL, signal.SIG_IGN)}


def worker_signal_handlers(_) -> tuple:
    return signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
