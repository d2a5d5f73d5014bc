#!/usr/bin/env python
"""Cost of one training step of each method, as a ratio to a vanilla step, measured in one run.

    python tools/bench_step.py                                   # resnet18, batch 64, 96 px, CPU fp32
    python tools/bench_step.py --threads 1 --clock process --check   # the CPU targets: exit 1 if one is missed
    python tools/bench_step.py --amp bf16 --json                 # last line: {"vanilla": 1.0, ...}
    python tools/bench_step.py --device cuda --amp bf16 --model resnet50 --batch 256 --size 224 --compile

A step is train/loop.py's train_step itself: the method (attack included), the non-finite guard,
Accelerate's backward, the optimizer step and the LR schedule. Every method runs on the same timm
model (random init), batch and device, channels-last, through the same Accelerator (so AMP is
Accelerate's autocast + GradScaler). --compile compiles each method's model as compile=true does
and reports the compile time (the warm-up steps' extra time over timed steps).

Methods are timed round-robin after warm-up, one step each per round by default, so each round's
steps see the same load from other processes; a method's figure is the median over rounds of its
step time over that round's vanilla step time (best over best moved every figure by ±10 % with
one lucky vanilla step on the shared CPU), the spread column is the lowest–highest round, "best
ms" the fastest step. On a shared CPU, `--threads 1 --clock process` (CPU time of this process)
gives steadier numbers than wall time. The line under the table gives the cost of one attack step
with frozen weights, the slope of the advprop ratios over k.

Targets (TARGETS) apply under their conditions (CONDITIONS): on CPU resnet18, batch 64, 96 px,
fp32, channels-last, eager, `--threads 1 --clock process` (the table of docs/speed.md, this project's
2-core machine); on CUDA the GPU table's ResNet-50, batch 256, 224 px, bf16. `--target NAME=VALUE`
adds or overrides one (other conditions, other machines). `--check` exits 1 with one line naming
every figure above its target, and refuses (exit 2, before measuring) a run it cannot check: no
targets apply, or --methods leaves out a case a target needs. On a shared machine, rerun a miss
before believing it. `--markdown` prints the docs table's rows (targets, then this run's
figures with date, machine and torch version).

`vanilla_mix_erase` is a vanilla step whose batch is first augmented as the DeiT recipe's (timm's
RandomErasing, then Mixup or CutMix: train/batch_augment.py):

    python tools/bench_step.py --methods vanilla_mix_erase --threads 1 --clock process

`pyramid_at` (method record) and `advprop_pyramid` (the pyramid attack's record) train with
PyramidAT's published attack (5 steps), beside advprop's PGD-5:

    python tools/bench_step.py --methods pyramid_at,advprop_pyramid,advprop_pgd5 --threads 1 --clock process
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator

from models.factory import create_model
from train.batch_augment import BatchAugment
from train.run_state import TrainState
from train.compile import compile_model
from train.config import load_config
from train.loop import train_step
from train.attacks import ATTACKS
from train.methods import METHODS, StepContext, method_of
from train.optim import create_optimizer, create_schedule
from train.step_guard import StepGuard


# A vanilla step on a batch augmented as the DeiT recipe does (train/batch_augment.py: timm's
# RandomErasing, then Mixup or CutMix), against the plain vanilla step
AUGMENTED = {"vanilla_mix_erase": ["method=vanilla", "data.mixup=0.8", "data.cutmix=1.0",
                                   "data.random_erasing=0.25", "label_smoothing=0.1"]}


def bench_cases() -> dict[str, list[str]]:
    """name → config overrides, from each registered method's record, then each attack kind's
    (their bench_cases; the PGD presets are the paper's, train/attacks/gradient_sign.py). Then the
    augmented batch's case."""
    records = [*METHODS.values(), *ATTACKS.values()]
    return {**{name: overrides for record in records for name, overrides in record.bench_cases.items()}, **AUGMENTED}


TARGETS = {  # × vanilla, for runs under CONDITIONS; "attack_step": one PGD step with frozen weights
    "cpu": {"advprop_pgd1": 2.7, "advprop_pgd5": 5.9, "fast_advprop": 1.3, "attack_step": 0.8,
            "vanilla_mix_erase": 1.03},
    "cuda": {"advprop_pgd1": 2.6, "advprop_pgd5": 6.0, "fast_advprop": 1.2, "attack_step": 0.8,
             "vanilla_mix_erase": 1.03},
}
CONDITIONS = {  # docs/speed.md's: CPU on this project's 2-core machine, the GPU table's ResNet-50
    "cpu": {"model": "resnet18", "batch": 64, "size": 96, "amp": "no", "no_channels_last": False,
            "compile": False, "threads": 1, "clock": "process"},
    "cuda": {"model": "resnet50", "batch": 256, "size": 224, "amp": "bf16", "no_channels_last": False},
}
# the cases a figure is computed from (a case's own ratio: the case)
FIGURE_CASES = {"attack_step": ["advprop_pgd1", "advprop_pgd5"]}
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
    augment = BatchAugment(cfg, NUM_CLASSES, accelerator.device)  # as train/loop.py's epoch (off: a no-op)

    def step(images, labels):
        images, labels, ctx.unmixed = augment(images, labels)
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


def step_ratios(rounds: list[dict[str, list[float]]]) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Each case's step time over vanilla's: per round (the medians of the round's steps, measured
    minutes apart at most, under the same load), and their median over rounds, the figure. A
    median of paired ratios, not best over best: one lucky vanilla step would move every figure."""
    per_round = {name: [statistics.median(r[name]) / statistics.median(r["vanilla"]) for r in rounds]
                 for name in rounds[0]}
    return {name: statistics.median(values) for name, values in per_round.items()}, per_round


def targets_for(args, conditions: dict, targets: dict[str, float]) -> dict[str, float]:
    """The device's targets if this run is under their conditions, then the --target ones."""
    applies = all(getattr(args, key) == value for key, value in conditions.items())
    return {**(targets if applies else {}), **args.target}


def conditions_text(conditions: dict) -> str:
    flags = {"no_channels_last": "channels-last", "compile": "eager"}
    return " ".join(f"--{key} {value}" for key, value in conditions.items() if key not in flags) + "".join(
        f", {flags[key]}" for key, value in conditions.items() if key in flags and not value)


def check_problems(names: list[str], targets: dict[str, float], conditions: dict) -> str | None:
    """Why --check cannot check this run (before any work), or None."""
    if not targets:
        return (f"--check: the targets are for {conditions_text(conditions)}; under other conditions give "
                f"them with --target NAME=VALUE")
    unmeasured = {name: [case for case in FIGURE_CASES.get(name, [name]) if case not in names] for name in targets}
    unmeasured = {name: cases for name, cases in unmeasured.items() if cases}
    if unmeasured:
        return "--check: " + "; ".join(f"target {name} needs {', '.join(cases)} in --methods"
                                       for name, cases in unmeasured.items())
    return None


def missed_targets(results: dict[str, float], targets: dict[str, float]) -> list[str]:
    """'name figure > target' for every figure above its target."""
    return [f"{name} {results[name]:.2f} > {target:g}" for name, target in targets.items()
            if name in results and results[name] > target]


def target_pair(text: str) -> tuple[str, float]:
    name, _, value = text.partition("=")
    try:
        return name, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=VALUE (e.g. advprop_pgd1=2.7)") from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, checked (an unknown method or target, a --check it cannot make: exit 2)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--amp", default="no", choices=["no", "bf16", "fp16"], help="no = fp32")
    parser.add_argument("--no-channels-last", action="store_true")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per method")
    parser.add_argument("--rounds", type=int, default=9, help="round-robin passes over the methods")
    parser.add_argument("--steps", type=int, default=1, help="timed steps per method and round")
    cases = bench_cases()
    parser.add_argument("--methods", default=",".join(cases), help=f"comma-separated subset of {list(cases)}")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--clock", default="wall", choices=["wall", "process"],
                        help="process: this process's CPU time (CPU only; with --threads 1 it ignores other load)")
    parser.add_argument("--compile", action="store_true", help="torch.compile each model (as compile=true)")
    parser.add_argument("--nonfinite-check", default="auto", choices=["auto", "host", "device"],
                        help="the step guard's mode (train/step_guard.py; auto: device on CUDA)")
    parser.add_argument("--json", action="store_true", help="print the ratios as JSON on the last line")
    parser.add_argument("--check", action="store_true", help="exit 1 naming every figure above its target")
    parser.add_argument("--target", type=target_pair, action="append", default=[], metavar="NAME=VALUE",
                        help="a target of this run (repeatable; over the device's): a case or attack_step")
    parser.add_argument("--markdown", action="store_true", help="also print the figures as the docs table's rows (docs/speed.md)")
    args = parser.parse_args(argv)
    args.target = dict(args.target)
    names = ["vanilla"] + [n for n in args.methods.split(",") if n and n != "vanilla"]
    unknown = [n for n in names if n not in cases]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {list(cases)}")
    if args.clock == "process" and args.device != "cpu":
        parser.error("--clock process measures CPU time: use it with --device cpu")
    unknown = [n for n in args.target if n not in cases and n not in FIGURE_CASES]
    if unknown:
        parser.error(f"--target: no figure named {unknown}; choose from {[*cases, *FIGURE_CASES]}")
    args.names, args.targets = names, targets_for(args, CONDITIONS[args.device], TARGETS[args.device])
    problem = check_problems(names, args.targets, CONDITIONS[args.device]) if args.check else None
    if problem:
        parser.error(problem)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    names, targets, cases = args.names, args.targets, bench_cases()

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
    rounds = [{name: time_steps(steps[name], batch, args.steps, device, clock) for name in names}
              for _ in range(args.rounds)]

    best = {name: min(t for r in rounds for t in r[name]) for name in names}
    ratios, per_round = step_ratios(rounds)
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
    if args.markdown:
        print("\n".join(markdown_rows(results, names, targets, device)))
    missed = missed_targets(results, targets) if args.check else []
    if args.json:
        print(json.dumps(results))
    if missed:
        sys.exit("error: missed the target: " + "; ".join(missed))


def verdict(value: float, target: float | None) -> str:
    return "" if target is None else f"≤{target:g} {'ok' if value <= target else 'MISSED'}"


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    models = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
              if line.startswith("model name")] if Path("/proc/cpuinfo").is_file() else []
    return f"{models[0] if models else platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def markdown_rows(results: dict, names: list[str], targets: dict[str, float], device: torch.device) -> list[str]:
    """The docs table (docs/speed.md): header, the targets, this run's figures (date, machine, torch beside them)."""
    figures = [name for name in names if name != "vanilla"] + (["attack_step"] if "attack_step" in results else [])
    head = ["date", "machine", "torch", "vanilla img/s", *figures]
    rows = [head, ["---"] * len(head), ["target", "", "", "", *[f"≤ {targets[f]:g}" if f in targets else "" for f in figures]],
            [time.strftime("%Y-%m-%d"), machine(device), torch.__version__, f"{results['vanilla_img_per_s']:.0f}",
             *[f"{results[f]:.2f}" for f in figures]]]
    return ["| " + " | ".join(row) + " |" for row in rows]


if __name__ == "__main__":
    main()
