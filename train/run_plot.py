"""One picture of a run, without W&B: <run>/run.png from its metrics.jsonl (and eval JSON files).

    python tools/plot_run.py runs/demo               # writes runs/demo/run.png
    from train.run_plot import plot_run; plot_run(Path("runs/demo"))

Panels: training loss (clean, adversarial, attack) against the optimizer step; val top-1 (main norms,
aux norms, EMA) against the epoch; robust top-1 (the run's final PGD and every PGD of evaluate.py
--json files in the run folder) beside clean top-1; learning rate; images per second; the share of
time spent waiting for data. train/run.py writes it at the end of every run. The PNG's metadata
lists the panels drawn ("Panels") and the run it shows ("Run").
"""
from __future__ import annotations

import json
from pathlib import Path

PLOT_FILE = "run.png"
PANELS = ("training loss", "val top-1", "robust top-1", "learning rate", "throughput", "waiting for data")


def read_lines(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} has no metrics.jsonl: not a run folder")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def series(lines: list[dict], key: str, x: str) -> tuple[list, list]:
    """(x values, key values) of the lines that have both (a resumed run's redone steps: last wins)."""
    points = {line[x]: line[key] for line in lines if key in line and x in line and line[key] is not None}
    return list(points), list(points.values())


def robust_results(run_dir: Path, lines: list[dict]) -> dict[str, float]:
    """label → top-1 (%): clean and robust of the run's final evaluation, then evaluate.py's JSONs."""
    results = {}
    final = [line for line in lines if "final/clean_top1" in line]
    if final:
        results["clean (final)"] = final[-1]["final/clean_top1"]
        if "final/robust_top1" in final[-1]:
            results["robust (final)"] = final[-1]["final/robust_top1"]
    for path in sorted(Path(run_dir).glob("*.json")):
        try:
            report = json.loads(path.read_text())
        except ValueError:
            continue
        rows = report.get("robust", report.get("pgd")) if isinstance(report, dict) else None  # "pgd": older reports
        if isinstance(rows, list):
            results.update({f"{r['key']} ({path.stem})": r["top1"] for r in rows if "top1" in r})
    return results


def run_title(run_dir: Path) -> str:
    """"<name>: <method>, <model>" from the run's config.yaml (the folder name if it has none)."""
    try:
        from omegaconf import OmegaConf
        cfg = OmegaConf.load(run_dir / "config.yaml")
        return f"{cfg.name}: {cfg.method}, {cfg.model} ({run_dir})"
    except Exception:  # an older or partial run folder: the picture is still worth having
        return str(run_dir)


def plot_run(run_dir: Path, out: Path | None = None) -> Path:
    import matplotlib
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    lines = read_lines(run_dir)
    figure, axes = plt.subplots(2, 3, figsize=(15, 8), constrained_layout=True)
    figure.suptitle(run_title(run_dir), fontsize=13)
    panels = dict(zip(PANELS, axes.flat))
    curves(panels["training loss"], lines, "optimizer step", "loss", "step",
           {"clean": "train/loss/clean", "adversarial": "train/loss/adv", "attack": "train/loss/attack"})
    curves(panels["val top-1"], lines, "epoch", "top-1 (%)", "epoch",
           {"main norms": "val/top1", "aux norms": "val_aux/top1", "EMA": "val_ema/top1"}, marker="o")
    bars(panels["robust top-1"], robust_results(run_dir, lines))
    curves(panels["learning rate"], lines, "optimizer step", "LR", "step", {"LR": "perf/lr"})
    curves(panels["throughput"], lines, "optimizer step", "img/s", "step", {"img/s": "perf/img_per_s"})
    curves(panels["waiting for data"], lines, "optimizer step", "share of time", "step",
           {"waiting for data": "perf/data_wait"})
    for title, axis in panels.items():
        axis.set_title(title)
    out = Path(out) if out else run_dir / PLOT_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=80, metadata={"Panels": ", ".join(PANELS), "Run": str(run_dir)})
    plt.close(figure)
    return out


def curves(axis, lines, xlabel: str, ylabel: str, x: str, keys: dict[str, str], marker: str = "") -> None:
    drawn = 0
    for label, key in keys.items():
        xs, ys = series(lines, key, x)
        if xs:
            axis.plot(xs, ys, marker=marker, label=label)
            drawn += 1
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    if drawn > 1:
        axis.legend()
    if not drawn:
        axis.text(0.5, 0.5, "not logged in this run", ha="center", va="center", transform=axis.transAxes)


def bars(axis, results: dict[str, float]) -> None:
    if not results:
        axis.text(0.5, 0.5, "no robust evaluation yet", ha="center", va="center", transform=axis.transAxes)
        return
    axis.barh(list(results), list(results.values()), color=["tab:blue" if "clean" in k else "tab:red" for k in results])
    axis.set_xlabel("top-1 (%)")
    axis.set_xlim(0, 100)
    for y, value in enumerate(results.values()):
        axis.text(value + 1, y, f"{value:.1f}", va="center")
