"""How a run ran: precision, processes, device, CPU threads, loader and library versions.

Recorded in summary.json, the final table and the W&B run config, so two runs can be compared and
a result reproduced (mixed precision comes from the Accelerate config, which no run file keeps).
On a CPU the run also chooses its threads (use_cpu_threads).
"""
from __future__ import annotations

import importlib.metadata
import os
import platform

import psutil
import torch
from accelerate.utils import get_int_from_env

from pipelines.backends import BACKENDS

LIBRARIES = {"torch": "torch", "torchvision": "torchvision", "timm": "timm", "accelerate": "accelerate"}
TRACKING = {"wandb": "wandb"}


def libraries() -> dict[str, str]:
    """Name → distribution of every library a result depends on: ours, then each loader backend's
    (its record's), then the tracker."""
    backends = {name: distribution for _, backend in sorted(BACKENDS.items())
                for name, distribution in backend.libraries.items()}
    return {**LIBRARIES, **backends, **TRACKING}


def version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None  # an optional loader that is not installed


# Where launchers say how many processes run on this machine (torchrun, then MPI's): Accelerate's list.
LOCAL_PROCESSES = ["LOCAL_WORLD_SIZE", "MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "MV2_COMM_WORLD_LOCAL_SIZE"]


def chosen_threads() -> int | None:
    """OMP_NUM_THREADS when the user chose it; None when unset or set by `accelerate launch` alone.

    The launcher exports OMP_NUM_THREADS to the script: its own environment's value, else its
    --num_cpu_threads_per_process, else 1 (cores ÷ processes only with use_cpu, which a config that
    also serves GPUs cannot set). So a 1 that the launcher (our parent) was not given is its default.
    """
    value = os.environ.get("OMP_NUM_THREADS", "")
    if not value.isdigit() or int(value) < 1:
        return None
    if value == "1" and "ACCELERATE_MIXED_PRECISION" in os.environ:  # started by `accelerate launch`
        try:
            launcher = psutil.Process().parent()
            told = "OMP_NUM_THREADS" in launcher.environ() or any(
                arg.startswith("--num_cpu_threads_per_process") for arg in launcher.cmdline())
        except (psutil.Error, AttributeError):  # no parent to ask: keep what we were given
            told = True
        if not told:
            return None
    return int(value)


def use_cpu_threads(device: torch.device) -> int:
    """On a CPU, torch's threads: the user's OMP_NUM_THREADS, else the cores shared among this
    machine's processes (no oversubscription). Set after the loaders are built: importing ffcv and
    building its Loader set torch's threads (to 1, then to data.workers). GPUs: left as they are."""
    if device.type == "cpu":
        cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
        if hasattr(os, "sched_getaffinity"):  # a container or taskset may allow fewer
            cores = min(cores, len(os.sched_getaffinity(0)))
        torch.set_num_threads(chosen_threads() or max(1, cores // get_int_from_env(LOCAL_PROCESSES, 1)))
    return torch.get_num_threads()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def describe(accelerator, cfg) -> dict:
    return {
        "precision": {"no": "fp32"}.get(str(accelerator.mixed_precision), str(accelerator.mixed_precision)),
        "processes": accelerator.num_processes,
        "device": device_name(accelerator.device),
        "cpu_threads": torch.get_num_threads(),
        "loader": cfg.loader,
        "compile": bool(cfg.compile),
        "python": platform.python_version(),
        **{name: version(distribution) for name, distribution in libraries().items()},
    }


def summary_line(environment: dict) -> str:
    """One line for the final table: the libraries a result depends on."""
    names = [name for name in libraries() if name not in ("torchvision", *TRACKING)]
    return ", ".join(f"{name} {environment[name]}" for name in names if environment.get(name))
