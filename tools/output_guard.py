"""The tools' promise about their output: it never overwrites what they read, nor a checkpoint,
and replaces an existing file (or model export folder) only when asked (--overwrite). Checked
before anything is written."""
from __future__ import annotations

from pathlib import Path

from common.errors import UserInputError
from models.hub import is_export_folder


def check_output_file(out: Path, *, inputs: list[Path], overwrite: bool, example: str,
                      beside: tuple[str, ...] = ()) -> None:
    """Refuse `out` (and its sidecars out+suffix for suffix in beside) when it is a folder (the
    message suggests `example` inside it), lies inside one of `inputs` or inside a checkpoint
    folder, or exists and `overwrite` is False."""
    if out.is_dir():
        raise UserInputError(f"output {out} is a folder: give the path of the file to write (e.g. {out / example})")
    check_outside(out, inputs)
    for path in [out, *(Path(f"{out}{suffix}") for suffix in beside)]:
        if path.exists() and not overwrite:
            raise UserInputError(f"output {path} exists; pass --overwrite to replace it")


def check_output_folder(out: Path, *, inputs: list[Path], overwrite: bool) -> None:
    """Refuse `out` for a model export (a folder, models/export.py) when it names a weights file or is
    a file, is a folder that is not an export (--overwrite never removes one), lies inside one of
    `inputs` or inside a checkpoint folder, or is an export and `overwrite` is False."""
    check_outside(out, inputs)
    if out.suffix in (".safetensors", ".pth", ".pt", ".bin"):
        raise UserInputError(f"output {out} names a weights file: an export is a folder (timm's Hub layout: "
                             f"config.json, model.safetensors, README.md); give a folder, e.g. {out.with_suffix('')}")
    if out.exists() and not out.is_dir():
        raise UserInputError(f"output {out} is a file: an export is a folder; give a new folder's path")
    if out.is_dir() and not is_export_folder(out):
        raise UserInputError(f"output {out} is a folder that is not a model export (no config.json and "
                             f"model.safetensors): give a new folder's path, e.g. {out / 'model'}")
    if out.exists() and not overwrite:
        raise UserInputError(f"output {out} exists; pass --overwrite to replace it")


def check_outside(out: Path, inputs: list[Path]) -> None:
    """out lies neither inside one of `inputs` nor inside a checkpoint folder."""
    target = out.resolve()
    for source in inputs:
        real = Path(source).resolve()
        if target == real or real in target.parents:
            raise UserInputError(f"output {out} is inside the input {source}: it would change what is being "
                                 f"read; write it outside {source}")
    if (target.parent / "train_state.json").exists():
        raise UserInputError(f"output {out} is inside the checkpoint folder {out.parent}: it would change the "
                             f"checkpoint; write it elsewhere")
