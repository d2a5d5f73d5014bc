"""One training epoch and evaluation, on whatever Accelerate prepared.

train_step is the one owner of a step: it runs the method (train/methods/) up to each Backward
it yields, has the StepGuard check the terms, backpropagates with Accelerate's loss scaling and
gradient accumulation, synchronises DDP on the last backward of a step only, scales per-group
gradients (and clips their norm), steps the optimizer, the LR schedule and the EMA.

Speed is reported per logging window under perf/ (W&B groups it in one section): img_per_s,
data_wait (the share of the window spent waiting for the loader), lr, gpu_memory_gb (CUDA: the
window's peak); each epoch's first window is its warm-up (loader start, compilation, caches) and
stays out of the steady-state figures of summary.json.
"""
from __future__ import annotations

import contextlib
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from models.dual_norm import use_norm
from train.attacks import Attack
from train.batch_augment import BatchAugment
from train.faults import NonFiniteLoss
from train.methods import StepContext, StepOutput, method_of
from train.step_guard import ADVICE


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] → float [0, 1], keeping the channels-last layout."""
    return images.float().div_(255)


def train_one_epoch(ctx: StepContext, accelerator, loader, optimizer, scheduler, state, log, guard, *,
                    ema=None, stop=None, save_mid_epoch=None) -> bool:
    """Trains from state.batch to the end of epoch state.epoch, advancing state as it goes.

    Returns False when `stop` (a StopRequest) ended the epoch early, after a finished optimizer
    step; save_mid_epoch() is called every cfg.checkpoint_every_steps optimizer steps, metrics are
    reported every cfg.log_every optimizer steps and at the epoch's end. An optimizer step takes
    cfg.grad_accum_steps batches; when the epoch's batches do not divide by it, its last step takes
    the batches left, their mean loss as any step's (as timm's train.py).
    """
    cfg, model = ctx.cfg, ctx.model
    accum = cfg.grad_accum_steps
    model.train()
    loader.set_epoch(state.epoch, start_batch=state.batch)
    end = state.batch + len(loader)
    optimizer.zero_grad(set_to_none=True)
    window = MetricWindow(warmup=True)
    augment = BatchAugment(cfg, ctx.num_classes, accelerator.device)  # erasing, Mixup/CutMix (when on)
    bar = tqdm(window.timed(loader), desc=f"epoch {state.epoch + 1}/{cfg.epochs}", initial=state.batch, total=end,
               disable=not accelerator.is_local_main_process, leave=False)
    for images, labels in bar:
        x, labels, ctx.unmixed = augment(to_float(images), labels)
        group_start = state.batch - state.batch % accum  # groups are counted from the epoch's start
        sync = state.batch + 1 in (group_start + accum, end)
        step_before = state.step
        out = train_step(ctx, accelerator, optimizer, scheduler, state, x, labels, sync, guard, ema,
                         micro_batches=min(accum, end - group_start))
        state.batch += 1
        stepped = state.step > step_before  # not when the guard skipped the batch
        if out is not None:
            window.add(out.metrics, len(x) * accelerator.num_processes)
        report_now = (stepped and state.step % cfg.log_every == 0) or state.batch == end
        if report_now:
            report = window.flush(accelerator, state, guard)
            if report:
                report.update({"epoch": state.epoch + state.batch / end, "perf/lr": optimizer.param_groups[0]["lr"]})
                log.log(report, state.step)
                bar.set_postfix({k: f"{v:.3g}" for k, v in report.items() if k.startswith("train/loss")})
        if out is not None and sync and cfg.image_log_every and out.adversarial is not None \
                and state.step % cfg.image_log_every == 0:
            log.log_panel(x if out.source is None else out.source, out.adversarial, state.step)
        if sync and state.batch < end:
            # several processes agree at reports only: a collective each step would sync the device
            if stop is not None and (report_now or accelerator.num_processes == 1) and stop.agreed(accelerator):
                window.flush(accelerator, state, guard)
                return False
            if save_mid_epoch and stepped and cfg.checkpoint_every_steps and state.step % cfg.checkpoint_every_steps == 0:
                save_mid_epoch()
    window.flush(accelerator, state, guard)
    state.epoch, state.batch = state.epoch + 1, 0
    return True


def train_step(ctx: StepContext, accelerator, optimizer, scheduler, state, x, labels, sync: bool, guard,
               ema=None, micro_batches: int | None = None) -> StepOutput | None:
    """The method's backwards, then on sync an optimizer step. None: the guard skipped the batch.

    micro_batches: the batches this optimizer step accumulates (default cfg.grad_accum_steps); each
    one's loss is divided by it, so the step's gradient is their mean's."""
    cfg = ctx.cfg
    micro_batches = micro_batches or cfg.grad_accum_steps
    ctx.step = state.step
    guard.begin()
    method = method_of(cfg)
    steps = method.step(ctx, x, labels)
    passes, request, out = method.backwards(cfg), None, None
    for index in range(passes):
        last = index == passes - 1
        # DDP all-reduces in the backward of a forward made outside no_sync: only the last one
        # of a sync step; the others (and every pass of an accumulation step) accumulate locally.
        with contextlib.nullcontext() if sync and last else accelerator.no_sync(ctx.model):
            request = next(steps, None)  # the method's forward up to its next Backward
            if request is None:
                raise RuntimeError(f"method {cfg.method} yields fewer than the {passes} Backward requests its record says")
            if not guard.check(request.terms):
                steps.close()
                guard.abort()
                values = ", ".join(f"{name} {value.item():.4g}" for name, value in request.terms.items())
                return skip_or_stop(cfg, accelerator, state, f"the loss is not finite ({values})")
            accelerator.backward(sum(request.terms.values()) / micro_batches)
    try:
        next(steps)
        raise RuntimeError(f"method {cfg.method} yields more than the {passes} Backward requests its record says")
    except StopIteration as done:
        out = done.value
    if sync and not optimizer_step(ctx, accelerator, optimizer, scheduler, state, out, guard, ema):
        return skip_or_stop(cfg, accelerator, state, "the optimizer step made weights or optimizer state non-finite "
                            "(the loss was finite: an LR too high for them, or a division by zero)")
    return out


def scale_gradients(grad_scales: list[tuple[list[torch.Tensor], float]]) -> None:
    """A method's per-group gradient factors (train/methods/__init__.py: each norm set averaged over its images)."""
    with torch.no_grad():
        for params, factor in grad_scales:
            grads = [p.grad for p in params if p.grad is not None]
            if grads:
                torch._foreach_mul_(grads, factor)


def optimizer_step(ctx, accelerator, optimizer, scheduler, state, out: StepOutput, guard, ema) -> bool:
    """False: the guard did not keep the step (host mode); it is not counted. cfg.grad_clip_norm:
    the gradient's global norm clipped after the per-group scales (Accelerate unscales AMP's first)."""
    scale_gradients(out.grad_scales)
    if ctx.cfg.grad_clip_norm:
        accelerator.clip_grad_norm_(ctx.model.parameters(), ctx.cfg.grad_clip_norm)
    saved = guard.before_step()
    optimizer.step()
    kept = guard.after_step(saved)
    optimizer.zero_grad(set_to_none=True)
    if not kept:
        return False
    state.step += 1
    scheduler.step_update(state.step)
    if ema is not None:
        ema.update(ctx.attack_model, step=state.step)
    return True


def skip_or_stop(cfg, accelerator, state, problem: str) -> None:
    """A step the guard did not keep: stop (NonFiniteLoss) or skip it, saying so."""
    where = f"step {state.step + 1} (epoch {state.epoch + 1}, batch {state.batch + 1})"
    kept = f"step {state.step}" if state.step else "the start (no step kept yet)"
    if cfg.on_nonfinite == "stop":
        raise NonFiniteLoss(f"at {where} {problem}: that step is not kept and nothing saves it; the last kept "
                            f"weights are those of {kept}. {ADVICE}")
    accelerator.print(f"warning: skipping {where}: {problem}; the weights stay those of {kept}")
    return None


class MetricWindow:
    """Step metrics averaged over the steps since the last report and over processes, with the
    window's throughput and the share of its time spent waiting for the loader."""

    def __init__(self, warmup: bool = False):
        self.warmup = warmup  # the epoch's first window: start-up, kept out of the steady state
        self.reset()

    def reset(self) -> None:
        self.sums, self.steps, self.images, self.wait = {}, 0, 0, 0.0
        self.start = time.perf_counter()

    def timed(self, loader):
        """The loader's batches, the time spent waiting for each added to this window."""
        batches = iter(loader)
        while True:
            start = time.perf_counter()
            batch = next(batches, None)
            self.wait += time.perf_counter() - start
            if batch is None:
                return
            yield batch

    def add(self, metrics: dict, images: int) -> None:
        for key, value in metrics.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.steps, self.images = self.steps + 1, self.images + images

    def flush(self, accelerator, state, guard) -> dict:
        """Report and reset; counts the window's images and time into state (the steady-state
        totals too, after the warm-up window)."""
        guard.report(f"step {state.step}")
        if not self.steps:
            self.reset()
            return {}
        report = {f"train/{k}": accelerator.reduce(v / self.steps, "mean").item() for k, v in self.sums.items()}
        seconds = time.perf_counter() - self.start  # after the reduce: the device work is done
        report.update({"perf/img_per_s": self.images / seconds, "perf/data_wait": self.wait / seconds})
        if accelerator.device.type == "cuda":  # the window's peak, this process
            report["perf/gpu_memory_gb"] = torch.cuda.max_memory_allocated(accelerator.device) / 2**30
            torch.cuda.reset_peak_memory_stats(accelerator.device)
        state.train_images += self.images
        state.train_seconds += seconds
        if not self.warmup:
            state.steady_images += self.images
            state.steady_seconds += seconds
            state.steady_wait_seconds += self.wait
        self.warmup = False
        self.reset()
        return report


def evaluate(model, loader, accelerator, *, route: str = "main", attack: Attack | None = None,
             desc: str = "val", stop=None) -> dict:
    """Top-1/top-5 (percent) and loss over the whole val set, every image counted once.

    attack: None for clean accuracy, or an attack (train/attacks/: build_attack(node)) made on the
    eval-mode model through `route`'s norms to measure robust accuracy (the bar shows its top-1 so far).
    stop: a StopRequest, checked every few batches (StopInValidation when a stop was asked).
    """
    was_training = model.training
    model.eval()
    totals = torch.zeros(4, device=accelerator.device)  # top1 hits, top5 hits, loss sum, images
    loader.set_epoch(0)
    polls = stop.validation_polls(accelerator, len(loader)) if stop is not None else range(0)
    bar = tqdm(loader, desc=desc, disable=not accelerator.is_local_main_process, leave=False)
    with use_norm(model, route):
        for batch, (images, labels) in enumerate(bar, 1):
            x = to_float(images)
            if attack is not None:
                x = attack(model, x, labels)
            with torch.no_grad():
                logits = model(x).float()
            top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
            totals += torch.stack([
                (top5[:, 0] == labels).sum().float(), (top5 == labels[:, None]).any(1).sum().float(),
                F.cross_entropy(logits, labels, reduction="sum"), torch.tensor(len(labels), device=x.device)])
            if attack is not None:  # an attacked batch takes long enough for one host read
                bar.set_postfix(top1=f"{100 * totals[0].item() / totals[3].item():.1f}%")
            if batch in polls:
                stop.stop_validation_if_asked(accelerator)
    model.train(was_training)
    top1, top5, loss, count = accelerator.reduce(totals, "sum").tolist()
    return {"top1": 100 * top1 / count, "top5": 100 * top5 / count, "loss": loss / count, "images": int(count)}
