#!/usr/bin/env python
"""The measured figures of the README and the documentation site, each rewritten from the command
that measures it.

A figure lives in one page (README.md or docs/*.md) between two markers, with the command, date
and machine under it:

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

The README's summary is a derived figure (DERIVED): no command of its own, its table is made from
the blocks it summarises (each row names the command that measured it), and --check fails where it
no longer says what they say (`python tools/readme_figures.py summary` rewrites it).
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

from common.errors import UserInputError
from common.exit_status import run_entry_point
from tools.output_guard import check_output_file

REPO_ROOT = Path(__file__).resolve().parents[1]
README = REPO_ROOT / "README.md"


def pages(root: Path = REPO_ROOT) -> list[Path]:
    """The pages figures may live in: the README and the documentation site's."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]
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
    from train.attacks import attack_steps, describe
    from train.config import load_config
    from train.summary import robust_attack, table_rows

    cfg = load_config(["tracker=none"])
    report = {"clean_top1": 0.0, "clean_top5": 0.0, "val_images": 0, "images_left_out": {"train": 0, "val": 0},
              "train_seconds": 0.0, "train_img_per_s": 0.0, "steady_img_per_s": 0.0, "data_wait_fraction": 0.0,
              "environment": {"precision": "", "processes": 1, "device": "", "loader": "", "compile": False}}
    if cfg.eval_robust and attack_steps(robust_attack(cfg)) > 0:
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


def markdown_header(text: str) -> list[str]:
    """A markdown table's header cells and its target row's name (its other rows are dated runs)."""
    names = markdown_names(text)
    return [name for name in names if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", name)]


def steps_names() -> list[str]:
    from tools.bench_step import bench_cases

    figures = [name for name in bench_cases() if name != "vanilla"] + ["attack_step"]
    return ["date", "machine", "torch", "vanilla img/s", *figures, "target"]


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
    Figure("steps", (sys.executable, "tools/bench_step.py", "--threads", "1", "--clock", "process", "--markdown",
                     "--rounds", "5"),
           render=markdown_table, shape=markdown_header, expected_shape=steps_names,
           shown="python tools/bench_step.py --threads 1 --clock process --markdown --rounds 5"),
)}


# ---------------------------------------------------------------------------------------------
# the README's summary: derived from the blocks above, not measured again

def demo_row(body: str) -> list[str]:
    rows = dict(re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in body.splitlines()
                if re.match(r"(clean top-1 \(main|robust top-1|train time|device)", line))
    robust = next((value for name, value in rows.items() if name.startswith("robust")), "–")
    attack = next((name[len("robust top-1 ("):-1] for name in rows if name.startswith("robust")), "")
    return ["the demo: ResNet-18 AdvProp on the digits, 8 epochs, " + rows.get("device", "?"),
            f"clean top-1 {rows.get('clean top-1 (main norms)', '?')}, {attack} {robust}, "
            f"{rows.get('train time', '?')}"]


def table_cells(body: str) -> dict[tuple[str, str], str]:
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in body.splitlines()
            if line.startswith("|") and not set(line) <= set("|-: ")]
    return {(row[0], head): cell for row in rows[1:] for head, cell in zip(rows[0], row)}


def summary_table(bodies: dict[str, str]) -> str:
    """The README's one table: the demo's result, the step-cost ratios, the loader ratios, each
    with the command that measured it and the page its block is on."""
    footer = {name: FOOTER.search(body) for name, body in bodies.items()}
    steps = table_cells(bodies["steps"][:footer["steps"].start()])
    measured = next(date for date, _ in steps if re.fullmatch(r"\d{4}-\d{2}-\d{2}", date))
    loaders = table_cells(bodies["loaders"][:footer["loaders"].start()])
    ffcv = next(name for name, _ in loaders if name.startswith("FFCV"))
    dali = next(name for name, _ in loaders if name.startswith("DALI"))
    demo = demo_row(bodies["demo"][:footer["demo"].start()])
    lines = ["| measured | result | command (page) |", "|---|---|---|",
             f"| {demo[0]} | {demo[1]} | `{footer['demo']['command']}` ([the demo](docs/index.md#the-demo)) |",
             f"| step cost × vanilla, CPU (resnet18, 96 px): advprop PGD-1 / PGD-5, fast_advprop, one attack step "
             f"| {steps[measured, 'advprop_pgd1']} / {steps[measured, 'advprop_pgd5']}, "
             f"{steps[measured, 'fast_advprop']}, {steps[measured, 'attack_step']} "
             f"| `{footer['steps']['command']}` ([speed](docs/speed.md)) |",
             f"| loader speed ÷ torchvision, 2 CPU workers: FFCV / DALI | {loaders[ffcv, '× torchvision (2)']} / "
             f"{loaders[dali, '× torchvision (2)']} | `{footer['loaders']['command']}` ([speed](docs/speed.md)) |"]
    return "\n".join(lines) + "\n"


DERIVED = {"summary": (("demo", "steps", "loaders"), summary_table)}


# ---------------------------------------------------------------------------------------------
# the pages' blocks

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
        if name in DERIVED and figures is FIGURES:
            problems += check_derived(name, body, text)
            continue
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
                problems.append(f"figure {name}: its structure is not what the code prints now (only in the page: "
                                f"{extra or 'none'}; only in the code: {missing or 'none'}{'; order differs' if not extra and not missing else ''}): "
                                f"rerun python tools/readme_figures.py {name}")
    return problems


def check_derived(name: str, body: str, text: str) -> list[str]:
    sources, derive = DERIVED[name]
    bodies = {block["name"]: block["body"] for block in blocks(text)}
    missing = [source for source in sources if source not in bodies or not FOOTER.search(bodies[source])]
    if missing:
        return [f"figure {name}: summarises {missing}, which have no measured block"]
    if body != derive(bodies):
        return [f"figure {name}: no longer says what the blocks it summarises ({', '.join(sources)}) say: "
                f"rerun python tools/readme_figures.py {name}"]
    return []


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
        raise ValueError(f"figure {name}: the page has {len(matches)} blocks <!-- figures:{name} --> (needs one)")
    block = matches[0]
    return text[:block.start("body")] + body + text[block.end("body"):]


def write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def all_pages_text(paths: list[Path]) -> str:
    return "\n".join(path.read_text() for path in paths)


def page_of(name: str, paths: list[Path]) -> Path:
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        raise ValueError(f"page {', '.join(missing)} does not exist")
    holding = [path for path in paths if any(block["name"] == name for block in blocks(path.read_text()))]
    if len(holding) != 1:
        raise ValueError(f"figure {name}: {len(holding)} pages hold a block <!-- figures:{name} --> (needs one)")
    return holding[0]


def rewrite(name: str, paths: list[Path], note: str, saved_output: Path | None) -> Path:
    """Measure figure `name` again (a derived one: from the blocks now) and rewrite its block."""
    if name in DERIVED:
        text = all_pages_text(paths)
        body = DERIVED[name][1]({block["name"]: block["body"] for block in blocks(text)})
    else:
        body = measure(FIGURES[name], note, saved_output=saved_output)
    page = page_of(name, paths)
    write_atomically(page, replace_block(page.read_text(), name, body))  # read now: it may have been edited
    return page


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="figures to measure again and rewrite")
    parser.add_argument("--check", action="store_true", help="check every block without running a command")
    parser.add_argument("--list", action="store_true", help="the figures and their commands")
    parser.add_argument("--note", default="", help="said beside the machine (e.g. 'shared with other jobs')")
    parser.add_argument("--from", dest="saved_output", type=Path,
                        help="one figure: render it from this saved stdout of its command (run today, here)")
    parser.add_argument("--pages", type=Path, nargs="+", default=pages(),
                        help="the pages holding the blocks (default: README.md and docs/*.md)")
    args = parser.parse_args(argv)
    if args.list:
        for figure in FIGURES.values():
            print(f"{figure.name}: {figure.shown or ' '.join(figure.command)}")
        for name, (sources, _) in DERIVED.items():
            print(f"{name}: derived from {', '.join(sources)}")
        return 0
    known = {*FIGURES, *DERIVED}
    unknown = [name for name in args.names if name not in known]
    if unknown or not (args.names or args.check) or (args.saved_output and len(args.names) != 1):
        print(f"error: name figures of {sorted(known)} (one with --from) or give --check", file=sys.stderr)
        return 2
    if args.names:  # before measuring: a figure whose page cannot be rewritten is not measured
        for page in args.pages:
            check_output_file(page, overwrite=True, example="README.md")
        try:
            [page_of(name, args.pages) for name in args.names]
        except ValueError as error:
            raise UserInputError(str(error)) from None
    for name in sorted(args.names, key=lambda n: n in DERIVED):  # a summary after what it summarises
        try:
            page = rewrite(name, args.pages, args.note, args.saved_output)
        except (ValueError, RuntimeError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        print(f"rewrote figure {name} in {page}")  # each figure kept as soon as it is measured
    problems = check(all_pages_text(args.pages)) if args.check else []
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(run_entry_point(main, sys.argv[1:]))
