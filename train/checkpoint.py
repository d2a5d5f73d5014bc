"""Checkpoints: Accelerate's save_state (model as safetensors, optimizer, grad scaler, per-rank RNG)
plus our progress (train_state.json) and the resolved config, written atomically.

    <output_dir>/checkpoints/epoch_0003/   one folder per save (step_00001234/ for mid-epoch saves)
    <output_dir>/checkpoints/last  → newest   best → best val top-1   (relative symlinks)

A save goes to a hidden temporary folder that is renamed into place when every rank is done, so a
crash mid-save leaves the previous checkpoints intact; only renamed folders count as checkpoints.
"""
from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from safetensors.torch import load_file

from models.export import NonFiniteWeights, non_finite_names, refuse_non_finite
from models.factory import create_model, refused_pickle
from common.errors import UserInputError
from train.config import schema
from train.ema import load_ema, save_ema
from train.faults import any_process
from train.resume_rules import ResumeMismatch, check_same_run

STATE_FILE = "train_state.json"


class CheckpointError(UserInputError):
    pass


@dataclass
class TrainState:
    epoch: int = 0  # current epoch (0-based); == cfg.epochs when training is done
    batch: int = 0  # batches of `epoch` already consumed (mid-epoch resume)
    step: int = 0  # optimizer steps so far
    best_top1: float = -1.0
    best_epoch: int = 0  # the epoch (1-based) of best_top1; 0 → none yet
    train_images: int = 0  # images trained on, all processes
    train_seconds: float = 0.0
    steady_images: int = 0  # the same without each epoch's first logging window (start-up)
    steady_seconds: float = 0.0
    steady_wait_seconds: float = 0.0  # of steady_seconds, spent waiting for the loader
    processes: int = 0  # processes that trained it (0: not recorded); a resume must use as many
    # False: an epoch's training saved before its validation; a resume validates it first
    validated: bool = True
    metrics_lines: int = -1  # lines of metrics.jsonl when it was saved (-1: not recorded); a resume drops later ones


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


def refuse_non_finite_state(accelerator, name: str, ema=None) -> None:
    """NonFiniteWeights on every process if a process's model, EMA or optimizer state is not finite."""
    tensors = {}
    for model in accelerator._models:
        tensors.update({f"model {k}": v for k, v in accelerator.unwrap_model(model).state_dict().items()})
    if ema is not None:
        tensors.update({f"ema {k}": v for k, v in ema.module.state_dict().items()})
    for optimizer in accelerator._optimizers:
        for index, per_param in optimizer.state_dict()["state"].items():
            tensors.update({f"optimizer {index}.{k}": v for k, v in per_param.items() if torch.is_tensor(v)})
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
        return OmegaConf.load(Path(folder) / "config.yaml"), classes
    except (OSError, ValueError, OmegaConfBaseException) as error:
        raise CheckpointError(f"checkpoint {folder} is unreadable: {type(error).__name__}: {error}") from None


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
        check_same_run(OmegaConf.load(run_dir / "config.yaml"), cfg, where=f"output_dir {run_dir}")


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
        return OmegaConf.load(run_dir / "config.yaml") if cfg.resume == "auto" and holds_run(run_dir) else None
    except (OSError, OmegaConfBaseException):
        return None


def restore(accelerator, cfg, run_dir: Path, classes: list[str], ema=None) -> tuple[TrainState, Path | None]:
    """resume=none: a fresh run. PATH: that checkpoint, or an error. auto: the newest loadable
    checkpoint of this run (older ones are tried when the newest is damaged), a fresh run if it has
    none, an error if none loads. Each is first checked by check_resume."""
    check_resume(accelerator, cfg, run_dir, classes)
    if cfg.resume == "none":
        return TrainState(), None
    if cfg.resume != "auto":
        return load_checkpoint(accelerator, Path(cfg.resume), ema), Path(cfg.resume)
    checkpoints = list_checkpoints(checkpoint_dir(run_dir))
    problems = []
    for folder in reversed(checkpoints):
        try:
            check_matches(accelerator, folder, cfg, classes)
            return load_checkpoint(accelerator, folder, ema), folder
        except CheckpointError as error:
            accelerator.print(f"warning: skipping damaged checkpoint: {error}")
            problems.append(str(error))
    if not checkpoints:
        return TrainState(), None
    raise CheckpointError(f"none of the {len(checkpoints)} checkpoints in {checkpoint_dir(run_dir)} can be loaded "
                          f"(newest: {problems[0]}); resume=PATH picks one, or give a new output_dir for a new run")


# ---------------------------------------------------------------------------------------------
# Reading a checkpoint's model outside training (export, evaluation)

def checkpoint_folder(folder: Path) -> Path:
    """A checkpoint folder itself, or a run folder's (or its checkpoints/ folder's) best, else last."""
    for candidate in (folder, folder / "best", folder / "last",
                      folder / "checkpoints" / "best", folder / "checkpoints" / "last"):
        if (candidate / "model.safetensors").is_file():
            return candidate
    raise UserInputError(f"{folder} is neither a checkpoint folder (no model.safetensors) nor a run folder "
                         f"with checkpoints/best or checkpoints/last")


def load_checkpoint_model(folder: Path):
    """(model, cfg, classes) rebuilt from a checkpoint folder, weights loaded strictly."""
    folder = Path(folder)
    try:
        cfg = OmegaConf.merge(schema(), OmegaConf.load(folder / "config.yaml"))
        classes = json.loads((folder / "classes.json").read_text())
        state = load_file(str(folder / "model.safetensors"))
    except Exception as error:  # missing file, bad YAML/JSON, truncated safetensors
        raise CheckpointError(f"checkpoint {folder} is unreadable: {type(error).__name__}: {error}") from None
    dual = any(".main." in key for key in state)
    model = create_model(OmegaConf.merge(cfg, {"pretrained_path": ""}), len(classes), dual_norm=dual)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError:
        raise CheckpointError(f"checkpoint {folder}: {weights_mismatch(model.state_dict(), state, cfg, classes)}"
                              ) from None
    return model.eval(), cfg, classes


def weights_mismatch(expected: dict, saved: dict, cfg, classes: list[str]) -> str:
    """One line: how the saved weights differ from the model that config.yaml and classes.json describe."""
    missing = [k for k in expected if k not in saved]
    unexpected = [k for k in saved if k not in expected]
    shapes = [f"{k} {tuple(saved[k].shape)} vs {tuple(expected[k].shape)}" for k in expected
              if k in saved and saved[k].shape != expected[k].shape]
    parts = [f"{len(names)} {what} (e.g. {names[0]})" for names, what in (
        (missing, "tensors of the model missing"), (unexpected, "unexpected tensors"),
        (shapes, "of another shape (saved vs model)")) if names]
    return (f"model.safetensors does not hold the model its config.yaml and classes.json describe ({cfg.model}, "
            f"{len(classes)} classes): {', '.join(parts)}. The files come from different runs: copy the whole "
            f"checkpoint folder from one run")
