#!/usr/bin/env python
"""Train a timm image classifier with AdvProp (or a baseline) under Accelerate.

    accelerate launch --config_file accelerate_config.yaml train/run.py              # the demo
    accelerate launch --config_file accelerate_config.yaml train/run.py config=configs/x.yaml epochs=3
    python train/run.py method=vanilla tracker=none                                  # one process

Leaves in output_dir (default runs/<name>): config.yaml, metrics.jsonl, checkpoints/ (last, best),
final_model/ (the trained model as timm's Hub folder: tools/export.py), panels/*.png, summary.json, wandb/.
One run at a time writes an output_dir; rerunning the command continues it (train/resume_rules.py
says which settings may change). Exit status: 0 finished (a signal after the final table too), or
stopped by a signal with a checkpoint saved; 2 bad input (nothing written), a size that does not fit
memory included (train/memory_check.py); 3 non-finite loss or weights (none saved), or a checkpoint
holding them; 4 disk full (previous checkpoints intact); 5 another process did not answer within
collective_timeout_s; 128 + N: signal N at start-up (nothing trained yet) or during the final
evaluation (training is saved; rerun to redo the evaluation). docs/runs.md: what is refused.
An epoch's training is checkpointed before its validation, which a resumed run redoes if it did
not finish.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

# Before torch loads OpenMP, which reads it once: a thread that waits for the others at the end of a
# parallel region sleeps instead of spinning. On cores other processes share, spinning threads made
# a 2-thread training step 7x slower than one thread; sleeping ones match it. A user's value wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from train.faults import stop_at_once_while_starting  # noqa: E402  (torch-free)

if __name__ == "__main__":  # a signal during the imports (seconds) ends with its exit status and a line
    stop_at_once_while_starting()

import torch  # noqa: E402  (and below: after the OpenMP setting)
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from omegaconf import OmegaConf

from common.errors import UserInputError
from common.exit_status import run_entry_point
from pipelines.loading import build_loader, prepare_dataset
from train.checkpoint_io import mark_validated, save_checkpoint
from train.compile import compiled_graphs
from train.config import load_config, save_config
from train.distributed import (die_with_launcher, doing, main_process_first_without_timeout, peer_timeout,
                               process_group_kwargs)
from train.ema import create_ema
from train.environment import describe, use_cpu_threads
from train.faults import StopInValidation, StoppedAfterTraining, StopRequest
from train.fork_hazard import warn_of_fork_hazard
from train.loop import evaluate, train_one_epoch
from train.memory_check import check_memory_fits, out_of_memory_explained
from train.methods import StepContext, method_of
from train.model_setup import build_model
from train.model_artifacts import FINAL_EMA_EXPORT, FINAL_EXPORT, OLD_FINAL_EXPORTS, ModelArtifacts
from train.model_export import export_model, final_results, logged_epoch_results
from train.optim import create_schedule, steps_per_epoch
from train.resume import check_resume, continued_settings, restore
from train.resume_rules import class_difference
from train.output_dir import check_output_dir
from train.run_plot import PLOT_FILE, plot_run
from train.run_lock import claim_run_folder
from train.step_guard import StepGuard
from train.summary import final_report, print_table
from train.tracking import RunLog


def build_loaders(cfg, accelerator):
    with main_process_first_without_timeout(accelerator):  # an FFCV conversion may take an hour
        prepare_dataset(cfg)
    shard = dict(rank=accelerator.process_index, world_size=accelerator.num_processes, device=accelerator.device)
    train_loader, val_loader = build_loader(cfg, "train", **shard), build_loader(cfg, "val", **shard)
    if train_loader.classes != val_loader.classes:
        raise UserInputError(f"train and val folders have different classes: "
                             f"{class_difference(train_loader.classes, val_loader.classes, ('train', 'val'))}")
    if len(train_loader) < cfg.grad_accum_steps:
        raise UserInputError(f"the train set gives {len(train_loader)} batches of {cfg.batch_size} per "
                             f"process, fewer than grad_accum_steps={cfg.grad_accum_steps}: lower batch_size "
                             f"or grad_accum_steps")
    return train_loader, val_loader


def validate_epoch(ctx, accelerator, val_loader, ema=None, stop=None) -> dict:
    val = evaluate(ctx.attack_model, val_loader, accelerator, stop=stop)
    metrics = {f"val/{k}": v for k, v in val.items() if k != "images"}
    if ema is not None:
        averaged = evaluate(ema.module, val_loader, accelerator, desc="val (EMA)", stop=stop)
        metrics.update({f"val_ema/{k}": v for k, v in averaged.items() if k != "images"})
    if ctx.cfg.eval_aux_norm and method_of(ctx.cfg).dual_norm:
        aux = evaluate(ctx.attack_model, val_loader, accelerator, route="aux", desc="val (aux norms)", stop=stop)
        metrics.update({f"val_aux/{k}": v for k, v in aux.items() if k != "images"})
    return metrics


def main(argv: list[str]) -> None:
    stop_at_once_while_starting()  # nothing trained yet: a signal stops at once (train/faults.py)
    die_with_launcher()  # a killed launcher leaves no worker behind holding the output_dir
    cfg = load_config(argv, continuing=continued_settings)  # a continued run keeps its method defaults
    with out_of_memory_explained(cfg):  # settings too large for the device: one line naming them
        return run(cfg)


def run(cfg) -> None:
    """The run of a validated config: set-up, training, the final evaluation (see the module doc)."""
    # cpu=True without CUDA: under torchrun (`accelerate launch --multi_gpu`) that gives real
    # multi-process CPU training over gloo; Accelerate would otherwise run each process alone.
    # A method with several backwards a step runs all but the last without DDP sync, and the last
    # may leave parameters out (train/methods/record.py): DDP must look for them.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=method_of(cfg).backwards(cfg) > 1)
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), kwargs_handlers=[ddp, process_group_kwargs(cfg)],
                              log_with="wandb" if cfg.tracker == "wandb" else None)
    run_dir = Path(cfg.output_dir)
    check_output_dir(accelerator, run_dir, cfg.tracker)  # a file, a read-only disk, /proc: refused here
    locked = claim_run_folder(accelerator, run_dir)  # a second run into the same folder stops here
    check_resume(accelerator, cfg, run_dir)  # so do settings that would overwrite or mix runs
    warn_of_fork_hazard(accelerator, cfg)  # CPython < 3.11.10 with several processes
    set_seed(cfg.seed)  # same initial weights on every process
    train_loader, val_loader = build_loaders(cfg, accelerator)
    use_cpu_threads(accelerator.device)  # on a CPU; after the loaders, which may set torch's threads
    classes = train_loader.classes
    model, optimizer = build_model(cfg, accelerator, len(classes))
    scheduler = create_schedule(cfg, optimizer, steps_per_epoch(len(train_loader), cfg.grad_accum_steps))
    ctx = StepContext(model, accelerator.unwrap_model(model), cfg, len(classes), rank=accelerator.process_index,
                      world_size=accelerator.num_processes, gather=accelerator.gather)
    ema = create_ema(ctx.attack_model, cfg.ema_decay, accelerator.device)
    guard = StepGuard(ctx.attack_model, optimizer, accelerator, mode=cfg.nonfinite_check,
                      on_nonfinite=cfg.on_nonfinite)
    check_memory_fits(ctx, accelerator)  # on a CPU: a step that cannot fit, before it meets the OOM killer

    state, resume_from = restore(accelerator, cfg, run_dir, classes, ema)
    state.processes = accelerator.num_processes
    if resume_from is None:
        set_seed(cfg.seed, device_specific=True)  # distinct attack noise per process
    scheduler.step_update(state.step)
    # Inputs are valid and loadable: only now does the run write anything.
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
    if not locked:
        claim_run_folder(accelerator, run_dir)
    if accelerator.is_main_process:
        save_config(cfg, run_dir / "config.yaml")
        print(OmegaConf.to_yaml(cfg) if resume_from is None else f"resuming from {resume_from} "
              f"(epoch {state.epoch + 1}, batch {state.batch}, step {state.step})")
    accelerator.wait_for_everyone()
    environment = describe(accelerator, cfg)
    log = RunLog(accelerator, cfg, run_dir, {**OmegaConf.to_container(cfg, resolve=True), "environment": environment},
                 keep_lines=state.metrics_lines if resume_from else -1)  # the redone steps' lines go
    artifacts = ModelArtifacts(log.wandb_run, run_dir, cfg, classes)

    def save(name: str, is_best: bool = False) -> None:
        before = doing(f"saving checkpoint {name}")
        state.metrics_lines = log.lines
        save_checkpoint(accelerator, run_dir, name, state, cfg, classes, ema=ema, is_best=is_best,
                        keep=cfg.keep_checkpoints)
        doing(before)

    def validate_saved_epoch(epoch_start: float | None = None) -> None:
        """Validate the epoch whose training is checkpointed, and record the outcome in that checkpoint."""
        doing(f"the validation of epoch {state.epoch}")
        metrics, is_best = end_epoch(ctx, accelerator, val_loader, state, log, ema, epoch_start, stop)
        state.validated, state.metrics_lines = True, log.lines
        name = f"epoch_{state.epoch:04d}"
        if not mark_validated(accelerator, run_dir, name, state, is_best=is_best, keep=cfg.keep_checkpoints):
            save(name, is_best)  # resumed from another run's checkpoint: this run's own copy
        artifacts.epoch_end(ctx.attack_model.net, state.epoch, metrics, is_best, last=state.epoch == cfg.epochs)

    stop = StopRequest().install()
    try:
        if not state.validated:  # the run before saved this epoch's training, then stopped or failed validating it
            accelerator.print(f"epoch {state.epoch}: its training is saved, its validation is not: validating it")
            validate_saved_epoch()
        if state.epoch >= cfg.epochs:
            accelerator.print(f"training finished at epoch {state.epoch}: redoing the final evaluation and exports")
        while state.epoch < cfg.epochs:
            epoch_start = time.perf_counter()
            doing(lambda: f"training (epoch {state.epoch + 1}, step {state.step + 1})")
            finished = train_one_epoch(ctx, accelerator, train_loader, optimizer, scheduler, state, log, guard,
                                       ema=ema, stop=stop, save_mid_epoch=lambda: save(f"step_{state.step:08d}"))
            if not finished:
                save(f"step_{state.step:08d}")
                return stopped(accelerator, state, log)
            state.validated = False
            save(f"epoch_{state.epoch:04d}")  # the epoch's training is safe before its validation can fail
            if stop.agreed(accelerator):  # asked late in the epoch: a resumed run validates it
                raise StopInValidation()
            validate_saved_epoch(epoch_start)
            if stop.agreed(accelerator):  # asked in a validation too short to check: the epoch is complete
                return stopped(accelerator, state, log)
    except StopInValidation:
        return stopped(accelerator, state, log)
    stop.training_saved()
    doing("the final evaluation")
    try:
        report = finish(ctx, accelerator, train_loader, val_loader, state, log, run_dir, classes, ema, environment,
                        artifacts)
    except StoppedAfterTraining:
        log.close()
        raise
    stop.finished()  # everything is written: a signal now ends with exit 0
    if accelerator.is_main_process:
        print_table(cfg, report)
        print(f"plot of the run: {run_dir / PLOT_FILE}")


def end_epoch(ctx, accelerator, val_loader, state, log, ema, epoch_start: float | None, stop) -> tuple[dict, bool]:
    """Validate the finished epoch, log it, keep track of the best; (metrics, is it the best).
    epoch_start: None where the epoch's training was done by an earlier run."""
    metrics = validate_epoch(ctx, accelerator, val_loader, ema, stop)
    # a NaN loss never makes a checkpoint "best"
    is_best = math.isfinite(metrics["val/loss"]) and metrics["val/top1"] > state.best_top1
    if is_best:
        state.best_top1, state.best_epoch = metrics["val/top1"], state.epoch
    if ctx.cfg.compile:  # graphs compiled so far: flat after the first epoch, or something recompiles
        metrics["compile/graphs"] = compiled_graphs()
    seconds = {} if epoch_start is None else {"epoch_seconds": time.perf_counter() - epoch_start}
    log.log({"epoch": state.epoch, **metrics, **seconds}, state.step)
    accelerator.print(f"epoch {state.epoch}/{ctx.cfg.epochs}: val top-1 {metrics['val/top1']:.2f} % "
                      f"top-5 {metrics['val/top5']:.2f} % loss {metrics['val/loss']:.4f}")
    return metrics, is_best


def stopped(accelerator, state, log) -> None:
    if state.validated:
        accelerator.print(f"stopped at step {state.step} (epoch {state.epoch + 1}, batch {state.batch}); "
                          "checkpoint saved: the same command continues from here (resume=auto)")
    else:
        accelerator.print(f"stopped at step {state.step}, before the validation of epoch {state.epoch} was done; its "
                          "training is saved: the same command validates it and continues (resume=auto)")
    log.close()


def finish(ctx, accelerator, train_loader, val_loader, state, log, run_dir: Path, classes: list[str], ema,
           environment: dict, artifacts: ModelArtifacts) -> dict:
    """Final evaluation, plain-timm exports (to W&B too), summary.json and the plot; the report."""
    cfg = ctx.cfg
    report = final_report(ctx, accelerator, train_loader, val_loader, state, environment)
    log.log({"epoch": state.epoch, **{f"final/{k}": v for k, v in report.items() if isinstance(v, (int, float))}},
            state.step)
    if accelerator.is_main_process:
        results = final_results(report, state.epoch)
        export_model(ctx.attack_model.net, run_dir / FINAL_EXPORT, cfg, classes, results)
        if ema is not None:
            export_model(ema.module.net, run_dir / FINAL_EMA_EXPORT, cfg, classes,
                         logged_epoch_results(run_dir, state.epoch, "val_ema") or {"epoch": state.epoch})
        for old in OLD_FINAL_EXPORTS:  # the single-file exports of a run made before the folder: stale now
            (run_dir / old).unlink(missing_ok=True)
        (run_dir / "summary.json").write_text(json.dumps(report, indent=1))
        artifacts.final(report, state.epoch, best_is_last=state.best_epoch == state.epoch)
        plot_run(run_dir)
    log.close()
    return report


def cli(argv: list[str]) -> int:
    """The command line's exit status: 0, or the documented status of what stopped the run
    (common/exit_status.py; gloo's timeout means another process is frozen or gone: PeerTimeout)."""
    return run_entry_point(main, argv, peer_timeout)


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
