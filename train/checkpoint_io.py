"""Checkpoint files: Accelerate's save_state (model as safetensors, optimizer, grad scaler, per-rank RNG)
plus our progress (train_state.json, train/run_state.py) and the resolved config, written atomically.

    <output_dir>/checkpoints/epoch_0003/   one folder per save (step_00001234/ for mid-epoch saves)
    <output_dir>/checkpoints/last  → newest   best → best val top-1   (relative symlinks)

A save goes to a hidden temporary folder that is renamed into place when every rank is done, so a
crash mid-save leaves the previous checkpoints intact; only renamed folders count as checkpoints.
Which checkpoint a run continues from is train/resume.py's.
"""
from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from models.export import NonFiniteWeights, non_finite_names, refuse_non_finite
from models.factory import refused_pickle
from train.config import read_saved_config
from train.ema import load_ema, save_ema
from train.faults import any_process
from train.run_state import STATE_FILE, CheckpointError, TrainState, read_state


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(accelerator, run_dir: Path, name: str, state: TrainState, cfg, classes: list[str], *,
                    is_best: bool, keep: int, ema=None) -> Path:
    """Every process must call this (each writes its RNG state). Weights or optimizer state with a
    NaN or an infinity are refused (NonFiniteWeights) before anything is written."""
    refuse_non_finite_state(accelerator, name, ema)
    root = checkpoint_dir(run_dir)
    final, staging = root / name, root / f".tmp-{name}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(staging))
        if accelerator.is_main_process:
            (staging / STATE_FILE).write_text(json.dumps(asdict(state), indent=1))
            (staging / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
            (staging / "classes.json").write_text(json.dumps(classes))
            if ema is not None:
                save_ema(ema, staging)
    except Exception as error:  # torch reports a full disk as "basic_ios::clear: iostream error"
        shutil.rmtree(staging, ignore_errors=True)  # a partial save must not keep the disk full
        raise disk_full_error(root, error, checkpoint_bytes(accelerator, ema)) or error
    if accelerator.is_main_process:
        _replace_dir(staging, final)
        _point(root / "last", name)
        if is_best:
            _point(root / "best", name)
        _prune(root, keep)
    accelerator.wait_for_everyone()
    return final


def training_tensors(accelerator, ema=None) -> dict[str, torch.Tensor]:
    """What a checkpoint holds of this process: model, EMA and optimizer state, by name."""
    tensors = {}
    for model in accelerator._models:
        tensors.update({f"model {k}": v for k, v in accelerator.unwrap_model(model).state_dict().items()})
    if ema is not None:
        tensors.update({f"ema {k}": v for k, v in ema.module.state_dict().items()})
    for optimizer in accelerator._optimizers:
        for index, per_param in optimizer.state_dict()["state"].items():
            tensors.update({f"optimizer {index}.{k}": v for k, v in per_param.items() if torch.is_tensor(v)})
    return tensors


def refuse_non_finite_state(accelerator, name: str, ema=None) -> None:
    """NonFiniteWeights on every process if a process's model, EMA or optimizer state is not finite."""
    tensors = training_tensors(accelerator, ema)
    bad = non_finite_names(tensors)
    if any_process(bool(bad), accelerator):
        refuse_non_finite(tensors, f"checkpoint {name} (the previous checkpoints are intact)")
        raise NonFiniteWeights(f"not writing checkpoint {name}: another process holds non-finite values")


def mark_validated(accelerator, run_dir: Path, name: str, state: TrainState, *, is_best: bool, keep: int) -> bool:
    """After the validation of checkpoint `name` (saved with validated=False): record it (and the best
    top-1) in its train_state.json, atomically, and point `best` at it if it is the best. False where
    the checkpoint is not in this run folder (a resume=PATH from elsewhere): the caller saves anew."""
    root = checkpoint_dir(run_dir)
    folder = root / name
    if not (folder / STATE_FILE).is_file():
        return False
    if accelerator.is_main_process:
        temporary = folder / f".{STATE_FILE}.tmp"
        temporary.write_text(json.dumps(asdict(state), indent=1))
        os.replace(temporary, folder / STATE_FILE)
        if is_best:
            _point(root / "best", name)
            _prune(root, keep)
    accelerator.wait_for_everyone()
    return True


class DiskFull(RuntimeError):
    """A checkpoint did not fit on its disk; the previous checkpoints are intact."""
    exit_code = 4


def checkpoint_bytes(accelerator, ema=None) -> int:
    """About what a checkpoint takes: the model's, the optimizer's and the EMA's tensors."""
    tensors = [t for model in accelerator._models for t in model.state_dict().values()]
    for optimizer in accelerator._optimizers:
        tensors += [t for group in optimizer.state_dict()["state"].values() for t in group.values()
                    if torch.is_tensor(t)]
    if ema is not None:
        tensors += list(ema.module.state_dict().values())
    return sum(t.numel() * t.element_size() for t in tensors)


def mount_point(path: Path) -> Path:
    path = path.resolve()
    while not os.path.ismount(path):
        path = path.parent
    return path


def disk_full_error(root: Path, error: Exception, needed: int) -> DiskFull | None:
    """A DiskFull naming the disk and the space needed, if `error` came from a full disk."""
    free = shutil.disk_usage(root).free
    if getattr(error, "errno", None) != errno.ENOSPC and free >= needed:
        return None
    return DiskFull(f"no space left on {mount_point(root)} (writing {root}): a checkpoint needs about "
                    f"{needed / 2**20:.0f} MB, {free / 2**20:.0f} MB are free. The partial save was removed and "
                    f"the previous checkpoints are intact: free some space (or lower keep_checkpoints) and rerun "
                    f"the same command to continue")


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
    except pickle.UnpicklingError as error:
        raise CheckpointError(f"checkpoint {folder} cannot be loaded: {refused_pickle_file(folder, error)}") from None
    except Exception as error:  # safetensors/shape errors all mean the same thing here
        raise CheckpointError(f"checkpoint {folder} cannot be loaded: {type(error).__name__}: {error}") from None
    return state


def refused_pickle_file(folder: Path, error: Exception) -> str:
    """Which of the checkpoint's pickles torch.load(weights_only=True) refused, and why."""
    from accelerate.utils import load

    culprit = "a file"
    for candidate in sorted(Path(folder).glob("*.bin")) + sorted(Path(folder).glob("*.pkl")):
        try:
            load(candidate)
        except pickle.UnpicklingError:
            culprit = candidate.name
            break
    return (f"{culprit} {refused_pickle(error)}. A checkpoint this trainer wrote holds none: this one was "
            f"altered; resume from another checkpoint (resume=PATH) or a trusted copy")


def read_run_settings(folder: Path) -> tuple[DictConfig, list[str] | None]:
    """The config (and classes, where saved) a checkpoint or run folder was made with."""
    try:
        classes_file = Path(folder) / "classes.json"
        classes = json.loads(classes_file.read_text()) if classes_file.exists() else None
        return read_saved_config(Path(folder) / "config.yaml"), classes
    except (OSError, ValueError, OmegaConfBaseException) as error:
        raise CheckpointError(f"checkpoint {folder} is unreadable: {type(error).__name__}: {error}") from None
