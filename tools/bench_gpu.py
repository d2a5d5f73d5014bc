#!/usr/bin/env python
"""The GPU performance table in one run: every figure the README's GPU table holds, measured by
the project's own tools on this machine, with the targets beside them.

    python tools/bench_gpu.py --out results/                 # everything (~10 min on one H100)
    python tools/bench_gpu.py --out results/ --only steps    # a part: steps, compiled, effnet, loaders, train, tests

Parts (each a subprocess; its log and JSON go to --out, a failing part is reported, not fatal):
  steps      tools/bench_step.py, ResNet-50, batch 256, 224 px, bf16, channels-last, eager: every
             method × vanilla, vanilla img/s, one attack step; again with the host-side non-finite
             check, to show what a device→host sync per step costs
  compiled   the same with --compile (compile=true), and its compile time
  effnet     EfficientNet-B0 fast_advprop and advprop, eager and compiled
  loaders    tools/bench_loaders.py, 16 workers, RandomResizedCrop-224 to the GPU, 1,800 and 18,000 photos
  train      train/run.py vanilla, loader=dali, 18,000 photos, bf16: steady img/s ÷ model-only img/s
  tests      pytest -m gpu (wall time)
Writes out/table.md and out/results.json.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
RESNET = ["--device", "cuda", "--amp", "bf16", "--model", "resnet50", "--batch", "256", "--size", "224", "--json"]
PARTS = ("steps", "compiled", "effnet", "loaders", "train", "tests")


def run(name: str, command: list[str], out: Path, timeout: int) -> tuple[dict | None, float]:
    """Runs command, keeps its output in out/<name>.log; (its last-line JSON or None, seconds)."""
    start = time.perf_counter()
    print(f"[{name}] {' '.join(command)}", flush=True)
    try:
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        output, ok = result.stdout + result.stderr, result.returncode == 0
    except subprocess.TimeoutExpired as error:
        output, ok = f"{error.stdout or ''}{error.stderr or ''}\nTIMEOUT after {timeout} s", False
    seconds = time.perf_counter() - start
    (out / f"{name}.log").write_text(output if isinstance(output, str) else output.decode())
    print(f"[{name}] {'ok' if ok else 'FAILED'} in {seconds:.0f} s", flush=True)
    if not ok:
        return None, seconds
    lines = [line for line in (result.stdout or "").splitlines() if line.startswith("{")]
    return (json.loads(lines[-1]) if lines else {}), seconds


def measure(parts: list[str], out: Path, cache: Path) -> dict:
    results = {}
    bench_step = [PY, "tools/bench_step.py"]
    if "steps" in parts:
        results["steps"], _ = run("steps", bench_step + RESNET, out, 600)
        results["steps_host_check"], _ = run("steps_host_check", bench_step + RESNET + [
            "--methods", "advprop_pgd1", "--nonfinite-check", "host"], out, 300)
    if "compiled" in parts:
        results["compiled"], _ = run("compiled", bench_step + RESNET + [
            "--compile", "--methods", "advprop_pgd1,advprop_pgd5,fast_advprop"], out, 1200)
    if "effnet" in parts:
        effnet = ["--model", "efficientnet_b0", "--methods", "advprop_pgd1,advprop_pgd5,fast_advprop"]
        results["effnet"], _ = run("effnet", bench_step + RESNET + effnet, out, 600)
        results["effnet_compiled"], _ = run("effnet_compiled", bench_step + RESNET + effnet + ["--compile"], out, 1200)
    if "loaders" in parts:
        for photos in (1800, 18000):
            results[f"loaders_{photos}"], _ = run(f"loaders_{photos}", [
                PY, "tools/bench_loaders.py", "--workers", "16", "--backends", "torchvision", "dali", "--epochs", "3",
                "--photos", str(photos), "--cache-dir", str(cache), "--json"], out, 900)
    if "train" in parts:
        from pipelines.photo_data import build_photo_imagefolder
        run_dir, name = out / "train_run", build_photo_imagefolder(cache / "photos-18000", count=18000).name
        run("train", [PY, "-m", "accelerate.commands.launch", "--num_processes", "1", "--mixed_precision", "bf16",
                      "--dynamo_backend", "no", "train/run.py", "config=configs/resnet50_vanilla.yaml", "loader=dali",
                      f"data.root={cache}", f"data.train_dir={name}", f"data.val_dir={name}", "batch_size=256",
                      "epochs=3", "log_every=10", "eval_robust=false", "tracker=none", "data.dali.threads=8",
                      f"output_dir={run_dir}", "resume=none"], out, 900)
        summary = run_dir / "summary.json"
        results["train"] = json.loads(summary.read_text()) if summary.is_file() else None
    if "tests" in parts:
        _, seconds = run("tests", [PY, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider"], out, 600)
        results["tests_seconds"] = seconds
    return results


def table(results: dict) -> str:
    """Markdown rows: figure, measured, target."""
    get = lambda part, key: (results.get(part) or {}).get(key)  # noqa: E731
    fmt = lambda v, spec=".2f": "–" if v is None else format(v, spec)  # noqa: E731
    rows = [
        ("vanilla step, model only, img/s (eager / compiled)",
         f"{fmt(get('steps', 'vanilla_img_per_s'), '.0f')} / {fmt(get('compiled', 'vanilla_img_per_s'), '.0f')}", "≥ 5,000"),
        ("one attack step ÷ vanilla step (eager / compiled)",
         f"{fmt(get('steps', 'attack_step'))} / {fmt(get('compiled', 'attack_step'))}", "≤ 0.80"),
        ("advprop PGD-1 × vanilla (eager / compiled)",
         f"{fmt(get('steps', 'advprop_pgd1'))} / {fmt(get('compiled', 'advprop_pgd1'))}", "≤ 2.6"),
        ("advprop PGD-5 × vanilla (eager / compiled)",
         f"{fmt(get('steps', 'advprop_pgd5'))} / {fmt(get('compiled', 'advprop_pgd5'))}", "≤ 6.0"),
        ("fast_advprop × vanilla, ResNet-50 (eager / compiled)",
         f"{fmt(get('steps', 'fast_advprop'))} / {fmt(get('compiled', 'fast_advprop'))}", "≤ 1.2"),
        ("fast_advprop × vanilla, EfficientNet-B0 (eager / compiled)",
         f"{fmt(get('effnet', 'fast_advprop'))} / {fmt(get('effnet_compiled', 'fast_advprop'))}", "≤ 1.3"),
        ("vanilla img/s with a host-side non-finite check (vs device-side)",
         f"{fmt(get('steps_host_check', 'vanilla_img_per_s'), '.0f')} (vs {fmt(get('steps', 'vanilla_img_per_s'), '.0f')})", "–"),
    ]
    train, model_only = results.get("train") or {}, get("steps", "vanilla_img_per_s")
    steady = train.get("steady_img_per_s")
    rows.append(("train/run.py vanilla, DALI, 18,000 photos: steady img/s ÷ model-only img/s",
                 f"{fmt(steady and model_only and steady / model_only)} ({fmt(steady, '.0f')} img/s, waiting for "
                 f"data {fmt(train.get('data_wait_fraction') and 100 * train['data_wait_fraction'], '.1f')} %)", "≥ 0.9"))
    for photos in (1800, 18000):
        loaders = results.get(f"loaders_{photos}") or {}
        rows.append((f"DALI ÷ torchvision, {photos:,} photos, 16 workers",
                     f"{fmt(loaders.get('dali_ratio'))} ({fmt(loaders.get('dali'), '.0f')} vs "
                     f"{fmt(loaders.get('torchvision'), '.0f')} img/s)", "≥ 1.5"))
    compile_seconds = get("compiled", "compile_seconds") or {}
    rows.append(("compile time of the step, ResNet-50 (warm-up beyond steady steps)",
                 ", ".join(f"{k} {v:.0f} s" for k, v in compile_seconds.items()) or "–", "reported"))
    rows.append(("pytest -m gpu, wall time", f"{fmt(results.get('tests_seconds'), '.0f')} s", "< 120 s"))
    lines = ["| figure | measured | target |", "|---|---|---|"] + [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for the logs, results.json and table.md")
    parser.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--cache-dir", type=Path, default=Path("data/bench"), help="photo sets (built once)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    import torch
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
    results = {"device": device, "torch": torch.__version__, **measure(args.only, args.out, args.cache_dir.resolve())}
    (args.out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    text = f"{device}, torch {torch.__version__}, bf16, channels-last\n\n{table(results)}\n"
    (args.out / "table.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
