#!/usr/bin/env python
"""Export a training checkpoint as plain timm weights (main norms only, safetensors).

    python tools/export.py runs/demo runs/demo/best_main_norm.safetensors           # the run's best checkpoint
    python tools/export.py runs/demo/checkpoints/epoch_0004 epoch4.safetensors    # a given checkpoint

The output loads with `timm.create_model(name, num_classes=n).load_state_dict(..., strict=True)`
and gives the trained model's eval logits for inputs normalised as the file's metadata says
(train/run.py also writes <output_dir>/final_main_norm.safetensors at the end of every run).
OUT is never written inside the checkpoint (or any checkpoint folder), nor over a folder; an
existing OUT is replaced only with --overwrite; a missing folder of OUT is made. All of it is checked
before the checkpoint is loaded (tools/output_guard.py: a folder on /proc, behind a symlink loop or
under a file is refused). Exit 2 with one line when it cannot export, 3 when the checkpoint's
weights hold a NaN or an infinity (nothing is written).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.errors import UserInputError
from common.exit_status import run_entry_point
from models.export import export_settings, save_main_norm
from tools.output_guard import check_output_file
from train.model_loading import checkpoint_folder, load_checkpoint_model


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path,
                        help="a run folder (its checkpoints/best, else last) or a checkpoint folder")
    parser.add_argument("out", type=Path, help="output .safetensors file")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    args = parser.parse_args(argv)
    if not args.checkpoint.is_dir():
        raise UserInputError(f"{args.checkpoint} is a file, not a folder: give a run or checkpoint folder"
                             if args.checkpoint.exists() else f"{args.checkpoint} does not exist")
    folder = checkpoint_folder(args.checkpoint)
    check_output_file(args.out, inputs=[folder], overwrite=args.overwrite, example="model_main_norm.safetensors")
    model, cfg, classes = load_checkpoint_model(folder)
    save_main_norm(model.net, args.out, **export_settings(cfg, classes))
    print(f"wrote {args.out} from {folder}: {cfg.model}, {len(classes)} classes, normalization={cfg.normalization}")


if __name__ == "__main__":
    sys.exit(run_entry_point(main, sys.argv[1:]))
