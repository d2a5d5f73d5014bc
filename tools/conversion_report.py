"""What the converters (tools/convert_ffcv.py, tools/convert_wds.py) do when they end: the exit
status of a conversion that could not run or was stopped, and the line saying what was written."""
from __future__ import annotations

import sys
from pathlib import Path



def run_conversion(convert, out: Path) -> dict | int:
    """convert()'s summary; or, for a stopped conversion, the exit status, its reason printed: 128 + N
    for signal N (pipelines/atomic_files.py raises SIGTERM/SIGHUP as SystemExit), 130 for Ctrl-C.
    An input that cannot give one raises UserInputError (ConversionError): one line, exit 2, nothing written."""
    try:
        return convert()
    except (KeyboardInterrupt, SystemExit) as stop:
        print(f"stopped: nothing written to {out}", file=sys.stderr)
        return stop.code if isinstance(stop, SystemExit) else 130


def summary_line(summary: dict, skipped_list: Path) -> str:
    """found …, written …, skipped … (and what else was not written, where it is listed), size."""
    others = f", {summary['non_images']} files without an image extension ignored" if summary["non_images"] else ""
    duplicates = f", {summary['duplicates']} duplicate paths (symlinks) ignored" if summary["duplicates"] else ""
    listed = f" (listed in {skipped_list})" if summary["skipped"] + summary["non_images"] + summary["duplicates"] else ""
    return (f"found {summary['found']}, written {summary['written']}, skipped {summary['skipped']}{others}{duplicates}"
            f"{listed}, {summary['bytes'] / 2**20:.1f} MiB in {summary['seconds']:.1f} s")
