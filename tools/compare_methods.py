#!/usr/bin/env python
"""Train every method of a sweep file with train/run.py and print one comparison table.

    python tools/compare_methods.py                              # configs/sweeps/compare_methods.yaml
    python tools/compare_methods.py --out runs/compare epochs=4  # extra overrides for every run

Each run is a separate `train/run.py` process writing to <out>/<run name>; a run whose summary.json
already exists is not trained again (delete its folder to redo it). The table reads each run's
summary.json: clean top-1 and robust top-1 (main norms, the sweep's eval_attack), and the cost per
training step as vanilla's training throughput over the run's (data loading included).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]


def sweep_runs(sweep_file: Path, extra: list[str] = ()) -> dict[str, list[str]]:
    """run name → train/run.py arguments (recipe, common overrides, the run's, then extra)."""
    sweep = OmegaConf.load(sweep_file)
    common = [f"config={REPO / sweep.recipe}", *sweep.get("common", [])]
    return {name: [*common, *overrides, *extra] for name, overrides in sweep.runs.items()}


def train(name: str, args: list[str], out: Path) -> dict:
    run_dir = out / name
    summary = run_dir / "summary.json"
    if not summary.is_file():
        command = [sys.executable, str(REPO / "train" / "run.py"), *args, f"name={name}",
                   f"output_dir={run_dir}", "tracker=none"]
        print(f"[{name}] {' '.join(command[1:])}", flush=True)
        env = {**os.environ, "WANDB_MODE": "offline", "TQDM_DISABLE": "1"}  # errors still reach stderr
        subprocess.run(command, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
    return json.loads(summary.read_text())


def print_table(results: dict[str, dict]) -> None:
    vanilla = results.get("vanilla", {}).get("train_img_per_s")
    print(f"\n{'run':<22}{'clean top-1':>12}{'robust top-1':>14}{'img/s':>8}{'cost/step':>11}")
    for name, r in results.items():
        cost = f"{vanilla / r['train_img_per_s']:.2f}×" if vanilla else "–"
        robust = f"{r['robust_top1']:.2f} %" if "robust_top1" in r else "–"
        print(f"{name:<22}{r['clean_top1']:>10.2f} %{robust:>14}{r['train_img_per_s']:>8.0f}{cost:>11}")
    attacks = {r.get("robust_attack") for r in results.values()} - {None}
    print(f"robust attack: {', '.join(sorted(attacks))}; cost per step relative to vanilla's throughput")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sweep", type=Path, default=REPO / "configs" / "sweeps" / "compare_methods.yaml")
    parser.add_argument("--out", type=Path, default=Path("runs/compare"))
    parser.add_argument("--only", default="", help="comma-separated run names (default: all)")
    parser.add_argument("overrides", nargs="*", help="key=value for every run")
    args = parser.parse_args()
    runs = sweep_runs(args.sweep, args.overrides)
    names = [n for n in args.only.split(",") if n] or list(runs)
    results = {name: train(name, runs[name], args.out.resolve()) for name in names}
    print_table(results)


if __name__ == "__main__":
    main()
