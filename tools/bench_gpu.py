#!/usr/bin/env python
"""The GPU table for your card in one command: step-cost ratios, loader speeds, one recipe epoch
eager and compiled, and the gpu-marked tests, with the card, driver, torch, CUDA and DALI versions.

    python tools/bench_gpu.py                                  # everything (~15 min on an H100)
    python tools/bench_gpu.py --only steps loaders_small       # some parts (names below)
    python tools/bench_gpu.py --dry-run --out /tmp/dry         # every part on the CPU, tiny sizes

Prints the table at the end and writes it to OUT/table.md (default runs/bench_gpu), the raw
figures to OUT/results.json and each part's log to OUT/work/. Parts, in the order they run; each
is a subprocess with its own time limit; a part that fails or runs out of time is reported, not
fatal; one the --budget no longer holds is "not run":
  versions        python, torch, CUDA, cuDNN, driver, card, DALI, FFCV, timm, ... (this process)
  photos          the photo JPEG sets (1,800 and 18,000), built once under --cache-dir by all cores
  effnet_epoch_compiled  train/run.py configs/effnet_b0_advprop.yaml, loader=dali (nvJPEG, AutoAugment v0 on
                  the GPU), one epoch of the 1,800 photos, compile=true; runs in the background from here on
                  (a cold compile is CPU work) while the untimed parts below run, and is waited for
                  before the first timed part
  effnet_epoch    the same, eager
  tests           pytest -m gpu over every file with gpu-marked tests (outcomes per test: JUnit XML)
  steps           tools/bench_step.py, ResNet-50, batch 256, 224 px, bf16, channels-last, eager: every
                  method × vanilla, vanilla img/s, one attack step
  effnet          the same for EfficientNet-B0 (advprop PGD-1/5, fast_advprop)
  loaders_small, loaders_large, loaders_small_v0, loaders_large_v0
                  tools/bench_loaders.py, 1,800 and 18,000 photos, 16 workers, RandomResizedCrop-224
                  (+ AutoAugment v0) to the GPU, torchvision and DALI
  train           train/run.py vanilla ResNet-50, loader=dali, 18,000 photos, bf16: steady img/s
  steps_host_check  advprop PGD-1 with the host-side non-finite check (a device→host sync per step)
  compiled        tools/bench_step.py --compile (compile=true): ratios and compile time
  effnet_compiled the same for EfficientNet-B0
--dry-run runs every part on this CPU with tiny models (timm's test_resnet/test_efficientnet), a
few photos, one or two epochs, DALI's CPU pipeline (the EfficientNet epochs without v0: see DRY)
and compile switched off (TORCH_COMPILE_DISABLE): a wrong path, flag or key fails there, not
after the GPU parts before it. tests/test_bench_gpu.py checks every planned command without running it.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from common.exit_status import run_entry_point
from tools.gpu_table import table, tests_outcome
from tools.output_guard import check_output_folder

REPO = Path(__file__).resolve().parents[1]

PY = sys.executable
STEP_METHODS = "advprop_pgd1,advprop_pgd5,fast_advprop"


@dataclass(frozen=True)
class Sizes:
    device: str
    amp: str
    resnet: str
    effnet: str
    batch: int
    size: int
    photos: tuple[int, int]
    workers: int
    loader_batch: int
    loader_epochs: int
    step_timing: list[str] = field(default_factory=list)  # bench_step's warm-up/rounds/steps (and methods)
    train: list[str] = field(default_factory=list)  # train/run.py vanilla ResNet-50 overrides
    effnet_epoch: list[str] = field(default_factory=list)  # the EfficientNet-B0 recipe's overrides
    env: dict = field(default_factory=dict)


FULL = Sizes(device="cuda", amp="bf16", resnet="resnet50", effnet="efficientnet_b0", batch=256, size=224,
             photos=(1800, 18000), workers=16, loader_batch=64, loader_epochs=3,
             train=["batch_size=256", "epochs=3", "log_every=10", "data.dali.threads=8"],
             effnet_epoch=["log_every=10"])
DRY = Sizes(device="cpu", amp="no", resnet="test_resnet", effnet="test_efficientnet", batch=8, size=32,
            photos=(96, 192), workers=2, loader_batch=16, loader_epochs=2,
            step_timing=["--warmup", "1", "--rounds", "1", "--steps", "1", "--methods", STEP_METHODS],
            train=["model=test_resnet", "batch_size=16", "epochs=1", "log_every=3", "data.image_size=32",
                   "data.dali.threads=2"],
            # without v0: its numba kernels cost a minute per process on a busy 2-core machine, and the
            # recipe with v0 on the DALI CPU pipeline is tests/test_dali_auto_augment.py's
            effnet_epoch=["model=test_efficientnet", "batch_size=16", "log_every=2", "data.image_size=64",
                          "data.dali.threads=2", "data.workers=2", "data.auto_augment=''"],
            env={"TORCH_COMPILE_DISABLE": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"})


@dataclass
class Part:
    name: str
    command: list[str]
    timeout: int  # seconds, at most
    needs: int = 20  # seconds it takes at the least: with less budget left it is not started
    result: str = "json"  # json: the log's last JSON line | summary: the run folder's summary.json | tests
    run_dir: Path | None = None


def photo_set(cache: Path, count: int) -> Path:
    return cache / f"photos-{count}"


def plan(sizes: Sizes, work: Path, cache: Path) -> list[Part]:
    """Every part but versions and photos, in running order."""
    small, large = sizes.photos
    step = [PY, "tools/bench_step.py", "--device", sizes.device, "--amp", sizes.amp, "--batch", str(sizes.batch),
            "--size", str(sizes.size), "--json", *sizes.step_timing]
    resnet, effnet = step + ["--model", sizes.resnet], step + ["--model", sizes.effnet, "--methods", STEP_METHODS]
    launch = [PY, "-m", "accelerate.commands.launch", "--num_processes", "1", "--mixed_precision", sizes.amp,
              "--dynamo_backend", "no", "train/run.py"]

    def run_on(photos: Path, run_dir: Path, *overrides: str) -> list[str]:
        return launch + [f"data.root={photos.parent}", f"data.train_dir={photos.name}", f"data.val_dir={photos.name}",
                         "eval_robust=false", "tracker=none", "resume=none", "image_log_every=0",
                         f"output_dir={run_dir}", *overrides]

    def effnet_epoch(name: str, compile_: bool) -> Part:
        run_dir = work / name
        command = run_on(photo_set(cache, small), run_dir, "config=configs/effnet_b0_advprop.yaml", "loader=dali",
                         "epochs=1", f"compile={str(compile_).lower()}", *sizes.effnet_epoch)
        return Part(name, command, 420 if compile_ else 150, 120 if compile_ else 30, "summary", run_dir)

    def loaders(count: int, policy: str) -> Part:
        epochs = sizes.loader_epochs if count == small else 2  # the large set: one timed epoch is enough
        command = [PY, "tools/bench_loaders.py", "--data", str(photo_set(cache, count)), "--workers",
                   str(sizes.workers), "--backends", "torchvision", "dali", "--epochs", str(epochs), "--batch-size",
                   str(sizes.loader_batch), "--cache-dir", str(cache), "--device", sizes.device, "--json"]
        return Part(f"loaders_{'small' if count == small else 'large'}" + (f"_{policy}" if policy else ""),
                    command + (["--auto-augment", policy] if policy else []), 180, 20)

    tests = sorted(str(path.relative_to(REPO)) for path in (REPO / "tests").glob("test_*.py")
                   if "mark.gpu" in path.read_text())
    train_dir = work / "train_run"
    return [
        effnet_epoch("effnet_epoch_compiled", True),
        effnet_epoch("effnet_epoch", False),
        Part("tests", [PY, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                       "--continue-on-collection-errors", f"--junitxml={work / 'tests.xml'}", *tests], 240, 60, "tests"),
        Part("steps", resnet, 150, 40),
        Part("effnet", effnet, 120, 30),
        loaders(small, ""), loaders(large, ""), loaders(small, "v0"), loaders(large, "v0"),
        Part("train", run_on(photo_set(cache, large), train_dir, "config=configs/resnet50_vanilla.yaml", "loader=dali",
                             *sizes.train), 180, 40, "summary", train_dir),
        Part("steps_host_check", resnet + ["--methods", "advprop_pgd1", "--nonfinite-check", "host"], 90, 20),
        Part("compiled", resnet + ["--compile", "--methods", STEP_METHODS], 420, 150),
        Part("effnet_compiled", effnet + ["--compile"], 420, 150),
    ]


BACKGROUND = {"effnet_epoch_compiled"}  # runs beside the untimed parts, joined before the timed ones
UNTIMED = {"effnet_epoch", "tests"}


class Session:
    """Runs parts within a deadline; keeps results.json and table.md in out current."""

    def __init__(self, out: Path, work: Path, deadline: float, env: dict, dry_run: bool, wanted: set[str]):
        self.out, self.work, self.deadline, self.dry_run, self.wanted = out, work, deadline, dry_run, wanted
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline", **env}
        self.results: dict = {"dry_run": dry_run, "parts": {}}
        self.running: dict[str, tuple[Part, subprocess.Popen, float, float]] = {}

    def start(self, part: Part) -> None:
        timeout = part.timeout * (3 if self.dry_run else 1)  # a dry run may share 2 cores with others
        limit = min(timeout, self.deadline - time.time() - 5)
        if limit < part.needs and not self.dry_run:
            self.record(part.name, f"not run (out of time: needs ~{part.needs} s)", 0.0)
            return
        if limit < 10:
            self.record(part.name, "not run (out of time)", 0.0)
            return
        print(f"[{part.name}] {' '.join(part.command)}  (limit {limit:.0f} s)", flush=True)
        log = open(self.work / f"{part.name}.log", "w")
        process = subprocess.Popen(part.command, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)  # its own group: a timeout ends its children too
        log.close()
        self.running[part.name] = (part, process, time.time(), limit)

    def finish(self, name: str) -> None:
        if name not in self.running:
            return
        part, process, started, limit = self.running.pop(name)
        try:
            code = process.wait(timeout=max(1.0, started + limit - time.time()))
            status = "ok" if code == 0 else f"failed (exit {code})"
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            status = f"timed out after {limit:.0f} s"
        log = (self.work / f"{name}.log").read_text(errors="replace")
        self.results[name] = self.parse(part, log)
        if status == "ok" and part.result == "summary":
            status = self.check_run(part, log)
        self.record(name, status, time.time() - started)

    def parse(self, part: Part, log: str):
        if part.result == "tests":
            return tests_outcome(self.work / "tests.xml")
        if part.result == "summary":
            summary = part.run_dir / "summary.json"
            return json.loads(summary.read_text()) if summary.is_file() else None
        lines = [line for line in log.splitlines() if line.startswith("{")]
        return json.loads(lines[-1]) if lines else None

    def check_run(self, part: Part, log: str) -> str:
        """A run that exited 0 but trained eagerly where it was told to compile has failed."""
        if "compile=true" in part.command and not self.dry_run and "training eagerly" in log:
            return "failed (compile=true fell back to eager)"
        if self.results.get(part.name) is None:
            return "failed (no summary.json)"
        if "compile=true" in part.command:  # graphs compiled in the epoch (metrics.jsonl)
            metrics = [json.loads(line) for line in (part.run_dir / "metrics.jsonl").read_text().splitlines()]
            self.results[part.name]["compile_graphs"] = next(
                (m["compile/graphs"] for m in metrics if "compile/graphs" in m), None)
        return "ok"

    def record(self, name: str, status: str, seconds: float) -> None:
        self.results["parts"][name] = {"status": status, "seconds": round(seconds, 1)}
        print(f"[{name}] {status} in {seconds:.0f} s", flush=True)
        self.save()

    def save(self) -> None:
        (self.out / "results.json").write_text(json.dumps(self.results, indent=1, default=str))
        (self.out / "table.md").write_text(table(self.results) + "\n")


def versions() -> dict:
    """What the measurements ran on; a package that does not import says why."""
    import importlib
    import importlib.metadata
    import platform

    import torch
    found = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
             "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
             "card": torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"}
    try:
        found["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                         capture_output=True, text=True, timeout=30).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):  # no nvidia-smi on the PATH: the kernel module says it
        version = Path("/proc/driver/nvidia/version")
        found["driver"] = version.read_text().splitlines()[0].strip() if version.is_file() else None
    distributions = {"nvidia.dali": "nvidia-dali-cuda130", "ffcv": "ffcv", "timm": "timm", "accelerate": "accelerate",
                     "triton": "triton", "numpy": "numpy", "PIL": "pillow", "numba": "numba", "omegaconf": "omegaconf"}
    for name, distribution in distributions.items():
        try:
            module = importlib.import_module(name)
        except Exception as error:  # noqa: BLE001 (a missing or broken package is a finding, not a crash)
            found[name] = f"not importable ({type(error).__name__}: {str(error).splitlines()[0][:120]})"
            continue
        try:  # the installed distribution's version (ffcv 1.0.2 calls itself 0.0.3rc1)
            found[name] = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:  # carried as files (DALI)
            found[name] = getattr(module, "__version__", "installed")
    return found


def build_photos(session: Session, cache: Path, counts: tuple[int, ...]) -> None:
    from pipelines.sources.offline.photos import build_photo_imagefolder
    started = time.time()
    try:
        for count in counts:
            build_photo_imagefolder(photo_set(cache, count), count=count)
        status = "ok"
    except Exception as error:  # noqa: BLE001
        status = f"failed ({type(error).__name__}: {error})"
    session.record("photos", status, time.time() - started)


def run_parts(session: Session, parts: list[Part], cache: Path, sizes: Sizes) -> None:
    if "photos" in session.wanted:
        build_photos(session, cache, sizes.photos)
    for part in parts:
        if part.name not in session.wanted:
            continue
        if part.name not in BACKGROUND | UNTIMED:  # timings from here on: nothing else may run
            for name in list(session.running):
                session.finish(name)
        session.start(part)
        if part.name not in BACKGROUND:
            session.finish(part.name)
    for name in list(session.running):
        session.finish(name)


PART_NAMES = ["versions", "photos"] + [p.name for p in plan(DRY, Path("."), Path("."))]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/bench_gpu"), help="results.json and table.md")
    parser.add_argument("--work", type=Path, help="each part's log and run folder (default: OUT/work)")
    parser.add_argument("--cache-dir", type=Path, default=Path("data/bench"), help="photo sets (built once)")
    parser.add_argument("--only", nargs="+", choices=PART_NAMES, default=PART_NAMES)
    parser.add_argument("--budget", type=float, default=3600, help="seconds for everything; later parts are not run")
    parser.add_argument("--dry-run", action="store_true", help="every part on the CPU with tiny sizes")
    args = parser.parse_args(argv)
    sizes = DRY if args.dry_run else FULL
    for folder in (args.out, args.work or args.out / "work", args.cache_dir):  # before any part runs
        check_output_folder(folder)
    work = (args.work or args.out / "work").resolve()
    for folder in (args.out, work):
        folder.mkdir(parents=True, exist_ok=True)
    session = Session(args.out, work, time.time() + args.budget, sizes.env, args.dry_run, set(args.only))
    if "versions" in session.wanted:
        session.results["versions"] = versions()
        session.record("versions", "ok", 0.0)
    cache = args.cache_dir.resolve()
    run_parts(session, plan(sizes, work, cache), cache, sizes)
    print(table(session.results))
    return 0


if __name__ == "__main__":
    sys.exit(run_entry_point(main, sys.argv[1:]))
