"""One training epoch and evaluation, on whatever Accelerate prepared."""
from __future__ import annotations

import contextlib
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from models.dual_bn import use_bn
from train.attacks import pgd
from train.faults import BufferSnapshot, NonFiniteLoss, loss_is_finite
from train.methods import METHODS, StepContext, attack_kwargs


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] → float [0, 1], keeping the channels-last layout."""
    return images.float().div_(255)


def train_one_epoch(ctx: StepContext, accelerator, loader, optimizer, scheduler, state, log, *,
                    ema=None, stop=None, save_mid_epoch=None) -> bool:
    """Trains from state.batch to the end of epoch state.epoch, advancing state as it goes.

    Returns False when `stop` (a StopRequest) ended the epoch early, after a finished optimizer
    step; save_mid_epoch() is called every cfg.checkpoint_every_steps optimizer steps.
    """
    cfg, model = ctx.cfg, ctx.model
    accum = cfg.grad_accum_steps
    model.train()
    loader.set_epoch(state.epoch, start_batch=state.batch)
    end = state.batch + len(loader)
    optimizer.zero_grad(set_to_none=True)
    window = MetricWindow()
    bar = tqdm(loader, desc=f"epoch {state.epoch + 1}/{cfg.epochs}", initial=state.batch, total=end,
               disable=not accelerator.is_local_main_process, leave=False)
    for images, labels in bar:
        x = to_float(images)
        sync = (state.batch + 1) % accum == 0
        out = train_step(ctx, accelerator, optimizer, scheduler, state, x, labels, sync, ema)
        state.batch += 1
        if out is None:
            continue
        window.add(out.metrics, len(x) * accelerator.num_processes)
        if state.batch % cfg.log_every == 0 or state.batch == end:
            report = window.flush(accelerator, state)
            report.update(epoch=state.epoch + state.batch / end, lr=optimizer.param_groups[0]["lr"])
            log.log(report, state.step)
            bar.set_postfix({k: f"{v:.3g}" for k, v in report.items() if k.startswith("train/loss")})
        if sync and cfg.image_log_every and out.adversarial is not None and state.step % cfg.image_log_every == 0:
            log.log_panel(x, out.adversarial, state.step)
        if sync and state.batch < end:
            if stop is not None and stop.agreed(accelerator):
                window.flush(accelerator, state)
                return False
            if save_mid_epoch and cfg.checkpoint_every_steps and state.step % cfg.checkpoint_every_steps == 0:
                save_mid_epoch()
    window.flush(accelerator, state)
    state.epoch, state.batch = state.epoch + 1, 0
    return True


def train_step(ctx, accelerator, optimizer, scheduler, state, x, labels, sync: bool, ema=None):
    """Forward (the method), backward, and on sync an optimizer step. None: a skipped batch."""
    before = BufferSnapshot(ctx.attack_model)
    with contextlib.nullcontext() if sync else accelerator.no_sync(ctx.model):
        out = METHODS[ctx.cfg.method](ctx, x, labels)
        if not loss_is_finite(out.loss, accelerator):
            before.restore()
            where = f"step {state.step + 1} (epoch {state.epoch + 1}, batch {state.batch + 1})"
            if ctx.cfg.on_nonfinite == "stop":
                raise NonFiniteLoss(f"loss is {out.loss.item()} at {where}; the weights are still those "
                                    f"of the step before. Lower the LR or set on_nonfinite=skip.")
            accelerator.print(f"warning: skipping batch with loss {out.loss.item()} at {where}")
            optimizer.zero_grad(set_to_none=True)
            return None
        accelerator.backward(out.loss / ctx.cfg.grad_accum_steps)
    if sync:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        scheduler.step_update(state.step)
        if ema is not None:
            ema.update(ctx.attack_model, step=state.step)
    return out


class MetricWindow:
    """Step metrics averaged over the steps since the last report, and over processes."""

    def __init__(self):
        self.sums, self.steps, self.images, self.start = {}, 0, 0, time.perf_counter()

    def add(self, metrics: dict, images: int) -> None:
        for key, value in metrics.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.steps, self.images = self.steps + 1, self.images + images

    def flush(self, accelerator, state) -> dict:
        """Report and reset; counts the window's images and time into state."""
        seconds = time.perf_counter() - self.start
        if not self.steps:
            return {}
        report = {f"train/{k}": accelerator.reduce(v / self.steps, "mean").item() for k, v in self.sums.items()}
        report["train/img_per_s"] = self.images / seconds
        state.train_images += self.images
        state.train_seconds += seconds
        self.__init__()
        return report


def evaluate(model, loader, accelerator, *, route: str = "main", attack=None, desc: str = "val") -> dict:
    """Top-1/top-5 (percent) and loss over the whole val set, every image counted once.

    attack: None for clean accuracy, or kwargs for pgd() (untargeted) to measure robust accuracy.
    """
    was_training = model.training
    model.eval()
    totals = torch.zeros(4, device=accelerator.device)  # top1 hits, top5 hits, loss sum, images
    loader.set_epoch(0)
    bar = tqdm(loader, desc=desc, disable=not accelerator.is_local_main_process, leave=False)
    with use_bn(model, route):
        for images, labels in bar:
            x = to_float(images)
            if attack is not None:
                x = pgd(model, x, labels, targeted=False, **attack)
            with torch.no_grad():
                logits = model(x).float()
            top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
            totals += torch.stack([
                (top5[:, 0] == labels).sum().float(), (top5 == labels[:, None]).any(1).sum().float(),
                F.cross_entropy(logits, labels, reduction="sum"), torch.tensor(len(labels), device=x.device)])
    model.train(was_training)
    top1, top5, loss, count = accelerator.reduce(totals, "sum").tolist()
    return {"top1": 100 * top1 / count, "top5": 100 * top5 / count, "loss": loss / count, "images": int(count)}


def robust_attack(cfg) -> dict:
    """eval_attack (default: the training attack's strength), untargeted, for robust accuracy."""
    return attack_kwargs(cfg.eval_attack or cfg.attack)
