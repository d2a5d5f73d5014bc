"""Optimizer and learning-rate schedule from the config, both from timm.

The LR is a pure function of the optimizer step (timm schedulers with t_in_epochs=False, updated
each step), so resuming needs only the step count, and nothing depends on how Accelerate wraps a
scheduler. LR scales linearly with the global batch: lr = lr_per_256 × global_batch / 256.
"""
from __future__ import annotations

from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler, StepLRScheduler


def global_batch(cfg, num_processes: int) -> int:
    return cfg.batch_size * num_processes * cfg.grad_accum_steps


def steps_per_epoch(batches: int, grad_accum_steps: int) -> int:
    """Optimizer steps in an epoch of `batches`: the last one takes the batches left (train/loop.py)."""
    return -(-batches // grad_accum_steps)


def create_optimizer(cfg, model, num_processes: int):
    opt = cfg.optimizer
    extra = {} if opt.eps is None else {"eps": opt.eps}
    lr = opt.lr_per_256 * global_batch(cfg, num_processes) / 256
    # timm applies weight decay to parameters with ndim ≥ 2 only (no biases, no norm weights), and not
    # to those the model names in no_weight_decay() (ViT: position embedding, class token)
    return create_optimizer_v2(model, opt=opt.name, lr=lr, weight_decay=opt.weight_decay,
                               momentum=opt.momentum, **extra)


def create_schedule(cfg, optimizer, steps_per_epoch: int):
    sched = cfg.schedule
    warmup = round(sched.warmup_epochs * steps_per_epoch)
    common = dict(warmup_t=warmup, warmup_lr_init=sched.warmup_lr, t_in_epochs=False)
    if sched.name == "cosine":
        return CosineLRScheduler(optimizer, t_initial=max(1, cfg.epochs * steps_per_epoch),
                                 lr_min=sched.min_lr, **common)
    return StepLRScheduler(optimizer, decay_t=max(1, round(sched.decay_epochs * steps_per_epoch)),
                           decay_rate=sched.decay_rate, **common)
