"""Run options end to end on one small run, trained for 1 epoch and then extended to 2 by the same
command: gradient accumulation over an uneven epoch, log_every, checkpoint_every_steps, the LR
schedule per step across the extension, eval_aux_norm and `tools/evaluate.py --norm aux`; and the
same run rewritten as it was written before the BatchNorm-era names became norm names (it loads,
its export loads, the same command continues it)."""
import json
import math
import shutil

import pytest
import torch

from conftest import old_single_file_export, tool_in_process, train_in_process

# advprop on timm's small test ResNet: 22 batches of 64 an epoch, 4 per optimizer step, so 6 steps an
# epoch, the last of 2 batches; global batch 256, so LR = lr_per_256 = 0.4 (configs/demo.yaml)
OPTIONS = ["tracker=none", "model=test_resnet", "attack.steps=1", "eval_robust=false", "image_log_every=0",
           "grad_accum_steps=4", "log_every=2", "checkpoint_every_steps=4", "keep_checkpoints=10",
           "schedule.warmup_epochs=0.5", "eval_aux_norm=true"]
STEPS_PER_EPOCH, BASE_LR, WARMUP_LR, MIN_LR = 6, 0.4, 1e-6, 1e-5


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def extended_run(digits_root, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("extended") / "run"
    common = [f"data.root={digits_root}", f"output_dir={run_dir}", *OPTIONS]
    one_thread = {"OMP_NUM_THREADS": "1"}  # conftest's one_thread, for the runs
    train_in_process(*common, "epochs=1", env=one_thread)
    resumed = train_in_process(*common, "epochs=2", env=one_thread)
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


def test_eval_aux_norm_and_evaluate_norm_aux_agree(extended_run, digits_root, tmp_path):
    epochs = [line for line in read_jsonl(extended_run / "metrics.jsonl") if "val/top1" in line]
    assert [line["epoch"] for line in epochs] == [1, 2] and all("val_aux/top1" in line for line in epochs)
    assert epochs[-1]["val_aux/loss"] != epochs[-1]["val/loss"]  # other norms, other numbers
    report = tmp_path / "aux.json"
    result = tool_in_process("evaluate.py", extended_run / "checkpoints" / "epoch_0002", "--data", digits_root / "val",
                             "--norm", "aux", "--json", report, env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    aux = json.loads(report.read_text())["clean"]
    assert aux["top1"] == pytest.approx(epochs[-1]["val_aux/top1"])
    assert aux["loss"] == pytest.approx(epochs[-1]["val_aux/loss"], rel=1e-5)


def as_made_before_the_rename(run_dir, tmp_path):
    """A copy of run_dir as this trainer wrote it when only BatchNorms were dual: eval_aux_bn in
    every config.yaml, final_main_bn.safetensors of format advprop-main-bn (a single file: no final_model/)."""
    old = tmp_path / "old_run"
    shutil.copytree(run_dir, old, symlinks=True)
    for config in [old / "config.yaml", *old.glob("checkpoints/*/config.yaml")]:
        if config.parent.is_symlink():  # last, best: another folder's file
            continue
        text = config.read_text()
        assert "eval_aux_norm: true" in text
        config.write_text(text.replace("eval_aux_norm:", "eval_aux_bn:"))
    old_single_file_export(old / "final_model", old / "final_main_bn.safetensors", export_format="advprop-main-bn")
    shutil.rmtree(old / "final_model")
    return old


def test_a_run_and_export_from_before_the_rename_load_and_resume(extended_run, digits_root, tmp_path):
    from tools.evaluate import parse_args
    from tools.robustness.load import load_any

    old = as_made_before_the_rename(extended_run, tmp_path)
    old_export = tmp_path / "old_export.safetensors"  # an export of format advprop-main-bn, elsewhere
    shutil.copy(old / "final_main_bn.safetensors", old_export)
    model, cfg, classes = load_any(old_export)
    new_model, _, _ = load_any(extended_run / "final_model")
    assert cfg.model == "test_resnet" and classes == [str(d) for d in range(10)]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), new_model.state_dict().values()))
    folder_model, folder_cfg, _ = load_any(old / "checkpoints" / "epoch_0002")  # its config says eval_aux_bn
    assert folder_cfg.eval_aux_norm is True and len(folder_model.state_dict()) > len(model.state_dict())
    assert parse_args(["x", "--data", "d", "--bn", "aux"]).norm == "aux"  # evaluate.py's old option name

    # the same command continues it (the old key on the command line too), not "other settings"
    options = [o.replace("eval_aux_norm", "eval_aux_bn") for o in OPTIONS]
    rerun = train_in_process(f"data.root={digits_root}", f"output_dir={old}", *options, "epochs=2",
                             env={"OMP_NUM_THREADS": "1"})
    assert "redoing the final evaluation" in rerun.stdout
    assert "eval_aux_bn is now called eval_aux_norm" in rerun.stderr
    assert (old / "final_model" / "config.json").is_file() and not (old / "final_main_bn.safetensors").exists()
