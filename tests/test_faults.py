"""Faults: preemption by signal, non-finite losses, damaged checkpoints."""
import json
import shutil
from dataclasses import replace

import pytest
import torch
from accelerate import Accelerator

from conftest import digits_val_batch, run_train
from models.factory import create_model
from train.checkpoint import TrainState
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


def test_damaged_newest_checkpoint_falls_back_to_the_previous(trained_demo_run, digits_root, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(trained_demo_run, run_dir, symlinks=True)
    newest = run_dir / "checkpoints" / "epoch_0008"
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # disk full while saving
    (run_dir / "checkpoints" / ".tmp-epoch_0009").mkdir()  # a save that died half-way
    result = run_train(f"data.root={digits_root}", f"output_dir={run_dir}", "tracker=none", "epochs=8",
                       "eval_robust=false")
    assert "skipping damaged checkpoint" in result.stdout + result.stderr
    assert "resuming from" in result.stdout and "epoch_0007" in result.stdout
    evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert evals[-1]["final/clean_top1"] >= 90  # epoch 8 retrained from epoch 7's weights
    assert json.loads((run_dir / "checkpoints" / "last" / "train_state.json").read_text())["epoch"] == 8


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
    result = run_train(f"data.root={digits_root}", f"output_dir={run_dir}", "tracker=none", "epochs=9",
                       f"resume={folder}", check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"checkpoint {folder} cannot be loaded" in result.stderr and "weights_only" in result.stderr
    assert not marker.exists()
