#!/usr/bin/env python
"""Train a timm image classifier with AdvProp (or a baseline) under Accelerate.

    accelerate launch --config_file accelerate_config.yaml train/run.py              # the demo
    accelerate launch --config_file accelerate_config.yaml train/run.py config=configs/x.yaml epochs=3
    python train/run.py method=vanilla tracker=none                                  # one process

Leaves in output_dir (default runs/<name>): config.yaml, metrics.jsonl, checkpoints/ (last, best),
final_main_bn.safetensors (plain timm weights), panels/*.png, summary.json, wandb/.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: pipelines/, models/, train/

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from omegaconf import OmegaConf

from models.export import save_main_bn
from models.factory import create_model
from pipelines.loader import build_loader, prepare_dataset
from train.checkpoint import TrainState, load_checkpoint, resolve_resume, save_checkpoint
from train.config import load_config, save_config
from train.errors import UserInputError
from train.loop import evaluate, robust_attack, train_one_epoch
from train.methods import USES_DUAL_BN, StepContext
from train.optim import create_optimizer, create_schedule
from train.tracking import RunLog


def build_loaders(cfg, accelerator):
    with accelerator.main_process_first():
        prepare_dataset(cfg)
    shard = dict(rank=accelerator.process_index, world_size=accelerator.num_processes, device=accelerator.device)
    train_loader, val_loader = build_loader(cfg, "train", **shard), build_loader(cfg, "val", **shard)
    if train_loader.classes != val_loader.classes:
        raise UserInputError(f"train and val folders have different classes: "
                             f"{train_loader.classes[:5]}… vs {val_loader.classes[:5]}…")
    if len(train_loader) < cfg.grad_accum_steps:
        raise UserInputError(f"the train set gives {len(train_loader)} batches of {cfg.batch_size} per "
                             f"process: too few for one optimizer step; lower batch_size")
    return train_loader, val_loader


def validate_epoch(ctx, accelerator, val_loader) -> dict:
    val = evaluate(ctx.attack_model, val_loader, accelerator)
    metrics = {f"val/{k}": v for k, v in val.items() if k != "images"}
    if ctx.cfg.eval_aux_bn and ctx.cfg.method in USES_DUAL_BN:
        aux = evaluate(ctx.attack_model, val_loader, accelerator, route="aux", desc="val (aux BN)")
        metrics.update({f"val_aux/{k}": v for k, v in aux.items() if k != "images"})
    return metrics


def final_report(ctx, accelerator, val_loader, state: TrainState) -> dict:
    cfg = ctx.cfg
    clean = evaluate(ctx.attack_model, val_loader, accelerator, desc="final val")
    report = {"clean_top1": clean["top1"], "clean_top5": clean["top5"], "val_images": clean["images"]}
    attack = cfg.eval_attack or cfg.attack
    if cfg.eval_robust and attack.steps > 0:
        robust = evaluate(ctx.attack_model, val_loader, accelerator, attack=robust_attack(cfg), desc="robust val")
        report["robust_top1"] = robust["top1"]
        report["robust_attack"] = f"PGD-{attack.steps} eps={attack.eps:g}/255 untargeted"
    report.update(train_seconds=state.train_seconds,
                  train_img_per_s=state.train_images / max(state.train_seconds, 1e-9))
    return report


def print_table(cfg, report: dict) -> None:
    rows = [("method", cfg.method), ("model", cfg.model),
            ("clean top-1 (main BN)", f"{report['clean_top1']:.2f} %"),
            ("clean top-5 (main BN)", f"{report['clean_top5']:.2f} %")]
    if "robust_top1" in report:
        rows.append((f"robust top-1 ({report['robust_attack']})", f"{report['robust_top1']:.2f} %"))
    rows += [("train time", f"{report['train_seconds']:.1f} s"),
             ("train throughput", f"{report['train_img_per_s']:.1f} img/s"),
             ("val images", str(report["val_images"]))]
    width = max(len(name) for name, _ in rows)
    print("\n".join(["", f"{'result':<{width}}  value", "-" * (width + 12)]
                    + [f"{name:<{width}}  {value}" for name, value in rows]))


def main(argv: list[str]) -> None:
    cfg = load_config(argv)
    accelerator = Accelerator(log_with="wandb" if cfg.tracker == "wandb" else None)
    set_seed(cfg.seed)  # same initial weights on every process
    train_loader, val_loader = build_loaders(cfg, accelerator)
    classes = train_loader.classes
    model = create_model(cfg, len(classes), dual_bn=cfg.method in USES_DUAL_BN)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = create_optimizer(cfg, model, accelerator.num_processes)
    model, optimizer = accelerator.prepare(model, optimizer)
    scheduler = create_schedule(cfg, optimizer, len(train_loader) // cfg.grad_accum_steps)

    run_dir = Path(cfg.output_dir)
    resume_from = resolve_resume(cfg.resume, run_dir)
    state = load_checkpoint(accelerator, resume_from) if resume_from else TrainState()
    if resume_from is None:
        set_seed(cfg.seed, device_specific=True)  # distinct attack noise per process
    scheduler.step_update(state.step)
    # Inputs are valid and loadable: only now does the run write anything.
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        print(OmegaConf.to_yaml(cfg) if resume_from is None else f"resuming from {resume_from} "
              f"(epoch {state.epoch + 1}, step {state.step})")
    accelerator.wait_for_everyone()
    log = RunLog(accelerator, cfg, run_dir, OmegaConf.to_container(cfg, resolve=True))
    ctx = StepContext(model, accelerator.unwrap_model(model), cfg, len(classes),
                      backward=lambda loss: accelerator.backward(loss / cfg.grad_accum_steps),
                      no_sync=lambda: accelerator.no_sync(model))

    while state.epoch < cfg.epochs:
        epoch_start = time.perf_counter()
        train_one_epoch(ctx, accelerator, train_loader, optimizer, scheduler, state, log)
        metrics = validate_epoch(ctx, accelerator, val_loader)
        is_best = metrics["val/top1"] > state.best_top1
        state.best_top1 = max(state.best_top1, metrics["val/top1"])
        log.log({"epoch": state.epoch, **metrics, "epoch_seconds": time.perf_counter() - epoch_start}, state.step)
        accelerator.print(f"epoch {state.epoch}/{cfg.epochs}: val top-1 {metrics['val/top1']:.2f} % "
                          f"top-5 {metrics['val/top5']:.2f} % loss {metrics['val/loss']:.4f}")
        save_checkpoint(accelerator, run_dir, f"epoch_{state.epoch:04d}", state, cfg,
                        is_best=is_best, keep=cfg.keep_checkpoints)

    report = final_report(ctx, accelerator, val_loader, state)
    log.log({f"final/{k}": v for k, v in report.items() if not isinstance(v, str)}, state.step)
    if accelerator.is_main_process:
        save_main_bn(ctx.attack_model.net, run_dir / "final_main_bn.safetensors", model_name=cfg.model,
                     normalization=cfg.normalization, classes=classes)
        (run_dir / "summary.json").write_text(json.dumps(report, indent=1))
        print_table(cfg, report)
    log.close()


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (UserInputError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
