"""Run options end to end on one small run, trained for 1 epoch and then extended to 2 by the same
command: gradient accumulation over an uneven epoch, log_every, checkpoint_every_steps, the LR
schedule per step across the extension, eval_aux_bn and `tools/evaluate.py --bn aux`."""
import json
import math
import os
import subprocess
import sys

import pytest

from conftest import REPO, run_train

# advprop on timm's small test ResNet: 22 batches of 64 an epoch, 4 per optimizer step, so 6 steps an
# epoch, the last of 2 batches; global batch 256, so LR = lr_per_256 = 0.4 (configs/demo.yaml)
OPTIONS = ["tracker=none", "model=test_resnet", "attack.steps=1", "eval_robust=false", "image_log_every=0",
           "grad_accum_steps=4", "log_every=2", "checkpoint_every_steps=4", "keep_checkpoints=10",
           "schedule.warmup_epochs=0.5", "eval_aux_bn=true"]
STEPS_PER_EPOCH, BASE_LR, WARMUP_LR, MIN_LR = 6, 0.4, 1e-6, 1e-5


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def extended_run(digits_root, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("extended") / "run"
    common = [f"data.root={digits_root}", f"output_dir={run_dir}", *OPTIONS]
    with pytest.MonkeyPatch.context() as env:
        env.setenv("OMP_NUM_THREADS", "1")  # conftest's one_thread, for the subprocesses
        run_train(*common, "epochs=1")
        resumed = run_train(*common, "epochs=2")
    assert "resuming from" in resumed.stdout and "epoch 2" in resumed.stdout
    return run_dir


def train_lines(run_dir):
    return [line for line in read_jsonl(run_dir / "metrics.jsonl") if "train/loss/clean" in line]


def test_uneven_epoch_ends_with_a_step_and_log_every_counts_steps(extended_run):
    assert [line["step"] for line in train_lines(extended_run)] == [2, 4, 6, 8, 10, 12]
    last = json.loads((extended_run / "checkpoints" / "last" / "train_state.json").read_text())
    assert (last["epoch"], last["step"]) == (2, 2 * STEPS_PER_EPOCH)


def test_checkpoint_every_steps_saves_mid_epoch(extended_run):
    folders = sorted(p.name for p in (extended_run / "checkpoints").iterdir() if not p.is_symlink())
    assert folders == ["epoch_0001", "epoch_0002", "step_00000004", "step_00000008"]  # 6 and 12 end epochs
    states = [json.loads((extended_run / "checkpoints" / name / "train_state.json").read_text())
              for name in ("step_00000004", "step_00000008")]
    assert [(s["epoch"], s["batch"], s["step"]) for s in states] == [(0, 16, 4), (1, 8, 8)]


def scheduled_lr(step: int, epochs: int) -> float:
    """The recipe's schedule: linear warm-up from warmup_lr over warmup_epochs, then cosine over the
    whole run (warm-up included) down to min_lr."""
    warmup = round(0.5 * STEPS_PER_EPOCH)
    if step < warmup:
        return WARMUP_LR + step * (BASE_LR - WARMUP_LR) / warmup
    total = epochs * STEPS_PER_EPOCH
    return MIN_LR + 0.5 * (BASE_LR - MIN_LR) * (1 + math.cos(math.pi * min(step, total) / total))


def test_lr_per_step_follows_the_schedule_and_the_extended_epochs(extended_run):
    """Each line's perf/lr is the LR of the step after it: the first run's follow a 1-epoch cosine,
    the resumed run's the 2-epoch one (not min_lr, where the 1-epoch schedule ended)."""
    logged = {line["step"]: line["perf/lr"] for line in train_lines(extended_run)}
    expected = {step: scheduled_lr(step, epochs=1 if step <= STEPS_PER_EPOCH else 2) for step in logged}
    assert logged == pytest.approx(expected, rel=1e-6)
    assert logged[8] > 10 * MIN_LR


def test_eval_aux_bn_and_evaluate_bn_aux_agree(extended_run, digits_root, tmp_path):
    epochs = [line for line in read_jsonl(extended_run / "metrics.jsonl") if "val/top1" in line]
    assert [line["epoch"] for line in epochs] == [1, 2] and all("val_aux/top1" in line for line in epochs)
    assert epochs[-1]["val_aux/loss"] != epochs[-1]["val/loss"]  # other norms, other numbers
    report = tmp_path / "aux.json"
    result = subprocess.run([sys.executable, str(REPO / "tools" / "evaluate.py"),
                             str(extended_run / "checkpoints" / "epoch_0002"), "--data", str(digits_root / "val"),
                             "--bn", "aux", "--json", str(report)], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    aux = json.loads(report.read_text())["clean"]
    assert aux["top1"] == pytest.approx(epochs[-1]["val_aux/top1"])
    assert aux["loss"] == pytest.approx(epochs[-1]["val_aux/loss"], rel=1e-5)
