"""train/loop.py's epoch, in process on real digits: gradient accumulation (and an epoch that does not
divide into it), log_every and checkpoint_every_steps counted in optimizer steps."""
import pytest
import torch
from accelerate import Accelerator

from conftest import digits_val_batch
from models.factory import create_model
from train.run_state import TrainState
from train.loop import train_one_epoch
from train.methods import StepContext
from train.optim import create_schedule, steps_per_epoch
from train.step_guard import StepGuard

pytestmark = pytest.mark.usefixtures("one_thread")


class Batches:
    """Fixed uint8 batches behind the loader interface the loop uses (set_epoch, len, iter)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, sizes: list[int]):
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        self.batches = [(images[s:s + n], labels[s:s + n]) for s, n in zip(starts, sizes)]
        self.start = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.start = start_batch

    def __len__(self) -> int:
        return len(self.batches) - self.start

    def __iter__(self):
        return iter(self.batches[self.start:])


class RecordingSGD(torch.optim.SGD):
    """Plain SGD that keeps the gradients of every step it takes."""

    def step(self, closure=None):
        self.seen.append([p.grad.clone() for group in self.param_groups for p in group["params"]])
        return super().step(closure)


class MetricLines:
    """RunLog as the loop uses it: records the optimizer step of each metric line."""

    def __init__(self):
        self.steps = []

    def log(self, metrics: dict, step: int) -> None:
        self.steps.append(step)

    def log_panel(self, *args) -> None:
        raise AssertionError("no panels here (image_log_every=0)")


def train_epoch(demo_cfg, digits_root, sizes: list[int], *overrides: str, save_mid_epoch=None):
    """One epoch of vanilla test_vit (LayerNorm: a batch's gradient does not depend on how it is
    split) over `sizes` digits a batch; returns (gradients of each optimizer step, state, lines)."""
    cfg = demo_cfg("model=test_vit", "method=vanilla", "schedule.warmup_epochs=0", "image_log_every=0", *overrides)
    images, labels = digits_val_batch(digits_root, sum(sizes))
    loader = Batches((images * 255).round().to(torch.uint8), labels, sizes)  # the loaders' uint8 batches
    torch.manual_seed(0)
    accelerator = Accelerator(cpu=True)
    model = create_model(cfg, 10, dual_norm=False)
    model, optimizer = accelerator.prepare(model, RecordingSGD(model.parameters(), lr=0.05))
    optimizer.optimizer.seen = []
    scheduler = create_schedule(cfg, optimizer, steps_per_epoch(len(loader), cfg.grad_accum_steps))
    ctx = StepContext(model, accelerator.unwrap_model(model), cfg, 10)
    guard = StepGuard(ctx.attack_model, optimizer, accelerator, mode="host", on_nonfinite="stop")
    state, lines = TrainState(), MetricLines()
    assert train_one_epoch(ctx, accelerator, loader, optimizer, scheduler, state, lines, guard,
                           save_mid_epoch=save_mid_epoch and (lambda: save_mid_epoch(state)))
    return optimizer.optimizer.seen, state, lines


@pytest.mark.parametrize("accumulated, accum, whole", [
    ([8, 8, 8, 8], 2, [16, 16]),
    ([8, 8, 8, 8, 8], 2, [16, 16, 8]),  # 5 batches, 2 a step: the last step takes the 5th alone
    ([8, 8, 8, 8, 8], 3, [24, 16]),
])
def test_accumulated_batches_step_as_one_big_batch(demo_cfg, digits_root, accumulated, accum, whole):
    steps, state, _ = train_epoch(demo_cfg, digits_root, accumulated, f"grad_accum_steps={accum}")
    expected, _, _ = train_epoch(demo_cfg, digits_root, whole)
    assert len(steps) == len(expected) == state.step == steps_per_epoch(len(accumulated), accum)
    for step, (got, want) in enumerate(zip(steps, expected)):
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, msg=lambda m: f"step {step + 1}: {m}")


def test_log_every_counts_optimizer_steps(demo_cfg, digits_root):
    _, state, lines = train_epoch(demo_cfg, digits_root, [4] * 10, "grad_accum_steps=2", "log_every=2")
    assert state.step == 5
    assert lines.steps == [2, 4, 5]  # every 2 steps (4 batches), and the epoch's end


def test_checkpoint_every_steps_saves_mid_epoch_after_those_steps(demo_cfg, digits_root):
    saved = []
    train_epoch(demo_cfg, digits_root, [4] * 10, "grad_accum_steps=2", "checkpoint_every_steps=2",
                save_mid_epoch=lambda state: saved.append((state.step, state.batch)))
    assert saved == [(2, 4), (4, 8)]  # not at step 5: the epoch's end has its own checkpoint
