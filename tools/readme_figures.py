#!/usr/bin/env python
"""The README's measured figures, each rewritten from the command that measures it.

A figure lives in README.md between two markers, with the command, date and machine under it:

    <!-- figures:demo -->
    (what the command printed, as the figure renders it)
    <sub>`python tools/readme_figures.py demo` runs `COMMAND` · 2026-12-02 · MACHINE</sub>
    <!-- /figures -->

    python tools/readme_figures.py demo             # run the demo figure's command, rewrite its block
    python tools/readme_figures.py demo --note "machine shared with other jobs"
    python tools/readme_figures.py --check          # no command run: every block known, dated, shaped as now
    python tools/readme_figures.py --list

--check fails (exit 1, one line per problem) where a block names no known figure, appears twice,
lacks its command/date/machine line, or differs in structure from what the code prints now (for
the demo: the table's row names, numbers aside). A new figure is one FIGURES entry: its command
(run from the repository root; {tmp} is a fresh temporary folder) and a render that turns the
command's output into the block's text, e.g. `markdown_table` for a tool's --markdown output.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REPO_ROOT = Path(__file__).resolve().parents[1]
README = REPO_ROOT / "README.md"
BLOCK = re.compile(r"<!-- figures:(?P<name>[\w-]+) -->\n(?P<body>.*?)<!-- /figures -->", re.S)
FOOTER = re.compile(r"^<sub>`python tools/readme_figures.py (?P<name>[\w-]+)` runs `(?P<command>[^`]+)` · "
                    r"(?P<date>\d{4}-\d{2}-\d{2}) · (?P<machine>[^<]+)</sub>$", re.M)


@dataclass(frozen=True)
class Figure:
    name: str
    command: tuple[str, ...]  # argv from the repository root; "{tmp}" → a fresh temporary folder
    render: Callable[[str], str]  # the command's stdout → the block's text (no footer)
    shape: Callable[[str], list[str]]  # a block's text → its structure (names, not numbers)
    expected_shape: Callable[[], list[str]] | None = None  # the structure the code gives now; None: not checked
    shown: str = ""  # the command as the README's reader would type it (default: command)
    env: tuple[tuple[str, str], ...] = ()  # set for the command, on top of this process's environment


# ---------------------------------------------------------------------------------------------
# renders and shapes

def fenced(text: str) -> str:
    return f"```\n{text.strip()}\n```\n"


def final_table(stdout: str) -> str:
    """train/run.py's closing table: from its `result  value` header to its last row."""
    lines = stdout.splitlines()
    start = next((i for i, line in enumerate(lines) if re.match(r"result\s+value$", line)), None)
    if start is None:
        raise ValueError("the command printed no final table (no `result  value` line)")
    end = next((i for i in range(start + 2, len(lines)) if not lines[i].strip() or lines[i].startswith("plot of")),
               len(lines))
    return fenced("\n".join(lines[start:end]))


def table_names(text: str) -> list[str]:
    """The row names of a fenced two-column table (columns apart by two spaces or more)."""
    rows = [line for line in text.splitlines() if line.strip() and not line.startswith(("```", "---"))]
    return [re.split(r"\s{2,}", row.strip())[0] for row in rows]


def markdown_table(stdout: str) -> str:
    """A tool's --markdown output: its table lines (those starting with `|`), and nothing else."""
    rows = [line for line in stdout.splitlines() if line.startswith("|")]
    if not rows:
        raise ValueError("the command printed no markdown table")
    return "\n".join(rows) + "\n"


def markdown_names(text: str) -> list[str]:
    """A markdown table's header cells and first column: its structure, without the figures."""
    rows = [line for line in text.splitlines() if line.startswith("|") and not set(line) <= set("|-: ")]
    return ([cell.strip() for cell in rows[0].strip("|").split("|")] + [row.strip("|").split("|")[0].strip()
                                                                          for row in rows[1:]]) if rows else []


def demo_table_names() -> list[str]:
    """The row names train/run.py's table has for the README's demo (configs/demo.yaml) today."""
    from train.attacks import describe
    from train.config import load_config
    from train.summary import robust_attack, table_rows

    cfg = load_config(["tracker=none"])
    report = {"clean_top1": 0.0, "clean_top5": 0.0, "val_images": 0, "images_left_out": {"train": 0, "val": 0},
              "train_seconds": 0.0, "train_img_per_s": 0.0, "steady_img_per_s": 0.0, "data_wait_fraction": 0.0,
              "environment": {"precision": "", "processes": 1, "device": "", "loader": "", "compile": False}}
    if cfg.eval_robust and robust_attack(cfg).steps > 0:
        report.update(robust_top1=0.0, robust_attack=describe(robust_attack(cfg))[1])
    return ["result"] + [name for name, _ in table_rows(cfg, report)]


LOADER_HEADER = ["backend", "1 worker", "2 workers", "× torchvision (2)"]


def loader_table(stdout: str) -> str:
    """tools/bench_loaders.py --workers 1 2 --json: img/s per backend and worker count, and the
    ratio to torchvision at 2 workers, all from the one run."""
    summary = json.loads(stdout.strip().splitlines()[-1])
    speed = {(r["backend"], r["workers"]): r for r in summary["runs"] if r["source"] == "folder"}
    lines = ["| " + " | ".join(LOADER_HEADER) + " |", "|---|---|---|---|"]
    for backend in dict.fromkeys(r["backend"] for r in summary["runs"]):
        one, two = speed.get((backend, 1)), speed.get((backend, 2))
        ratio = f"{two['ratio']:.2f}" if two and "ratio" in two else "–"
        lines.append(f"| {next(r['label'] for r in summary['runs'] if r['backend'] == backend)} | "
                     + " | ".join(f"{r['img_s']:,.0f} img/s" if r else "–" for r in (one, two)) + f" | {ratio} |")
    return "\n".join(lines) + "\n"


def loader_table_names() -> list[str]:
    """The table's names: each backend's label (its record's) under the benchmark's defaults."""
    from pipelines.backends import BACKENDS
    from train.config import load_config

    cfg = load_config(["tracker=none"])
    return LOADER_HEADER + [backend.label(cfg) for backend in BACKENDS.values()]


DUAL_NORMS_SWEEP = REPO_ROOT / "configs" / "sweeps" / "dual_norms.yaml"


def dual_norms_table(stdout: str) -> str:
    """compare_methods.py --json over configs/sweeps/dual_norms.yaml (runs MODEL-METHOD): clean top-1
    and training seconds, one row per model, one column per method."""
    results = json.loads(stdout.strip().splitlines()[-1])
    cells = {tuple(name.split("-", 1)): f"{r['clean_top1']:.1f} %, {r['train_seconds']:.0f} s"
             for name, r in results.items()}
    models, methods = dict.fromkeys(m for m, _ in cells), dict.fromkeys(k for _, k in cells)
    lines = ["| model | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    lines += [f"| `{model}` | " + " | ".join(cells.get((model, method), "–") for method in methods) + " |"
              for model in models]
    return "\n".join(lines) + "\n"


def dual_norms_names() -> list[str]:
    import yaml

    pairs = [name.split("-", 1) for name in yaml.safe_load(DUAL_NORMS_SWEEP.read_text())["runs"]]
    return (["model"] + list(dict.fromkeys(method for _, method in pairs))
            + [f"`{model}`" for model in dict.fromkeys(model for model, _ in pairs)])


FIGURES = {figure.name: figure for figure in (
    Figure("demo", ("accelerate", "launch", "--config_file", "accelerate_config.yaml", "train/run.py",
                    "output_dir={tmp}/demo"),
           render=final_table, shape=table_names, expected_shape=demo_table_names,
           shown="accelerate launch --config_file accelerate_config.yaml train/run.py"),
    Figure("loaders", (sys.executable, "tools/bench_loaders.py", "--workers", "1", "2", "--json", "--cache-dir",
                       "{tmp}/bench"),
           render=loader_table, shape=markdown_names, expected_shape=loader_table_names,
           shown="python tools/bench_loaders.py --workers 1 2 --json"),
    Figure("dual_norms", (sys.executable, "tools/compare_methods.py", "--sweep", str(DUAL_NORMS_SWEEP), "--out",
                          "{tmp}/dual_norms", "--json", "tracker=none"),
           render=dual_norms_table, shape=markdown_names, expected_shape=dual_norms_names,
           shown="OMP_NUM_THREADS=1 python tools/compare_methods.py --sweep configs/sweeps/dual_norms.yaml --json "
                 "tracker=none", env=(("OMP_NUM_THREADS", "1"),)),
)}


# ---------------------------------------------------------------------------------------------
# the README's blocks

def blocks(text: str) -> list[re.Match]:
    return list(BLOCK.finditer(text))


def check(text: str, figures: dict[str, Figure] = FIGURES) -> list[str]:
    """One line per problem of the figure blocks in `text`; [] where all is well."""
    problems, seen = [], set()
    opening, closing = (len(re.findall(pattern, text, re.M)) for pattern in (r"^<!-- figures:", r"^<!-- /figures -->"))
    if opening != len(blocks(text)) or closing != len(blocks(text)):  # markers start their line
        problems.append("a figures marker is not closed (or a closing marker has no opening)")
    for block in blocks(text):
        name, body = block["name"], block["body"]
        if name in seen:
            problems.append(f"figure {name}: in two places (one place per figure)")
        seen.add(name)
        figure = figures.get(name)
        if figure is None:
            problems.append(f"figure {name}: not one of {sorted(figures)}")
            continue
        footer = FOOTER.search(body)
        if footer is None or footer["name"] != name:
            problems.append(f"figure {name}: no line `<sub>`python tools/readme_figures.py {name}` runs `…` · "
                            f"DATE · MACHINE</sub>` (rerun: python tools/readme_figures.py {name})")
            continue
        if figure.expected_shape is not None:
            have, want = figure.shape(body[:footer.start()]), figure.expected_shape()
            if have != want:
                extra, missing = [n for n in have if n not in want], [n for n in want if n not in have]
                problems.append(f"figure {name}: its structure is not what the code prints now (only in the README: "
                                f"{extra or 'none'}; only in the code: {missing or 'none'}{'; order differs' if not extra and not missing else ''}): "
                                f"rerun python tools/readme_figures.py {name}")
    return problems


def machine(note: str = "", load: bool = True) -> str:
    """CPU model, cores, the load when the measurement started (load=True), and the caller's note."""
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor() or platform.machine()) \
        if Path("/proc/cpuinfo").is_file() else platform.machine()
    load = f", load {os.getloadavg()[0]:.1f} at the start" if load and hasattr(os, "getloadavg") else ""
    return f"{model}, {os.cpu_count()} cores{load}" + (f"; {note}" if note else "")


def measure(figure: Figure, note: str = "", cwd: Path = REPO_ROOT, saved_output: Path | None = None) -> str:
    """Run the figure's command (or read its saved stdout); the block's new text with its footer."""
    if saved_output is not None:
        return block_text(figure, saved_output.read_text(), machine(note, load=False))
    where = machine(note)
    with tempfile.TemporaryDirectory(prefix=f"readme-{figure.name}-") as tmp:
        argv = [part.replace("{tmp}", tmp) for part in figure.command]
        result = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, env={**os.environ, **dict(figure.env)})
    if result.returncode != 0:
        raise RuntimeError(f"figure {figure.name}: `{' '.join(argv)}` exited {result.returncode}:\n"
                           f"{result.stderr[-2000:]}")
    return block_text(figure, result.stdout, where)


def block_text(figure: Figure, stdout: str, where: str) -> str:
    shown = figure.shown or " ".join(figure.command)
    return (f"{figure.render(stdout)}<sub>`python tools/readme_figures.py {figure.name}` runs `{shown}` · "
            f"{datetime.date.today().isoformat()} · {where}</sub>\n")


def replace_block(text: str, name: str, body: str) -> str:
    matches = [block for block in blocks(text) if block["name"] == name]
    if len(matches) != 1:
        raise ValueError(f"figure {name}: the README has {len(matches)} blocks <!-- figures:{name} --> (needs one)")
    block = matches[0]
    return text[:block.start("body")] + body + text[block.end("body"):]


def write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="figures to measure again and rewrite")
    parser.add_argument("--check", action="store_true", help="check every block without running a command")
    parser.add_argument("--list", action="store_true", help="the figures and their commands")
    parser.add_argument("--note", default="", help="said beside the machine (e.g. 'shared with other jobs')")
    parser.add_argument("--from", dest="saved_output", type=Path,
                        help="one figure: render it from this saved stdout of its command (run today, here)")
    parser.add_argument("--readme", type=Path, default=README)
    args = parser.parse_args(argv)
    if args.list:
        for figure in FIGURES.values():
            print(f"{figure.name}: {figure.shown or ' '.join(figure.command)}")
        return 0
    unknown = [name for name in args.names if name not in FIGURES]
    if unknown or not (args.names or args.check) or (args.saved_output and len(args.names) != 1):
        print(f"error: name figures of {sorted(FIGURES)} (one with --from) or give --check", file=sys.stderr)
        return 2
    for name in args.names:
        try:
            body = measure(FIGURES[name], args.note, saved_output=args.saved_output)
            text = replace_block(args.readme.read_text(), name, body)  # read now: it may have been edited meanwhile
        except (ValueError, RuntimeError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        write_atomically(args.readme, text)  # each figure kept as soon as it is measured
        print(f"rewrote figure {name} in {args.readme}")
    text = args.readme.read_text()
    problems = check(text) if args.check else []
    for problem in problems:
        print(f"error: {args.readme}: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
