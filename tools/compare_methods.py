#!/usr/bin/env python
"""Train every method of a sweep file with train/run.py and print one comparison table.

    python tools/compare_methods.py                              # configs/sweeps/compare_methods.yaml
    python tools/compare_methods.py --out runs/compare epochs=4  # extra overrides for every run
    python tools/compare_methods.py tracker=none                 # no W&B
    python tools/compare_methods.py --sweep configs/sweeps/dual_norms.yaml --json   # + every summary as JSON

Each run is a separate `train/run.py` process writing to <out>/<run name>; a run whose summary.json
already exists is not trained again (delete its folder to redo it). The table reads each run's
summary.json: clean top-1 and robust top-1 (main norms, the sweep's eval_attack), and the cost per
training step as vanilla's training throughput over the run's (data loading included).
With W&B (the default, offline without a login) the runs share one group (--group, default
compare_methods-<out folder name>) and a last run of that group, "comparison", holds the table and
a clean-vs-robust top-1 scatter plot: the paper's comparison on one W&B page.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from omegaconf import OmegaConf

from common.exit_status import run_entry_point
from tools.output_guard import check_output_folder
from train.config import load_config
from train.interpolations import refuse_resolvers

REPO = Path(__file__).resolve().parents[1]


def sweep_runs(sweep_file: Path, extra: list[str] = ()) -> dict[str, list[str]]:
    """run name → train/run.py arguments (recipe, common overrides, the run's, then extra)."""
    sweep = OmegaConf.load(sweep_file)
    refuse_resolvers(sweep, f"sweep file {sweep_file}")  # its overrides reach config.yaml (train/interpolations.py)
    common = [f"config={REPO / sweep.recipe}", *sweep.get("common", [])]
    return {name: [*common, *overrides, *extra] for name, overrides in sweep.runs.items()}


def train(name: str, args: list[str], out: Path, group: str) -> dict:
    run_dir = out / name
    summary = run_dir / "summary.json"
    if not summary.is_file():
        command = [sys.executable, str(REPO / "train" / "run.py"), f"wandb_group={group}", *args, f"name={name}",
                   f"output_dir={run_dir}"]
        print(f"[{name}] {' '.join(command[1:])}", flush=True)
        env = {**os.environ, "WANDB_MODE": "offline", "TQDM_DISABLE": "1"}  # errors still reach stderr
        subprocess.run(command, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
    return json.loads(summary.read_text())


def rows(results: dict[str, dict]) -> list[list]:
    """[run, clean top-1, robust top-1, img/s, cost per step × vanilla] for every run."""
    vanilla = results.get("vanilla", {}).get("train_img_per_s")
    return [[name, r["clean_top1"], r.get("robust_top1"), r["train_img_per_s"],
             vanilla / r["train_img_per_s"] if vanilla else None] for name, r in results.items()]


def log_comparison(results: dict[str, dict], *, group: str, project: str, out: Path) -> str:
    """The comparison as one W&B run of the group: a table and a clean-vs-robust scatter plot."""
    import wandb

    from train.tracking import wandb_mode

    os.environ.setdefault("WANDB_SILENT", "true")
    run = wandb.init(project=project, group=group, name="comparison", job_type="comparison", dir=str(out),
                     mode=wandb_mode())
    table = wandb.Table(columns=["run", "clean top-1", "robust top-1", "img/s", "cost/step"], data=rows(results))
    run.log({"comparison/table": table, "comparison/clean_vs_robust": wandb.plot.scatter(
        table, "clean top-1", "robust top-1", title="clean vs robust top-1 (%) per method")})
    run.finish()
    return run.id


def print_table(results: dict[str, dict]) -> None:
    print(f"\n{'run':<22}{'clean top-1':>12}{'robust top-1':>14}{'img/s':>8}{'cost/step':>11}")
    for name, clean, robust, speed, cost in rows(results):
        robust, cost = ("–" if robust is None else f"{robust:.2f} %"), ("–" if cost is None else f"{cost:.2f}×")
        print(f"{name:<22}{clean:>10.2f} %{robust:>14}{speed:>8.0f}{cost:>11}")
    attacks = {r.get("robust_attack") for r in results.values()} - {None}
    print(f"robust attack: {', '.join(sorted(attacks))}; cost per step relative to vanilla's throughput")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sweep", type=Path, default=REPO / "configs" / "sweeps" / "compare_methods.yaml")
    parser.add_argument("--out", type=Path, default=Path("runs/compare"))
    parser.add_argument("--only", default="", help="comma-separated run names (default: all)")
    parser.add_argument("--group", help="W&B group of the runs (default: compare_methods-<out folder name>)")
    parser.add_argument("--json", action="store_true",
                        help="also print every run's summary.json as one JSON object on the last line")
    parser.add_argument("overrides", nargs="*", help="key=value for every run")
    args = parser.parse_args(argv)
    check_output_folder(args.out)  # before the first run trains
    runs = sweep_runs(args.sweep, args.overrides)
    names = [n for n in args.only.split(",") if n] or list(runs)
    group = args.group or f"compare_methods-{args.out.resolve().name}"
    results = {name: train(name, runs[name], args.out.resolve(), group) for name in names}
    print_table(results)
    cfg = load_config(runs[names[0]])
    if cfg.tracker == "wandb":
        run_id = log_comparison(results, group=group, project=cfg.wandb_project, out=args.out.resolve())
        print(f"W&B group {group}: comparison run {run_id} (under {args.out}/wandb)")
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    sys.exit(run_entry_point(main, sys.argv[1:]))
