"""The evaluation report three ways: a terminal table, JSON with every number, and W&B.

The report is a dict: "model" (what was evaluated), one entry per evaluated set ("clean", "robust"
(a list: one entry per attack, PGD, AutoAttack, APGD), "imagenet_c", "corrupted", "imagenet_a", "imagenet_r", "stylized"), and "errors"
({set: message}) for sets that could not be evaluated. Accuracies and errors are in percent.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

TITLES = {"clean": "clean val", "imagenet_a": "ImageNet-A", "imagenet_r": "ImageNet-R",
          "stylized": "Stylized-ImageNet"}


# ----------------------------------------------------------------------------------------------
# terminal

def format_table(report: dict) -> str:
    info = report["model"]
    lines = [f"model: {info['name']} from {info['path']}, {info['norm']} norms, {info['image_size']} px, "
             f"crop ratio {info['crop_ratio']:g}"
             + (f", LIMITED to ~{info['limit']} images per set (a quick look, not a result)" if info["limit"] else ""),
             "", f"{'set':<56} {'top-1':>8} {'top-5':>8} {'images':>7}", "-" * 82]
    rows = [(TITLES["clean"], report["clean"])] if "clean" in report else []
    rows += [(f"robust: {r['attack']}", r) for r in report.get("robust", [])]
    rows += [(TITLES[key] + (f" ({report[key]['classes']}-class subset)" if "classes" in report[key] else ""),
              report[key]) for key in ("imagenet_a", "imagenet_r", "stylized") if key in report]
    lines += [f"{title:<56} {r['top1']:>7.2f}% {r['top5']:>7.2f}% {r['images']:>7}" for title, r in rows]
    if "imagenet_c" in report:
        c = report["imagenet_c"]
        relative = f", relative mCE {c['relative_mce']:.2f} %" if "relative_mce" in c else ""
        partial = "" if c["complete"] else " — PARTIAL: not all 15 corruptions × 5 severities"
        lines += ["", f"ImageNet-C: mCE {c['mce']:.2f} %{relative} (AlexNet-normalised){partial}",
                  *corruption_rows(c)]
    if "corrupted" in report:
        c = report["corrupted"]
        lines += ["", f"Corruptions synthesised from {c['source']} (imagecorruptions): mean corruption error "
                  f"{c['mean_corruption_error']:.2f} % — UN-normalised, not comparable with published mCE",
                  *corruption_rows(c)]
    lines += [f"\nFAILED {name}: {message}" for name, message in report["errors"].items()]
    return "\n".join(lines)


def corruption_rows(summary: dict) -> list[str]:
    extra = [(title, key) for title, key in (("CE", "ce"), ("rel CE", "relative_ce")) if key in summary]
    rows = [f"  {'corruption':<18}" + "".join(f"{'s' + str(s):>7}" for s in range(1, 6)) + f"{'error':>8}"
            + "".join(f"{title:>8}" for title, _ in extra)]
    for name, errors in summary["errors"].items():
        cells = "".join(f"{errors[s]:>7.1f}" if s in errors else f"{'-':>7}" for s in range(1, 6))
        rows.append(f"  {name:<18}{cells}{summary['corruption_error'][name]:>8.2f}"
                    + "".join(f"{summary[key][name]:>8.1f}" for _, key in extra))
    return rows


# ----------------------------------------------------------------------------------------------
# JSON and flat metrics

def write_json(report: dict, path: Path) -> None:
    """Atomically: a reader never sees half a report."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(report, indent=1))
    os.replace(temporary, path)


def flat_metrics(report: dict) -> dict[str, float]:
    """{"eval/<set>/<metric>": value} for every scalar number (W&B summary and table)."""
    metrics = {}
    for key in ("clean", "imagenet_a", "imagenet_r", "stylized"):
        for metric in ("top1", "top5", "loss"):
            if key in report:
                metrics[f"eval/{key}/{metric}"] = report[key][metric]
    for attack in report.get("robust", []):
        metrics[f"eval/robust_{attack['key']}/top1"] = attack["top1"]
    for key in ("imagenet_c", "corrupted"):
        summary = report.get(key, {})
        for name in ("mce", "relative_mce", "mean_corruption_error"):
            if name in summary:
                metrics[f"eval/{key}/{name}"] = summary[name]
        for name, error in summary.get("corruption_error", {}).items():
            metrics[f"eval/{key}/error/{name}"] = error
    return metrics


# ----------------------------------------------------------------------------------------------
# W&B

def log_wandb(report: dict, *, project: str, run_id: str | None, run_dir: Path, mode: str,
              artifact: str | None = None) -> str:
    """The numbers as a table, summary values and a per-corruption error bar chart, into the run
    `run_id` (resumed: e.g. the training run) or a new run. Returns the run's id."""
    import wandb

    run = wandb.init(project=project, id=run_id, resume="allow" if run_id else None, dir=str(run_dir),
                     mode=mode, job_type="evaluate")
    metrics = flat_metrics(report)
    logged = {"eval/table": wandb.Table(columns=["metric", "value"], data=[[k, v] for k, v in metrics.items()])}
    for key in ("imagenet_c", "corrupted"):
        if key in report:
            bars = wandb.Table(columns=["corruption", "error"],
                               data=[[c, e] for c, e in report[key]["corruption_error"].items()])
            logged[f"eval/{key}/error_chart"] = wandb.plot.bar(bars, "corruption", "error",
                                                               title=f"{key}: top-1 error per corruption (%)")
    run.log(logged)
    run.summary.update(metrics)
    # which weights these numbers are of: the model artifact the training run logged, if any
    run.config.update({"evaluated_model": {"path": report["model"]["path"], "artifact": artifact}},
                      allow_val_change=True)
    if artifact and mode == "online":  # lineage in the W&B UI (offline runs cannot look artifacts up)
        run.use_artifact(artifact)
    run_id = run.id
    run.finish()
    return run_id
