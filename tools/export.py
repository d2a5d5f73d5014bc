#!/usr/bin/env python
"""Export a training checkpoint as plain timm weights (main BNs only, safetensors).

    python tools/export.py runs/demo/checkpoints/best runs/demo/best_main_bn.safetensors

The output loads with `timm.create_model(name, num_classes=n).load_state_dict(..., strict=True)`
and gives the trained model's eval logits for inputs normalised as the file's metadata says
(train/run.py also writes <output_dir>/final_main_bn.safetensors at the end of every run).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.export import export_settings, load_checkpoint_model, save_main_bn  # noqa: E402
from train.errors import UserInputError  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="a checkpoint folder (e.g. runs/demo/checkpoints/last)")
    parser.add_argument("out", type=Path, help="output .safetensors file")
    args = parser.parse_args()
    model, cfg, classes = load_checkpoint_model(args.checkpoint)
    save_main_bn(model.net, args.out, **export_settings(cfg, classes))
    print(f"wrote {args.out}: {cfg.model}, {len(classes)} classes, normalization={cfg.normalization}")


if __name__ == "__main__":
    try:
        main()
    except UserInputError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
