"""Checkpoints: Accelerate's save_state (model as safetensors, optimizer, grad scaler, per-rank RNG)
plus our progress (train_state.json) and the resolved config, written atomically.

    <output_dir>/checkpoints/epoch_0003/   one folder per save (step_00001234/ for mid-epoch saves)
    <output_dir>/checkpoints/last  → newest   best → best val top-1   (relative symlinks)

A save goes to a hidden temporary folder that is renamed into place when every rank is done, so a
crash mid-save leaves the previous checkpoints intact; only renamed folders count as checkpoints.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from omegaconf import OmegaConf

from train.ema import load_ema, save_ema
from train.errors import UserInputError

STATE_FILE = "train_state.json"


class CheckpointError(UserInputError):
    pass


@dataclass
class TrainState:
    epoch: int = 0  # current epoch (0-based); == cfg.epochs when training is done
    batch: int = 0  # batches of `epoch` already consumed (mid-epoch resume)
    step: int = 0  # optimizer steps so far
    best_top1: float = -1.0
    train_images: int = 0  # images trained on, all processes
    train_seconds: float = 0.0


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(accelerator, run_dir: Path, name: str, state: TrainState, cfg, classes: list[str], *,
                    is_best: bool, keep: int, ema=None) -> Path:
    """Every process must call this (each writes its RNG state)."""
    root = checkpoint_dir(run_dir)
    final, staging = root / name, root / f".tmp-{name}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    if accelerator.is_main_process:
        (staging / STATE_FILE).write_text(json.dumps(asdict(state), indent=1))
        (staging / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        (staging / "classes.json").write_text(json.dumps(classes))
        if ema is not None:
            save_ema(ema, staging)
        _replace_dir(staging, final)
        _point(root / "last", name)
        if is_best:
            _point(root / "best", name)
        _prune(root, keep)
    accelerator.wait_for_everyone()
    return final


def _replace_dir(source: Path, target: Path) -> None:
    if target.exists():
        old = target.with_name(f".old-{target.name}")
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
        source.rename(target)
        shutil.rmtree(old)
    else:
        source.rename(target)


def _point(link: Path, name: str) -> None:
    temporary = link.with_name(f".{link.name}.tmp")
    temporary.unlink(missing_ok=True)
    temporary.symlink_to(name)
    os.replace(temporary, link)


def _prune(root: Path, keep: int) -> None:
    protected = {os.readlink(root / link) for link in ("last", "best") if (root / link).is_symlink()}
    for old in list_checkpoints(root)[:-keep]:
        if old.name not in protected:
            shutil.rmtree(old)


def read_state(folder: Path) -> TrainState:
    try:
        return TrainState(**json.loads((Path(folder) / STATE_FILE).read_text()))
    except (OSError, ValueError, TypeError) as error:
        raise CheckpointError(f"checkpoint {folder} is unreadable: {STATE_FILE}: {error}") from None


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint folders under root, oldest first (by training progress)."""
    if not root.is_dir():
        return []
    progress = {}
    for folder in root.iterdir():
        if folder.is_dir() and not folder.is_symlink() and not folder.name.startswith("."):
            try:
                state = read_state(folder)
            except CheckpointError:
                state = TrainState(step=-1)  # unreadable: oldest, tried last
            progress[folder] = (state.step, state.batch, folder.name)
    return sorted(progress, key=progress.get)


def check_rng_file(accelerator, folder: Path) -> None:
    """Accelerate skips an unreadable RNG file with a log line and resumes with other random
    streams; an exact resume needs it, so a damaged one fails the checkpoint here."""
    from accelerate.utils import load  # torch.load(weights_only=True) plus numpy's RNG types

    rng_file = Path(folder) / f"random_states_{accelerator.process_index}.pkl"
    if not rng_file.exists():
        accelerator.print(f"warning: {rng_file.name} is not in {folder} (saved with fewer processes?): "
                          "random streams restart, so this resume is not bit-exact")
        return
    load(rng_file)


def load_checkpoint(accelerator, folder: Path, ema=None) -> TrainState:
    state = read_state(folder)
    try:
        check_rng_file(accelerator, folder)
        accelerator.load_state(str(folder))
        if ema is not None and not load_ema(ema, folder):
            ema.module.load_state_dict(accelerator.unwrap_model(accelerator._models[0]).state_dict())
            accelerator.print(f"note: {folder} has no EMA weights; the EMA starts from its weights")
    except Exception as error:  # safetensors/pickle/shape errors all mean the same thing here
        raise CheckpointError(f"checkpoint {folder} cannot be loaded: {type(error).__name__}: {error}") from None
    return state


def restore(accelerator, resume: str, run_dir: Path, ema=None) -> tuple[TrainState, Path | None]:
    """resume=none: fresh state. auto: the newest loadable checkpoint of this run (older ones are
    tried when the newest is damaged), fresh if there is none. PATH: that checkpoint or an error."""
    if resume == "none":
        return TrainState(), None
    if resume != "auto":
        folder = Path(resume)
        if not folder.is_dir():
            raise CheckpointError(f"resume={resume}: no checkpoint folder there")
        return load_checkpoint(accelerator, folder, ema), folder
    for folder in reversed(list_checkpoints(checkpoint_dir(run_dir))):
        try:
            return load_checkpoint(accelerator, folder, ema), folder
        except CheckpointError as error:
            accelerator.print(f"warning: skipping damaged checkpoint: {error}")
    return TrainState(), None
