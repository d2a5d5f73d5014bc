"""Which checkpoint a run continues from, and the refusals that keep runs apart: resume=auto (the
newest loadable checkpoint of output_dir), resume=PATH, resume=none; each first checked against the
folder and the checkpoint's settings (what may change: train/resume_rules.py)."""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException
from safetensors.torch import load_file

from models.export import non_finite_names
from train.checkpoint_io import checkpoint_dir, list_checkpoints, load_checkpoint, read_run_settings, training_tensors
from train.config import read_saved_config
from train.faults import any_process
from train.resume_rules import ResumeMismatch, check_same_run
from train.run_state import CheckpointError, TrainState, read_state


def check_matches(accelerator, folder: Path, cfg, classes: list[str] | None) -> None:
    saved_cfg, saved_classes = read_run_settings(folder)
    check_same_run(saved_cfg, cfg, where=f"checkpoint {folder}", saved_classes=saved_classes, classes=classes,
                   saved_processes=read_state(folder).processes, processes=accelerator.num_processes)


def holds_run(run_dir: Path) -> bool:
    return any((Path(run_dir) / name).exists() for name in ("config.yaml", "metrics.jsonl", "checkpoints"))


def check_resume(accelerator, cfg, run_dir: Path, classes: list[str] | None = None) -> None:
    """Refuse, before any work, a command that would overwrite or mix runs: resume=none into a
    folder that holds a run, resume=PATH into a folder with checkpoints of its own, or settings
    other than those of the checkpoint (or run folder) being continued (train/resume_rules.py).
    classes: compared too when known (the loaders are built after this first check)."""
    run_dir, resume = Path(run_dir), cfg.resume
    if resume == "none":
        if holds_run(run_dir):
            raise ResumeMismatch(f"output_dir {run_dir} already holds a run, and resume=none would overwrite it: "
                                 f"give a new output_dir, or resume=auto to continue it")
        return
    if resume != "auto":
        folder, own = Path(resume), checkpoint_dir(run_dir).resolve()
        if not folder.is_dir():
            raise CheckpointError(f"resume={folder}: no checkpoint folder there")
        if list_checkpoints(own) and own not in folder.resolve().parents:
            raise ResumeMismatch(f"output_dir {run_dir} holds checkpoints of its own run; continuing {folder} "
                                 f"there would mix two runs: give a new output_dir")
        check_matches(accelerator, folder, cfg, classes)
        return
    for folder in reversed(list_checkpoints(checkpoint_dir(run_dir))):
        try:  # the newest checkpoint that says what it was made with; damage is restore()'s to handle
            return check_matches(accelerator, folder, cfg, classes)
        except CheckpointError:
            continue
    if (run_dir / "config.yaml").is_file():  # a run stopped before any readable checkpoint
        check_same_run(read_saved_config(run_dir / "config.yaml"), cfg, where=f"output_dir {run_dir}")


def continued_settings(cfg) -> DictConfig | None:
    """The config of the run that cfg continues: resume=PATH's checkpoint, or with resume=auto the
    newest readable checkpoint of output_dir (else its config.yaml); None for a new run or where
    nothing reads (check_resume then says what is wrong)."""
    run_dir = Path(cfg.output_dir)
    if cfg.resume == "none":
        return None
    folders = [Path(cfg.resume)] if cfg.resume != "auto" else reversed(list_checkpoints(checkpoint_dir(run_dir)))
    for folder in folders:
        try:
            return read_run_settings(folder)[0]
        except CheckpointError:
            continue
    try:
        return read_saved_config(run_dir / "config.yaml") if cfg.resume == "auto" and holds_run(run_dir) else None
    except (OSError, OmegaConfBaseException):
        return None


class PoisonedCheckpoint(RuntimeError):
    """A checkpoint whose weights, EMA or optimizer state hold a NaN or an infinity (edited, or saved
    by a version without today's guard): no step from it can be finite, whatever the settings."""
    exit_code = 3  # the non-finite family (train/faults.py NonFiniteLoss)


def finite_weights(folder: Path) -> bool:
    try:
        return not non_finite_names(load_file(str(folder / "model.safetensors")))
    except Exception:  # missing or damaged: not one to continue from either
        return False


def refuse_poisoned(accelerator, folder: Path, ema=None) -> None:
    """PoisonedCheckpoint, naming the newest earlier checkpoint with finite weights, when the state
    just loaded from folder is not finite (on any process)."""
    bad = non_finite_names(training_tensors(accelerator, ema))
    if not any_process(bool(bad), accelerator):
        return
    real = folder.resolve()  # resume=PATH may name a link (checkpoints/last)
    listed = list_checkpoints(real.parent)
    older = listed[:listed.index(real)] if real in listed else []
    earlier = next((candidate for candidate in reversed(older) if finite_weights(candidate)), None)
    advice = (f"the newest earlier one with finite weights is {earlier}: move {folder} away (resume=auto then "
              f"continues from {earlier.name}) or pass resume={earlier}" if earlier else
              f"no earlier checkpoint in {folder.parent} has finite weights: start a new run (a new output_dir)")
    raise PoisonedCheckpoint(
        f"checkpoint {folder} itself holds NaN or infinite values ({len(bad)} tensor{'s' * (len(bad) > 1)}: "
        f"{', '.join(bad[:3])}{', …' if len(bad) > 3 else ''}), so no step can continue from it; {advice}")


def restore(accelerator, cfg, run_dir: Path, classes: list[str], ema=None) -> tuple[TrainState, Path | None]:
    """resume=none: a fresh run. PATH: that checkpoint, or an error. auto: the newest loadable
    checkpoint of this run (older ones are tried when the newest is damaged), a fresh run if it has
    none, an error if none loads. Each is first checked by check_resume."""
    check_resume(accelerator, cfg, run_dir, classes)
    if cfg.resume == "none":
        return TrainState(), None
    if cfg.resume != "auto":
        folder = Path(cfg.resume)
        state = load_checkpoint(accelerator, folder, ema)
        refuse_poisoned(accelerator, folder, ema)
        return state, folder
    checkpoints = list_checkpoints(checkpoint_dir(run_dir))
    problems = []
    for folder in reversed(checkpoints):
        try:
            check_matches(accelerator, folder, cfg, classes)
            state = load_checkpoint(accelerator, folder, ema)
            refuse_poisoned(accelerator, folder, ema)
            return state, folder
        except CheckpointError as error:
            accelerator.print(f"warning: skipping damaged checkpoint: {error}")
            problems.append(str(error))
    if not checkpoints:
        return TrainState(), None
    raise CheckpointError(f"none of the {len(checkpoints)} checkpoints in {checkpoint_dir(run_dir)} can be loaded "
                          f"(newest: {problems[0]}); resume=PATH picks one, or give a new output_dir for a new run")
