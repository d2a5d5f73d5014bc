#!/usr/bin/env python
"""Cost of one training step of each method, as a ratio to a vanilla step, measured in one run.

    python tools/bench_step.py                                   # resnet18, batch 64, 96 px, CPU fp32
    python tools/bench_step.py --amp bf16 --json                 # last line: {"vanilla": 1.0, ...}
    python tools/bench_step.py --device cuda --amp bf16 --model resnet50 --batch 256 --size 224 --compile

A step is train/loop.py's train_step itself: the method (attack included), the non-finite guard,
Accelerate's backward, the optimizer step and the LR schedule. Every method runs on the same timm
model (random init), batch and device, channels-last, through the same Accelerator (so AMP is
Accelerate's autocast + GradScaler). --compile compiles each method's model as compile=true does
and reports the compile time (the warm-up steps' extra time over timed steps). Methods are timed
round-robin after warm-up, so load from other processes hits all of them alike; the ratio is the
best (minimum) step time over the best vanilla step time (as timeit does: other processes only
ever add time), and the spread column is the lowest–highest ratio of per-round medians. On a
shared CPU, `--threads 1 --clock process` (CPU time of this process) gives steadier numbers than
wall time. The target column: on CPU the figures measured before the step was reworked (a
regression guard: nothing may get slower), on CUDA the targets for ResNet-50, batch 256, bf16.
The line under the table gives the measured cost of one attack step, the slope of the advprop
ratios over k.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from accelerate import Accelerator

from models.factory import create_model
from train.run_state import TrainState
from train.compile import compile_model
from train.config import load_config
from train.loop import train_step
from train.methods import METHODS, StepContext, method_of
from train.optim import create_optimizer, create_schedule
from train.step_guard import StepGuard


def bench_cases() -> dict[str, list[str]]:
    """name → config overrides, from each registered method's record (its bench_cases); the attack
    presets are the paper's (train/config.py ATTACK_PRESETS)."""
    return {name: overrides for method in METHODS.values() for name, overrides in method.bench_cases.items()}


TARGETS = {  # × vanilla; "attack_step": one PGD step with frozen weights
    "cpu": {"advprop_pgd1": 2.78, "advprop_pgd5": 5.90, "fast_advprop": 1.29},  # README's CPU table before
    "cuda": {"advprop_pgd1": 2.6, "advprop_pgd5": 6.0, "fast_advprop": 1.2, "attack_step": 0.8},
}
NUM_CLASSES = 10


def build_case(overrides: list[str], args, accelerator: Accelerator):
    cfg = load_config([f"model={args.model}", f"batch_size={args.batch}", "tracker=none",
                       f"channels_last={not args.no_channels_last}", f"nonfinite_check={args.nonfinite_check}",
                       *overrides])
    torch.manual_seed(0)  # the same initial weights for every method
    model = create_model(cfg, NUM_CLASSES, dual_norm=method_of(cfg).dual_norm)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if args.compile:
        compile_model(model, accelerator.device)
    optimizer = create_optimizer(cfg, model, 1)
    model, optimizer = accelerator.prepare(model, optimizer)
    scheduler = create_schedule(cfg, optimizer, 1_000_000)
    ctx = StepContext(model, accelerator.unwrap_model(model), cfg, NUM_CLASSES)
    guard = StepGuard(ctx.attack_model, optimizer, accelerator, mode=cfg.nonfinite_check, on_nonfinite="stop")
    state = TrainState()

    def step(images, labels):
        train_step(ctx, accelerator, optimizer, scheduler, state, images, labels, True, guard)
    return step


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step, batch, steps: int, device, clock=time.perf_counter) -> list[float]:
    times = []
    for _ in range(steps):
        synchronize(device)
        start = clock()
        step(*batch)
        synchronize(device)
        times.append(clock() - start)
    return times


def pgd_step_cost(ratios: dict[str, float]) -> float | None:
    """The marginal cost of one attack step: the slope of the advprop ratio over PGD steps."""
    steps = {int(name[len("advprop_pgd"):]): r for name, r in ratios.items() if name.startswith("advprop_pgd")}
    if len(steps) < 2:
        return None
    fewest, most = min(steps), max(steps)
    return (steps[most] - steps[fewest]) / (most - fewest)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--amp", default="no", choices=["no", "bf16", "fp16"], help="no = fp32")
    parser.add_argument("--no-channels-last", action="store_true")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per method")
    parser.add_argument("--rounds", type=int, default=3, help="round-robin passes over the methods")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per method and round")
    cases = bench_cases()
    parser.add_argument("--methods", default=",".join(cases), help=f"comma-separated subset of {list(cases)}")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--clock", default="wall", choices=["wall", "process"],
                        help="process: this process's CPU time (CPU only; with --threads 1 it ignores other load)")
    parser.add_argument("--compile", action="store_true", help="torch.compile each model (as compile=true)")
    parser.add_argument("--nonfinite-check", default="auto", choices=["auto", "host", "device"],
                        help="the step guard's mode (train/step_guard.py; auto: device on CUDA)")
    parser.add_argument("--json", action="store_true", help="print the ratios as JSON on the last line")
    args = parser.parse_args()
    names = ["vanilla"] + [n for n in args.methods.split(",") if n and n != "vanilla"]
    unknown = [n for n in names if n not in cases]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {list(cases)}")

    if args.threads:
        torch.set_num_threads(args.threads)
    accelerator = Accelerator(cpu=args.device == "cpu", mixed_precision=args.amp)
    device = accelerator.device
    steps = {name: build_case(cases[name], args, accelerator) for name in names}
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(args.batch, 3, args.size, args.size, generator=generator).to(device)
    if not args.no_channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, NUM_CLASSES, (args.batch,), generator=generator).to(device)
    batch = (images, labels)

    warmup = {name: sum(time_steps(steps[name], batch, args.warmup, device)) for name in names}
    clock = time.process_time if args.clock == "process" else time.perf_counter
    if args.clock == "process" and device.type != "cpu":
        parser.error("--clock process measures CPU time: use it with --device cpu")
    rounds = [{name: time_steps(steps[name], batch, args.steps, device, clock) for name in names}
              for _ in range(args.rounds)]

    best = {name: min(t for r in rounds for t in r[name]) for name in names}
    ratios = {name: best[name] / best["vanilla"] for name in names}
    per_round = {name: [statistics.median(r[name]) / statistics.median(r["vanilla"]) for r in rounds]
                 for name in names}
    targets = TARGETS[device.type]
    amp = {"no": "fp32", "bf16": "bf16 autocast", "fp16": "fp16 autocast + GradScaler"}[args.amp]
    print(f"{args.model}, batch {args.batch}, {args.size} px, {device} ({torch.get_num_threads()} threads), {amp}, "
          f"{'NCHW' if args.no_channels_last else 'channels-last'}, {'compiled' if args.compile else 'eager'}, "
          f"non-finite check: {args.nonfinite_check}; {args.rounds}×{args.steps} timed steps each, {args.clock} clock")
    print(f"{'method':<22}{'best ms':>9}{'× vanilla':>11}{'spread':>14}{'target':>9}")
    for name in names:
        spread = f"{min(per_round[name]):.2f}–{max(per_round[name]):.2f}"
        print(f"{name:<22}{1000 * best[name]:>9.0f}{ratios[name]:>11.2f}{spread:>14}  {verdict(ratios[name], targets.get(name))}")
    results = {name: round(ratio, 3) for name, ratio in ratios.items()}
    results["vanilla_img_per_s"] = round(args.batch / best["vanilla"], 1)
    print(f"vanilla: {results['vanilla_img_per_s']:.0f} img/s")
    step_cost = pgd_step_cost(ratios)
    if step_cost is not None:
        results["attack_step"] = round(step_cost, 3)
        print(f"one PGD step with frozen weights ≈ {step_cost:.2f}× a vanilla step (the slope of the advprop PGD-k "
              f"ratios) {verdict(step_cost, targets.get('attack_step'))}")
    if args.compile:  # the warm-up steps' time beyond what as many timed steps take
        results["compile_seconds"] = {name: round(warmup[name] - args.warmup * best[name], 1) for name in names}
        print("compile time (warm-up beyond steady steps): " + ", ".join(
            f"{name} {seconds:.0f} s" for name, seconds in results["compile_seconds"].items()))
    if args.json:
        print(json.dumps(results))


def verdict(value: float, target: float | None) -> str:
    return "" if target is None else f"≤{target:g} {'ok' if value <= target else 'MISSED'}"


if __name__ == "__main__":
    main()
