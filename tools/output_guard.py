"""Every tool's promise about its output, checked before its work starts (so no evaluation,
conversion or benchmark is thrown away at the end): the path can be written (its folder exists
or can be created, on a disk that takes files: not /proc, not through a symlink loop), it never
overwrites what the tool reads nor a checkpoint, and an existing file (or model export folder) is
replaced only when asked (--overwrite). One line (UserInputError, exit 2) naming the path and the
problem, nothing written.
"""
from __future__ import annotations

import os
from pathlib import Path

from common.errors import UserInputError
from models.hub import is_export_folder
from train.output_dir import cannot_create_in, deepest_existing


def folder_problem(folder: Path) -> str | None:
    """Why no file can be written in folder, made where missing (None: one can)."""
    existing = deepest_existing(folder)
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    problem = cannot_create_in(existing)
    if problem and existing != folder:
        return f"{folder} cannot be created in {existing} ({problem}); give a path on a writable disk"
    return f"cannot write in {folder} ({problem})" if problem else None


def real_path(out: Path) -> Path:
    """out with its links followed, or one line for a symlink loop (Python 3.11 raises RuntimeError)."""
    try:
        return Path(out).resolve()
    except (OSError, RuntimeError):
        raise UserInputError(f"output {out} cannot be reached: a symlink loop (a link that leads back to "
                             f"itself) is on its path; give another path") from None


def refuse_inputs_and_checkpoints(out: Path, target: Path, inputs) -> None:
    """out (resolved: target) must not be, nor lie inside, an input or a checkpoint folder."""
    for source in inputs:
        real = real_path(Path(source))
        if target == real or real in target.parents:
            raise UserInputError(f"output {out} is inside the input {source}: it would change what is being "
                                 f"read; write it outside {source}")
    for folder in (target, *target.parents):
        if (folder / "train_state.json").exists():
            raise UserInputError(f"output {out} is inside the checkpoint folder {folder}: it would change the "
                                 f"checkpoint; write it elsewhere")


def check_output_file(out: Path, *, inputs=(), overwrite: bool, example: str, beside: tuple[str, ...] = ()) -> None:
    """Refuse `out` (and its sidecars out+suffix for suffix in beside) when it is a folder (the
    message suggests `example` inside it), cannot be written (its folder, created where missing),
    lies inside one of `inputs` or a checkpoint folder, or exists and `overwrite` is False."""
    out = Path(out)
    target = real_path(out)
    if target.is_dir():
        raise UserInputError(f"output {out} is a folder: give the path of the file to write (e.g. {out / example})")
    problem = folder_problem(target.parent)
    if problem:
        raise UserInputError(f"output {out}: {problem}")
    refuse_inputs_and_checkpoints(out, target, inputs)
    for path in [out, *(Path(f"{out}{suffix}") for suffix in beside)]:
        if path.exists() and not overwrite:
            raise UserInputError(f"output {path} exists; pass --overwrite to replace it")
        if path.exists() and not os.access(path, os.W_OK):
            raise UserInputError(f"output {path} exists and is read-only; make it writable or write elsewhere")


def check_output_folder(out: Path, *, inputs=()) -> None:
    """Refuse the folder `out` (made where missing) when it is a file, cannot hold new files, or lies
    inside one of `inputs` or a checkpoint folder."""
    out = Path(out)
    target = real_path(out)
    if target.exists() and not target.is_dir():
        raise UserInputError(f"output {out} is a file: give a folder")
    problem = folder_problem(target)
    if problem:
        raise UserInputError(f"output {out}: {problem}")
    refuse_inputs_and_checkpoints(out, target, inputs)


def check_export_folder(out: Path, *, inputs=(), overwrite: bool) -> None:
    """Refuse `out` for a model export (a folder in timm's Hub layout, models/export.py) when it names
    a weights file or is a file, cannot be made, is a folder that is not an export (--overwrite never
    removes one), lies inside one of `inputs` or a checkpoint folder, or is an export and `overwrite`
    is False."""
    out = Path(out)
    target = real_path(out)
    refuse_inputs_and_checkpoints(out, target, inputs)
    if out.suffix in (".safetensors", ".pth", ".pt", ".bin"):
        raise UserInputError(f"output {out} names a weights file: an export is a folder (timm's Hub layout: "
                             f"config.json, model.safetensors, README.md); give a folder, e.g. {out.with_suffix('')}")
    if target.exists() and not target.is_dir():
        raise UserInputError(f"output {out} is a file: an export is a folder; give a new folder's path")
    if target.is_dir() and not is_export_folder(target):
        raise UserInputError(f"output {out} is a folder that is not a model export (no config.json and "
                             f"model.safetensors): give a new folder's path, e.g. {out / 'model'}")
    problem = folder_problem(target.parent)
    if problem:
        raise UserInputError(f"output {out}: {problem}")
    if target.exists() and not overwrite:
        raise UserInputError(f"output {out} exists; pass --overwrite to replace it")
