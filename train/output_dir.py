"""The output_dir can hold the run: checked before any work, so a folder that is a file, a
read-only disk or a pseudo-filesystem (/proc) is one error line, not a traceback after the model
and the data were built (or, for wandb/, after training started)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from common.errors import UserInputError


class OutputDirUnusable(UserInputError):
    pass


def cannot_create_in(folder: Path) -> str | None:
    """Why no file can be created in folder (None: one can). Creates and removes a hidden empty file:
    permission bits do not say it for root, nor for a read-only mount, /proc or a full quota."""
    try:
        descriptor, name = tempfile.mkstemp(dir=folder, prefix=".write-test-")
    except OSError as error:
        return error.strerror or type(error).__name__
    os.close(descriptor)
    os.unlink(name)
    return None


def deepest_existing(path: Path) -> Path:
    """path, or the deepest of its parents that exists (what a mkdir of path would create in)."""
    existing = Path(path)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return existing


def output_dir_problem(run_dir: Path, tracker: str) -> str | None:
    """One line saying why the run cannot write run_dir (or the parts of it that exist), or None."""
    run_dir = Path(run_dir)
    existing = deepest_existing(run_dir)
    if not existing.is_dir():
        return f"output_dir {run_dir}: {existing} is a file, not a folder; give a folder path"
    if existing != run_dir:
        problem = cannot_create_in(existing)
        if problem:
            return f"output_dir {run_dir} cannot be created in {existing} ({problem}); give a folder on a writable disk"
        return None
    parts = [run_dir, run_dir / "checkpoints", run_dir / "panels"] + ([run_dir / "wandb"] if tracker == "wandb" else [])
    for folder in parts:
        if folder.exists() and not folder.is_dir():
            return f"output_dir {run_dir}: {folder} is a file where the run keeps a folder; move it away"
        problem = folder.is_dir() and cannot_create_in(folder)
        if problem:
            hint = "; make it writable, or set tracker=none" if folder.name == "wandb" else "; make it writable"
            return f"output_dir {run_dir}: cannot write in {folder} ({problem}){hint}"
    for name in ("config.yaml", "metrics.jsonl", "wandb_id.txt"):
        if (run_dir / name).exists() and not os.access(run_dir / name, os.W_OK):
            return f"output_dir {run_dir}: {name} is read-only; make it writable"
    return None


def check_output_dir(accelerator, run_dir: Path, tracker: str) -> None:
    """OutputDirUnusable on every process if the main process finds run_dir unusable."""
    from train.distributed import main_process_decides

    problem = main_process_decides(accelerator, lambda: output_dir_problem(run_dir, tracker))
    if problem:
        raise OutputDirUnusable(problem)
