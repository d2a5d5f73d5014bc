"""Faults: preemption by signal, non-finite losses and weights (never saved), damaged or tampered
checkpoints, a crash in validation."""
import json
import shutil
from dataclasses import replace

import pytest
import torch
from accelerate import Accelerator

from conftest import DEMO_RUN, digits_val_batch, run_train, train_in_process
from models.factory import create_model
from train.run_state import TrainState
from train.faults import NonFiniteLoss
from train.loop import train_step
from train.methods import METHODS, StepContext
from train.optim import create_optimizer, create_schedule
from train.step_guard import StepGuard


PARTS = {"vanilla": ["clean"], "adv_train": ["adv"], "goodfellow_mix": ["clean", "adv"],
         "advprop": ["clean", "adv"], "fast_advprop": ["clean", "attack", "adv"]}


@pytest.fixture
def step_parts(demo_cfg, digits_root):
    def make(method, *overrides):
        cfg = demo_cfg(f"method={method}", "attack.steps=1", "batch_size=20",
                       *(["attack.targeted=false"] if method == "fast_advprop" else []), *overrides)
        torch.manual_seed(0)
        model = create_model(cfg, 10, dual_norm=METHODS[method].dual_norm)
        accelerator = Accelerator(cpu=True)
        optimizer = create_optimizer(cfg, model, 1)
        model, optimizer = accelerator.prepare(model, optimizer)
        scheduler = create_schedule(cfg, optimizer, 10)
        ctx = StepContext(model, accelerator.unwrap_model(model), cfg, 10)
        guard = StepGuard(ctx.attack_model, optimizer, accelerator, mode=cfg.nonfinite_check,
                          on_nonfinite=cfg.on_nonfinite)
        images, labels = digits_val_batch(digits_root, 20)
        return ctx, accelerator, optimizer, scheduler, guard, images, labels
    return make


def poisoned(method, part):
    """The record of `method` with the loss term `part` made NaN wherever its step yields it."""
    original = METHODS[method].step

    def wrapper(ctx, images, labels):
        steps = original(ctx, images, labels)
        try:
            while True:
                request = next(steps)
                if part in request.terms:
                    request.terms[part] = request.terms[part] * float("nan")
                yield request
        except StopIteration as done:
            return done.value
    return replace(METHODS[method], step=wrapper)


def everything(ctx, optimizer) -> dict:
    """Weights, BN statistics and optimizer state, copied."""
    state = {f"model/{k}": v.clone() for k, v in ctx.attack_model.state_dict().items()}
    for i, per_param in enumerate(optimizer.state.values()):
        state.update({f"optimizer/{i}/{k}": v.clone() for k, v in per_param.items() if torch.is_tensor(v)})
    return state


def assert_unchanged(before: dict, after: dict):
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, changed[:5]


@pytest.mark.parametrize("check", ["host", "device"])
@pytest.mark.parametrize("method, part", [(m, p) for m, parts in PARTS.items() for p in parts])
def test_a_non_finite_part_of_any_method_never_reaches_the_weights(step_parts, monkeypatch, method, part, check):
    ctx, accelerator, optimizer, scheduler, guard, images, labels = step_parts(
        method, f"nonfinite_check={check}", "on_nonfinite=skip")
    state = TrainState()
    assert train_step(ctx, accelerator, optimizer, scheduler, state, images, labels, True, guard) is not None
    before = everything(ctx, optimizer)  # after one good step: the optimizer has its state
    monkeypatch.setitem(METHODS, method, poisoned(method, part))
    out = train_step(ctx, accelerator, optimizer, scheduler, state, images, labels, True, guard)
    assert_unchanged(before, everything(ctx, optimizer))
    assert all(p.grad is None for p in ctx.model.parameters())
    if check == "host":  # undone at once, no optimizer step
        assert out is None and state.step == 1 and guard.report("here") == 0
    else:  # the step ran as a no-op on the device; the host hears of it at the report
        assert state.step == 2 and guard.report("here") == 1 and guard.report("here") == 0


@pytest.mark.parametrize("check", ["host", "device"])
def test_stop_policy_raises_naming_the_step(step_parts, monkeypatch, check):
    ctx, accelerator, optimizer, scheduler, guard, images, labels = step_parts(
        "fast_advprop", f"nonfinite_check={check}", "on_nonfinite=stop")
    state = TrainState(epoch=2, batch=7, step=40)
    train_step(ctx, accelerator, optimizer, scheduler, state, images, labels, True, guard)
    before = everything(ctx, optimizer)
    monkeypatch.setitem(METHODS, "fast_advprop", poisoned("fast_advprop", "attack"))
    if check == "host":
        with pytest.raises(NonFiniteLoss, match=r"step 42 \(epoch 3, batch 8\).*attack nan"):
            train_step(ctx, accelerator, optimizer, scheduler, state, images, labels, True, guard)
    else:
        train_step(ctx, accelerator, optimizer, scheduler, state, images, labels, True, guard)
        with pytest.raises(NonFiniteLoss, match="not finite in 1 step"):
            guard.report("step 42")
    assert_unchanged(before, everything(ctx, optimizer))


@pytest.mark.parametrize("check", ["host", "device"])
@pytest.mark.parametrize("first", [True, False], ids=["first step", "later step"])
def test_an_optimizer_step_that_makes_weights_non_finite_is_not_kept(step_parts, check, first):
    """A finite loss, but an LR of NaN: the step would write NaN weights and momentum."""
    ctx, accelerator, optimizer, scheduler, guard, images, labels = step_parts(
        "advprop", f"nonfinite_check={check}", "on_nonfinite=skip")
    state = TrainState()
    if not first:  # the optimizer has its state (momentum) to give back
        train_step(ctx, accelerator, optimizer, scheduler, state, images, labels, True, guard)
    before = everything(ctx, optimizer)
    for group in optimizer.param_groups:
        group["lr"] = float("nan")
    out = train_step(ctx, accelerator, optimizer, scheduler, state, images, labels, True, guard)
    assert_unchanged(before, everything(ctx, optimizer))
    steps_before = 0 if first else 1
    if check == "host" or first:  # given back at once, not counted
        assert out is None and state.step == steps_before and guard.report("here") == 0
    else:  # a no-op on the device, counted as skipped at the report
        assert state.step == 2 and guard.report("here") == 1


@pytest.mark.parametrize("check", ["host", "device"])
def test_stop_policy_names_the_step_that_made_weights_non_finite(step_parts, check):
    ctx, accelerator, optimizer, scheduler, guard, images, labels = step_parts(
        "vanilla", f"nonfinite_check={check}", "on_nonfinite=stop")
    state = TrainState()
    train_step(ctx, accelerator, optimizer, scheduler, state, images, labels, True, guard)
    optimizer.param_groups[0]["lr"] = float("inf")
    if check == "host":
        with pytest.raises(NonFiniteLoss, match=r"at step 2 \(epoch 1, batch 1\) the optimizer step made weights.*"
                                                r"not kept.*those of step 1\."):
            train_step(ctx, accelerator, optimizer, scheduler, state, images, labels, True, guard)
    else:
        before = everything(ctx, optimizer)
        train_step(ctx, accelerator, optimizer, scheduler, state, images, labels, True, guard)
        assert_unchanged(before, everything(ctx, optimizer))
        with pytest.raises(NonFiniteLoss, match=r"not finite in 1 step\(s\) up to step 2; those steps were undone"):
            guard.report("step 2")


def test_no_checkpoint_or_export_of_non_finite_weights_is_written(step_parts, tmp_path):
    from models.export import NonFiniteWeights
    from train.checkpoint_io import save_checkpoint
    from train.model_export import export_model

    ctx, accelerator, optimizer, *_ = step_parts("advprop")
    with torch.no_grad():
        ctx.attack_model.net.fc.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteWeights, match=r"not writing checkpoint epoch_0001 .*1 of its tensors hold NaN.*"
                                               r"net\.fc\.weight"):
        save_checkpoint(accelerator, tmp_path / "run", "epoch_0001", TrainState(epoch=1), ctx.cfg, list("0123456789"),
                        is_best=True, keep=2)
    with pytest.raises(NonFiniteWeights, match=r"final_model: 1 of its tensors .*fc\.weight"):
        export_model(ctx.attack_model.net, tmp_path / "final_model", ctx.cfg, list("0123456789"), {"epoch": 1})
    assert list(tmp_path.iterdir()) == []  # no folder, no file, no temporary


OVERFLOWING_LR = ["model=test_resnet", "method=vanilla", "epochs=1", "tracker=none", "eval_robust=false",
                  "log_every=1", "optimizer.lr_per_256=1.3e39"]  # finite, but LR × gradient overflows float32


def all_tensors_finite(path) -> bool:
    from safetensors.torch import load_file
    return all(bool(torch.isfinite(t).all()) for t in load_file(str(path)).values() if t.is_floating_point())


def test_a_run_whose_steps_would_overflow_the_weights_never_saves_them(few_digits, tmp_path):
    skipped = train_in_process(f"data.root={few_digits}", f"output_dir={tmp_path / 'skip'}", *OVERFLOWING_LR,
                               "on_nonfinite=skip", "nonfinite_check=device")  # the first step at warm-up LR, then huge
    # step 1 at the warm-up LR is kept; step 2 (the full LR) is the first undone: its weights, not a later loss
    assert "skipped 1 step(s) with a non-finite loss or weights up to step 2" in skipped.stdout + skipped.stderr
    files = sorted((tmp_path / "skip").rglob("*.safetensors"))
    assert {p.name for p in files} == {"model.safetensors"}  # checkpoints' and the export's
    assert tmp_path / "skip" / "final_model" / "model.safetensors" in files
    assert all(all_tensors_finite(p) for p in files), files

    stopped = run_train(f"data.root={few_digits}", f"output_dir={tmp_path / 'stop'}", *OVERFLOWING_LR,
                        "schedule.warmup_epochs=0", "nonfinite_check=host", check=False)  # exit 3 as a shell sees it
    assert stopped.returncode == 3, stopped.stderr[-3000:]
    errors = [line for line in stopped.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in stopped.stderr
    assert "at step 1 (epoch 1, batch 1) the optimizer step made weights or optimizer state non-finite" in errors[0]
    assert "the last kept weights are those of the start" in errors[0]
    assert not (tmp_path / "stop" / "checkpoints").exists() and not list((tmp_path / "stop").rglob("*.safetensors"))


def test_a_nan_image_stops_before_the_weights_change(step_parts):
    ctx, accelerator, optimizer, scheduler, guard, images, labels = step_parts("vanilla")
    images[3, 0, 5, 5] = float("nan")  # one bad pixel poisons the batch's loss
    before = everything(ctx, optimizer)
    with pytest.raises(NonFiniteLoss, match=r"step 1 \(epoch 1, batch 1\)"):
        train_step(ctx, accelerator, optimizer, scheduler, TrainState(), images, labels, True, guard)
    assert_unchanged(before, everything(ctx, optimizer))


def test_a_finite_step_moves_the_weights(step_parts):
    ctx, accelerator, optimizer, scheduler, guard, images, labels = step_parts("vanilla")
    before = ctx.model.net.fc.weight.clone()
    state = TrainState()
    out = train_step(ctx, accelerator, optimizer, scheduler, state, images, labels, True, guard)
    assert out is not None and state.step == 1 and not torch.equal(before, ctx.model.net.fc.weight)


def test_damaged_newest_checkpoint_falls_back_to_the_previous(few_digits, tmp_path):
    run_dir = tmp_path / "run"
    args = [f"data.root={few_digits}", f"output_dir={run_dir}", "model=test_resnet", "method=vanilla", "epochs=2",
            "tracker=none", "eval_robust=false"]
    train_in_process(*args)
    newest = run_dir / "checkpoints" / "epoch_0002"
    weights = newest / "model.safetensors"
    trained = weights.read_bytes()
    weights.write_bytes(trained[:1000])  # disk full while saving
    (run_dir / "checkpoints" / ".tmp-epoch_0003").mkdir()  # a save that died half-way
    result = train_in_process(*args)
    assert "skipping damaged checkpoint" in result.stdout + result.stderr
    assert "resuming from" in result.stdout and "epoch_0001" in result.stdout
    assert json.loads((run_dir / "checkpoints" / "last" / "train_state.json").read_text())["epoch"] == 2
    assert (run_dir / "checkpoints" / "last" / "model.safetensors").read_bytes() == trained  # epoch 2 trained again


class RunsCode:
    """A pickle that would run a shell command when unpickled without weights_only."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("victim", ["optimizer.bin", "random_states_0.pkl"])
def test_checkpoint_pickles_load_weights_only(trained_demo_run, digits_root, tmp_path, victim):
    """A checkpoint is data: a tampered optimizer/RNG file is refused, never executed."""
    run_dir = tmp_path / "run"
    shutil.copytree(trained_demo_run, run_dir, symlinks=True)
    folder = run_dir / "checkpoints" / "epoch_0008"
    marker = tmp_path / "code-ran"
    torch.save({"state": RunsCode(marker)}, folder / victim)
    result = train_in_process(f"data.root={digits_root}", f"output_dir={run_dir}", "tracker=none", *DEMO_RUN,
                              "epochs=9", f"resume={folder}", check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    line = next(line for line in result.stderr.splitlines() if line.startswith("error:"))
    assert f"checkpoint {folder} cannot be loaded: {victim} holds pickled objects" in line
    assert "it would call posix.system" in line and "refused, never run" in line
    assert "weights_only=False" not in result.stderr  # no advice to load it unsafely
    assert not marker.exists()


def crashing_first_validation():
    """train/run.py's evaluate, whose first call meets an image it cannot decode."""
    from train.loop import evaluate
    calls = []

    def crashing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise OSError("image file is truncated (3 bytes not processed)")
        return evaluate(*args, **kwargs)
    return crashing


def test_a_crash_in_validation_keeps_the_epochs_training_and_the_rerun_validates_it(few_digits, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    args = [f"data.root={few_digits}", f"output_dir={run_dir}", "model=test_resnet", "method=vanilla", "epochs=2",
            "tracker=none", "eval_robust=false", "log_every=1"]
    monkeypatch.setattr("train.run.evaluate", crashing_first_validation())
    crashed = train_in_process(*args, check=False)
    assert crashed.returncode == 1 and "image file is truncated" in crashed.stderr
    monkeypatch.undo()
    checkpoints = run_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["epoch_0001", "last"]  # no best yet
    saved = json.loads((checkpoints / "last" / "train_state.json").read_text())
    assert (saved["epoch"], saved["step"], saved["validated"]) == (1, 3, False)
    trained = (checkpoints / "epoch_0001" / "model.safetensors").read_bytes()

    resumed = train_in_process(*args)
    assert "epoch 1: its training is saved, its validation is not: validating it" in resumed.stdout
    assert (checkpoints / "epoch_0001" / "model.safetensors").read_bytes() == trained  # not trained again
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines if "val/top1" in line] == [1, 2]  # each epoch validated once
    assert [line["step"] for line in lines if "train/loss/clean" in line] == [1, 2, 3, 4, 5, 6]
    states = {n: json.loads((checkpoints / n / "train_state.json").read_text()) for n in ("epoch_0001", "epoch_0002")}
    assert all(state["validated"] for state in states.values())
    best = f"epoch_{states['epoch_0002']['best_epoch']:04d}"
    assert (checkpoints / "best").resolve().name == best and (checkpoints / "last").resolve().name == "epoch_0002"
    assert (run_dir / "summary.json").exists()
