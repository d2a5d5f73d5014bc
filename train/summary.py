"""What a finished run reports: summary.json and the table printed at the end."""
from __future__ import annotations

from accelerate.utils import gather_object

from train.attacks import attack_steps, build_attack, describe, evaluation_node
from train.run_state import TrainState
from train.environment import summary_line
from train.loop import evaluate


def final_report(ctx, accelerator, train_loader, val_loader, state: TrainState, environment: dict) -> dict:
    cfg = ctx.cfg
    clean = evaluate(ctx.attack_model, val_loader, accelerator, desc="final val")
    report = {"clean_top1": clean["top1"], "clean_top5": clean["top5"], "val_images": clean["images"],
              "images_left_out": {"train": images_left_out(train_loader), "val": images_left_out(val_loader)}}
    attack = robust_attack(cfg)
    if cfg.eval_robust and attack_steps(attack) > 0:
        robust = evaluate(ctx.attack_model, val_loader, accelerator, attack=build_attack(attack), desc="robust val")
        report["robust_top1"] = robust["top1"]
        report["robust_attack"] = describe(attack)[1]
    report.update(throughput(state))
    report["environment"] = environment
    return report


def robust_attack(cfg):
    """The node of the final robust accuracy's attack (untargeted, on the eval-mode model): eval_attack,
    else the training attack's node as its kind evaluates it (PGD: every image from its own random start)."""
    return cfg.eval_attack if cfg.eval_attack is not None else evaluation_node(cfg.attack)


def images_left_out(loader) -> int:
    """Images of the split no batch held: undecodable at the check, or failed mid-run on any
    process (each file once). A collective: every process calls it."""
    return len({path for path, _ in gather_object(list(loader.left_out))})


def throughput(state: TrainState) -> dict:
    """Overall and steady-state (each epoch's first logging window left out) training speed, and
    the share of the steady time spent waiting for the loader; None where no window was steady."""
    steady = state.steady_seconds > 0
    return {"train_seconds": state.train_seconds,
            "train_img_per_s": state.train_images / max(state.train_seconds, 1e-9),
            "steady_img_per_s": state.steady_images / state.steady_seconds if steady else None,
            "data_wait_fraction": state.steady_wait_seconds / state.steady_seconds if steady else None}


def table_rows(cfg, report: dict) -> list[tuple[str, str]]:
    """(name, value) of each row of the final table (tools/readme_figures.py checks the README's
    copy against these names)."""
    environment = report["environment"]
    rows = [("method", cfg.method), ("model", cfg.model),
            ("clean top-1 (main norms)", f"{report['clean_top1']:.2f} %"),
            ("clean top-5 (main norms)", f"{report['clean_top5']:.2f} %")]
    if "robust_top1" in report:
        rows.append((f"robust top-1 ({report['robust_attack']})", f"{report['robust_top1']:.2f} %"))
    steady = report["steady_img_per_s"] is not None
    rows += [("train time", f"{report['train_seconds']:.1f} s"),
             ("train throughput (all)", f"{report['train_img_per_s']:.1f} img/s"),
             ("train throughput (steady)", f"{report['steady_img_per_s']:.1f} img/s" if steady else
              "– (every epoch fits one logging window: lower log_every)"),
             ("waiting for data (steady)", f"{100 * report['data_wait_fraction']:.1f} %" if steady else "–"),
             ("val images", str(report["val_images"])),
             ("images left out (unreadable)", "train {train}, val {val}".format(**report["images_left_out"])),
             ("precision, processes", f"{environment['precision']}, {environment['processes']}"),
             ("device", environment["device"]),
             ("loader", environment["loader"] + (" (compiled model)" if environment["compile"] else "")),
             ("libraries", summary_line(environment))]
    return rows


def print_table(cfg, report: dict) -> None:
    rows = table_rows(cfg, report)
    width = max(len(name) for name, _ in rows)
    print("\n".join(["", f"{'result':<{width}}  value", "-" * (width + 12)]
                    + [f"{name:<{width}}  {value}" for name, value in rows]))
