"""A size that cannot fit ends in one line naming batch_size, data.image_size and grad_accum_steps:
on a GPU torch's out-of-memory error explained, on a CPU an estimate from a tiny step of the real
method (train/memory_check.py) refused before anything is written. Runs that fit are not refused.

The module imports train/memory_check.py first: where it is missing, no run of 4096-px images
starts growing into this machine's OOM killer."""
from __future__ import annotations

import pytest
import torch

import train.memory_check as memory_check  # noqa: F401  (first: see the module doc)
from conftest import one_error_line, train_in_process

QUICK = ["model=test_resnet", "epochs=1", "tracker=none", "eval_robust=false", "data.workers=0", "image_log_every=0"]
SETTINGS = ("batch_size={batch} per process", "data.image_size={size}", "grad_accum_steps={accum}")


def named(line: str, batch: int, size: int, accum: int) -> bool:
    return all(part.format(batch=batch, size=size, accum=accum) in line for part in SETTINGS)


@pytest.mark.parametrize("error", [
    torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of "
                                "79.19 GiB of which 1.2 GiB is free."),
    RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you "
                 "tried to allocate 21474836480 bytes. Error code 12 (Cannot allocate memory)"),
])
def test_an_out_of_memory_error_in_a_step_is_one_line_naming_what_to_lower(error, few_digits, tmp_path, monkeypatch):
    import train.loop

    def step(*args, **kwargs):
        raise error

    monkeypatch.setattr(train.loop, "train_step", step)
    result = train_in_process(f"data.root={few_digits}", f"output_dir={tmp_path / 'run'}", "batch_size=16",
                              "grad_accum_steps=2", *QUICK, check=False)
    line = one_error_line(result)
    assert line.startswith("error: out of memory (allocating 2") and named(line, 16, 32, 2), line
    assert "lower batch_size" in line and "data.image_size" in line


def test_other_runtime_errors_still_propagate(few_digits, tmp_path, monkeypatch):
    import train.loop

    def step(*args, **kwargs):
        raise RuntimeError("a bug, not a size")

    monkeypatch.setattr(train.loop, "train_step", step)
    result = train_in_process(f"data.root={few_digits}", f"output_dir={tmp_path / 'run'}", *QUICK, check=False)
    assert result.returncode == 1 and "RuntimeError: a bug, not a size" in result.stderr


def test_the_demo_at_4096_px_is_refused_before_anything_is_written(few_digits, tmp_path):
    """The demo's recipe (resnet18, AdvProp, batch 64) at data.image_size=4096 needs terabytes: refused
    from a step of two 64-px images, on any machine, before the run folder exists."""
    result = train_in_process(f"data.root={few_digits}", f"output_dir={tmp_path / 'run'}", "data.image_size=4096",
                              "tracker=none", check=False)
    line = one_error_line(result)
    assert line.startswith("error: a training step needs about ") and "GB are available" in line, line
    assert named(line, 64, 4096, 1) and "measured on a step of 10 images at 64 px" in line
    assert not (tmp_path / "run").exists()


def step_context(*overrides: str):
    """The run's model, unwrapped, in a StepContext, for a config of the demo recipe (10 classes)."""
    return memory_check.config_step_context(list(overrides), num_classes=10)


@pytest.mark.parametrize("overrides, lowest_gb", [
    ((), 0.05),  # the demo's defaults
    # AdvProp keeps the clean and the adversarial activations for one backward
    (("model=resnet50", "data.image_size=224", "batch_size=64"), 4.0),
])
def test_runs_that_fit_a_24_gb_machine_are_not_refused(overrides, lowest_gb, monkeypatch, one_thread):
    ctx = step_context(*overrides)
    needed, _ = memory_check.estimated_bytes(ctx)
    assert lowest_gb * 2**30 < needed < 24 * 2**30, needed / 2**30
    monkeypatch.setattr(memory_check, "available_bytes", lambda: 24 * 2**30)
    assert memory_check.memory_problem(ctx, processes=1) is None


@pytest.mark.parametrize("method", ["fast_advprop", "pyramid_at", "goodfellow_mix"])
def test_every_method_can_be_probed(method, one_thread):
    """A method that splits its batch (fast_advprop's adversarial fifth) still gives train-mode
    BatchNorm more than one value per channel in every pass of the probe."""
    extra = ["attack.targeted=false"] if method == "fast_advprop" else []
    needed, how = memory_check.estimated_bytes(step_context("model=test_resnet", f"method={method}", *extra))
    assert needed > 0 and "at 32 px" in how


def test_the_estimate_grows_with_images_and_pixels_as_measured(one_thread):
    """The extrapolation's premise, on the real model and method: saved activations are linear in
    images and in pixels (within the stem's and the classifier's small fixed share)."""
    ctx = step_context("model=test_resnet", "data.image_size=64")
    base = memory_check.probe_bytes(ctx, 32, 2)
    assert memory_check.probe_bytes(ctx, 32, 4) == pytest.approx(2 * base, rel=0.02)
    assert memory_check.probe_bytes(ctx, 64, 2) == pytest.approx(4 * base, rel=0.15)


def test_the_probe_leaves_the_run_as_it_was(one_thread):
    """Weights, BN statistics and the random stream are untouched (a resumed run stays bit-exact)."""
    ctx = step_context("model=test_resnet")
    state = {k: v.clone() for k, v in ctx.attack_model.state_dict().items()}
    rng = torch.get_rng_state()
    memory_check.estimated_bytes(ctx)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, state[k]) for k, v in ctx.attack_model.state_dict().items())
    assert all(p.grad is None for p in ctx.attack_model.parameters())
