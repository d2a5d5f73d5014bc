"""Faults: preemption by signal, non-finite losses, damaged checkpoints."""
import json
import shutil

import pytest
import timm
import torch
from accelerate import Accelerator

from conftest import digits_val_batch, run_train
from models.factory import Normalized
from train.checkpoint import TrainState
from train.faults import NonFiniteLoss
from train.loop import train_step
from train.methods import StepContext
from train.optim import create_optimizer, create_schedule


@pytest.fixture
def step_parts(demo_cfg):
    def make(*overrides):
        cfg = demo_cfg("method=vanilla", *overrides)
        torch.manual_seed(0)
        model = Normalized(timm.create_model("resnet18", num_classes=10))
        accelerator = Accelerator(cpu=True)
        optimizer = create_optimizer(cfg, model, 1)
        model, optimizer = accelerator.prepare(model, optimizer)
        scheduler = create_schedule(cfg, optimizer, 10)
        ctx = StepContext(model, accelerator.unwrap_model(model), cfg, 10)
        return ctx, accelerator, optimizer, scheduler
    return make


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_non_finite_loss_never_reaches_the_weights(step_parts, digits_root, policy):
    ctx, accelerator, optimizer, scheduler = step_parts(f"on_nonfinite={policy}")
    images, labels = digits_val_batch(digits_root, 16)
    images[3, 0, 5, 5] = float("nan")  # one bad pixel poisons the batch's loss
    before = {k: v.clone() for k, v in ctx.model.state_dict().items()}
    state = TrainState(epoch=2, batch=7, step=40)
    if policy == "stop":
        with pytest.raises(NonFiniteLoss, match=r"step 41 \(epoch 3, batch 8\)"):
            train_step(ctx, accelerator, optimizer, scheduler, state, images, labels, sync=True)
    else:
        assert train_step(ctx, accelerator, optimizer, scheduler, state, images, labels, sync=True) is None
        assert all(p.grad is None for p in ctx.model.parameters())
    assert state.step == 40
    assert all(torch.equal(before[k], v) for k, v in ctx.model.state_dict().items())


def test_a_finite_step_moves_the_weights(step_parts, digits_root):
    ctx, accelerator, optimizer, scheduler = step_parts()
    images, labels = digits_val_batch(digits_root, 16)
    before = ctx.model.net.fc.weight.clone()
    state = TrainState()
    out = train_step(ctx, accelerator, optimizer, scheduler, state, images, labels, sync=True)
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
