"""A NaN in real CUDA steps, with the device-side guard that nonfinite_check=auto picks on CUDA: the
step runs as a no-op on the device (weights, optimizer state and BN statistics keep their values,
bit for bit) and the run says so at its next report. The run-level test runs here on the CPU with
nonfinite_check=device as well, so it is known to fail when the guard stays silent."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from accelerate import Accelerator

from conftest import REPO, digits_val_batch
from models.factory import create_model
from test_faults import PARTS, assert_unchanged, everything, poisoned
from train.run_state import TrainState
from train.loop import train_step
from train.methods import METHODS, StepContext
from train.optim import create_optimizer, create_schedule
from train.step_guard import StepGuard

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

# train/run.py with the loss term `adv` of the third step made NaN (as tests/test_faults.py's poisoned)
RUN_WITH_A_NAN = """
import dataclasses, runpy, sys
from train import methods
original, calls = methods.METHODS["advprop"].step, [0]
def poisoned(ctx, images, labels):
    calls[0] += 1
    steps = original(ctx, images, labels)
    try:
        while True:
            request = next(steps)
            if calls[0] == 3 and "adv" in request.terms:
                request.terms["adv"] = request.terms["adv"] * float("nan")
            yield request
    except StopIteration as done:
        return done.value
methods.METHODS["advprop"] = dataclasses.replace(methods.METHODS["advprop"], step=poisoned)
sys.argv = ["train/run.py", *sys.argv[1:]]
runpy.run_path("train/run.py", run_name="__main__")
"""


@pytest.mark.gpu
@pytest.mark.timeout(120)  # `pytest -m gpu` must finish in 2 minutes: a hang fails here
@requires_cuda
@pytest.mark.parametrize("method, part", [(m, p) for m, parts in PARTS.items() for p in parts])
def test_a_nan_in_a_cuda_step_leaves_everything_as_it_was(demo_cfg, digits_root, monkeypatch, method, part):
    cfg = demo_cfg(f"method={method}", "attack.steps=1", "batch_size=20", "model=test_resnet", "on_nonfinite=skip",
                   *(["attack.targeted=false"] if method == "fast_advprop" else []))
    torch.manual_seed(0)
    model = create_model(cfg, 10, dual_norm=METHODS[method].dual_norm).to(memory_format=torch.channels_last)
    accelerator = Accelerator(mixed_precision="bf16")
    optimizer = create_optimizer(cfg, model, 1)
    model, optimizer = accelerator.prepare(model, optimizer)
    scheduler = create_schedule(cfg, optimizer, 10)
    ctx = StepContext(model, accelerator.unwrap_model(model), cfg, 10)
    guard = StepGuard(ctx.attack_model, optimizer, accelerator, mode="auto", on_nonfinite="skip")
    assert accelerator.device.type == "cuda" and guard.device_side
    images, labels = (t.to(accelerator.device) for t in digits_val_batch(digits_root, 20))
    state = TrainState()
    train_step(ctx, accelerator, optimizer, scheduler, state, images, labels, True, guard)
    before = everything(ctx, optimizer)  # after one good step: the optimizer has its state
    monkeypatch.setitem(METHODS, method, poisoned(method, part))
    train_step(ctx, accelerator, optimizer, scheduler, state, images, labels, True, guard)
    assert_unchanged(before, everything(ctx, optimizer))
    assert state.step == 2 and guard.report("here") == 1 and guard.report("here") == 0


@pytest.mark.slow  # one epoch of the demo: ~30 s on 2 idle cores
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, requires_cuda])])
@pytest.mark.timeout(600)
def test_a_run_with_a_nan_step_says_so_and_trains_on(digits_root, tmp_path, device):
    run_dir = tmp_path / "run"
    check = "nonfinite_check=device" if device == "cpu" else "nonfinite_check=auto"  # auto: device on CUDA
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1",
           **({"CUDA_VISIBLE_DEVICES": ""} if device == "cpu" else {})}
    result = subprocess.run(
        [sys.executable, "-c", RUN_WITH_A_NAN, f"data.root={digits_root}", f"output_dir={run_dir}", "tracker=none",
         "model=test_resnet", "method=advprop", "attack.steps=1", "epochs=1", "eval_robust=false", "image_log_every=0",
         "log_every=5", "on_nonfinite=skip", check],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=580)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    warnings = [line for line in output.splitlines() if "non-finite loss" in line]
    assert len(warnings) == 1 and "skipped 1 step(s)" in warnings[0] and "up to step 5" in warnings[0], warnings
    # the other steps trained (one epoch leaves val accuracy near chance, so the training loss says it)
    losses = [json.loads(line).get("train/loss/clean") for line in (run_dir / "metrics.jsonl").open()]
    losses = [loss for loss in losses if loss is not None]
    assert all(math.isfinite(loss) for loss in losses) and losses[-1] < 0.6 * losses[0], losses
