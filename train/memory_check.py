"""Settings that cannot fit in memory: one line naming them and what to lower, never a silent end.

On a GPU torch raises an out-of-memory error, which `out_of_memory_explained` turns into that line
(exit 2). On a CPU nothing is raised: the process grows into swap or the kernel's OOM killer (a
4096-px demo step grew to 16 GB in 86 s, then was killed without a word). So before the first
step, `check_memory_fits` runs the method's real step (attack included) on a copy of the model
with a tiny batch, measures the most bytes autograd keeps saved for backward at once, and
extrapolates linearly in images × pixels; with the gradients, optimizer state and input batches
added, an estimate above the memory available refuses the run before anything is written. The
estimate leaves out short-lived buffers, so it errs towards letting a run start.

    python -m train.memory_check model=resnet50 data.image_size=224 batch_size=64   # a config's estimate
"""
from __future__ import annotations

import contextlib
import copy
import os
import re
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # as train/run.py, before torch loads OpenMP: threads that wait sleep
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import psutil  # noqa: E402
import torch  # noqa: E402

from common.errors import UserInputError  # noqa: E402

# train-mode BatchNorm needs more than one value per channel in every pass of a step: fast_advprop's
# adversarial fifth of 10 images is 2
PROBE_IMAGES = 10
PROBE_SIZE = 64  # px: larger runs are measured at this size and scaled by their pixels
OPTIMIZER_SLOTS = 2  # state tensors per weight, at most (Adam: 2, SGD with momentum: 1)


class OutOfMemory(UserInputError):
    """The settings need more memory than the device has."""


def settings(cfg) -> str:
    return (f"batch_size={cfg.batch_size} per process, data.image_size={cfg.data.image_size}, "
            f"grad_accum_steps={cfg.grad_accum_steps}")


ADVICE = ("lower batch_size (grad_accum_steps=k keeps the batch of each optimizer step at k × batch_size) or "
          "data.image_size")


@contextlib.contextmanager
def out_of_memory_explained(cfg):
    """An out-of-memory error of torch (CUDA, or a CPU allocation refused) as OutOfMemory, one line."""
    try:
        yield
    except RuntimeError as error:
        if not isinstance(error, torch.OutOfMemoryError) and "can't allocate memory" not in str(error):
            raise
        asked = re.search(r"(?:Tried to allocate|you tried to allocate) ([\d.]+ ?\w+)", str(error))
        raise OutOfMemory(f"out of memory{f' (allocating {asked.group(1)})' if asked else ''} with {settings(cfg)}: "
                          f"{ADVICE}; a run folder with checkpoints keeps its batch and image size, so give a new "
                          f"output_dir") from None


# ---------------------------------------------------------------------------------------------
# The CPU estimate

def peak_saved_bytes(step, excluded: set[int]) -> int:
    """The most bytes that autograd keeps saved for backward at once while step() runs: each storage
    counted once, however many tensors view it; storages in `excluded` (the weights) not at all."""
    live: dict[int, list[int]] = {}  # storage address → [bytes, tensors saved on it]
    usage = {"now": 0, "peak": 0}

    class Saved:  # autograd holds it until its graph is freed, then __del__ runs
        def __init__(self, tensor: torch.Tensor):
            self.tensor, storage = tensor, tensor.untyped_storage()
            self.address = storage.data_ptr()
            if self.address in excluded:
                return
            entry = live.setdefault(self.address, [storage.nbytes(), 0])
            if entry[1] == 0:
                usage["now"] += entry[0]
                usage["peak"] = max(usage["peak"], usage["now"])
            entry[1] += 1

        def __del__(self):
            entry = live.get(self.address)
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] == 0:
                usage["now"] -= live.pop(self.address)[0]

    with torch.autograd.graph.saved_tensors_hooks(Saved, lambda saved: saved.tensor):
        step()
    return usage["peak"]


def method_step(ctx, images: torch.Tensor, labels: torch.Tensor):
    """One training step of the run's method on ctx's model, without an optimizer step."""
    from train.methods import method_of

    def run() -> None:
        steps = method_of(ctx.cfg).step(ctx, images, labels)
        request = next(steps, None)
        while request is not None:
            sum(request.terms.values()).backward()
            request = next(steps, None)
    return run


def probe_bytes(ctx, size: int, images: int) -> int:
    """peak_saved_bytes of a step with `images` random images of size × size, on a copy of the model
    (its weights, BN statistics and the random streams of the run stay as they were)."""
    from train.methods import StepContext

    model = copy.deepcopy(ctx.attack_model).train()
    excluded = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    probe = StepContext(model, model, ctx.cfg, ctx.num_classes)
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[]):
        x = torch.rand(images, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
        labels = torch.arange(images, device=device) % ctx.num_classes
        return peak_saved_bytes(method_step(probe, x, labels), excluded)


def estimated_bytes(ctx) -> tuple[int, str]:
    """(bytes a training step of the run needs beyond what is allocated now, how it was measured)."""
    cfg = ctx.cfg
    size = max(cfg.data.image_size, cfg.data.ffcv.progressive.max_res)
    probe_size = min(size, PROBE_SIZE)
    try:
        saved = probe_bytes(ctx, probe_size, PROBE_IMAGES)
    except Exception:  # a model made for one input size only (ViT): measured at the run's own size
        probe_size = size
        saved = probe_bytes(ctx, probe_size, PROBE_IMAGES)
    activations = saved * cfg.batch_size / PROBE_IMAGES * (size / probe_size) ** 2
    weights = sum(p.numel() * p.element_size() for p in ctx.attack_model.parameters())
    workers = max(1, cfg.data.workers)
    batches = cfg.batch_size * 3 * size * size * (4 + 1 + 2 * workers)  # float input, uint8 batches queued
    return int(activations + weights * (1 + OPTIMIZER_SLOTS) + batches), \
        f"measured on a step of {PROBE_IMAGES} images at {probe_size} px"


def available_bytes() -> int:
    """Memory the run may still take: what the kernel says is available, within a cgroup's limit."""
    available = psutil.virtual_memory().available
    limit, used = Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory.current")
    try:
        if limit.read_text().strip() != "max":
            available = min(available, int(limit.read_text()) - int(used.read_text()))
    except (OSError, ValueError):  # no cgroup v2 here
        pass
    return available


def memory_problem(ctx, processes: int) -> str | None:
    """Why the run's steps will not fit in this machine's memory (None: they should)."""
    needed, how = estimated_bytes(ctx)
    needed *= processes
    available = available_bytes()
    if needed <= available:
        return None
    each = f" for {processes} processes" if processes > 1 else ""
    return (f"a training step needs about {needed / 2**30:.1f} GB of memory{each} with {settings(ctx.cfg)} ({how}), "
            f"and {available / 2**30:.1f} GB are available: {ADVICE}")


def check_memory_fits(ctx, accelerator) -> None:
    """On a CPU: OutOfMemory on every process if the main process finds the steps cannot fit
    (compiled models are not probed: a probe would compile them once more)."""
    from train.distributed import main_process_decides

    if accelerator.device.type != "cpu" or ctx.cfg.compile:
        return
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))  # on this machine
    problem = main_process_decides(accelerator, lambda: memory_problem(ctx, processes))
    if problem:
        raise OutOfMemory(problem)


def config_step_context(overrides: list[str], num_classes: int):
    """The model of a config (its recipe plus overrides) on the CPU, as run.py builds it, in a StepContext."""
    from accelerate import Accelerator

    from train.config import load_config
    from train.methods import StepContext
    from train.model_setup import build_model

    cfg = load_config([*overrides, "tracker=none"])
    model, _ = build_model(cfg, Accelerator(cpu=True), num_classes)
    return StepContext(model, model, cfg, num_classes)


if __name__ == "__main__":
    ctx = config_step_context(sys.argv[1:], num_classes=1000)
    start = time.perf_counter()
    needed, how = estimated_bytes(ctx)
    print(f"a training step needs about {needed / 2**30:.2f} GB with {settings(ctx.cfg)} ({how}, 1000 classes, "
          f"{time.perf_counter() - start:.2f} s); {available_bytes() / 2**30:.1f} GB are available here")
