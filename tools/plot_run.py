#!/usr/bin/env python
"""One PNG of a training run, without W&B: losses, val top-1 (main and aux norms), robust top-1,
learning rate, throughput and data wait, from the run's metrics.jsonl and any evaluate.py --json
files in its folder. train/run.py writes the same picture at the end of every run.

    python tools/plot_run.py runs/demo                      # → runs/demo/run.png
    python tools/plot_run.py runs/demo --out demo.png
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.exit_status import run_entry_point
from tools.output_guard import check_output_file
from train.run_plot import PLOT_FILE, plot_run


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a run folder (output_dir of train/run.py)")
    parser.add_argument("--out", type=Path, help=f"PNG to write (default: RUN/{PLOT_FILE})")
    args = parser.parse_args(argv)
    check_output_file(args.out or args.run / PLOT_FILE, inputs=[args.run / "metrics.jsonl"], overwrite=True,
                      example=PLOT_FILE)
    print(f"wrote {plot_run(args.run, args.out)}")  # a folder that is no run: FileNotFoundError, exit 2
    return 0


if __name__ == "__main__":
    sys.exit(run_entry_point(main, sys.argv[1:]))
