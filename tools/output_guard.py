"""The tools' promise about their output: it never overwrites what they read, nor a checkpoint,
and replaces an existing file only when asked (--overwrite). Checked before anything is written."""
from __future__ import annotations

from pathlib import Path

from common.errors import UserInputError


def check_output_file(out: Path, *, inputs: list[Path], overwrite: bool, example: str,
                      beside: tuple[str, ...] = ()) -> None:
    """Refuse `out` (and its sidecars out+suffix for suffix in beside) when it is a folder (the
    message suggests `example` inside it), lies inside one of `inputs` or inside a checkpoint
    folder, or exists and `overwrite` is False."""
    if out.is_dir():
        raise UserInputError(f"output {out} is a folder: give the path of the file to write (e.g. {out / example})")
    target = out.resolve()
    for source in inputs:
        real = Path(source).resolve()
        if target == real or real in target.parents:
            raise UserInputError(f"output {out} is inside the input {source}: it would change what is being "
                                 f"read; write it outside {source}")
    if (target.parent / "train_state.json").exists():
        raise UserInputError(f"output {out} is inside the checkpoint folder {out.parent}: it would change the "
                             f"checkpoint; write it elsewhere")
    for path in [out, *(Path(f"{out}{suffix}") for suffix in beside)]:
        if path.exists() and not overwrite:
            raise UserInputError(f"output {path} exists; pass --overwrite to replace it")
