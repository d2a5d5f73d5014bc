"""How a run ran: precision, processes, device, loader and library versions.

Recorded in summary.json, the final table and the W&B run config, so two runs can be compared and
a result reproduced (mixed precision comes from the Accelerate config, which no run file keeps).
"""
from __future__ import annotations

import importlib.metadata
import platform

import torch

LIBRARIES = {"torch": "torch", "torchvision": "torchvision", "timm": "timm", "accelerate": "accelerate",
             "dali": "nvidia-dali-cuda130", "ffcv": "ffcv", "wandb": "wandb"}


def version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None  # an optional loader that is not installed


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def describe(accelerator, cfg) -> dict:
    return {
        "precision": {"no": "fp32"}.get(str(accelerator.mixed_precision), str(accelerator.mixed_precision)),
        "processes": accelerator.num_processes,
        "device": device_name(accelerator.device),
        "loader": cfg.loader,
        "compile": bool(cfg.compile),
        "python": platform.python_version(),
        **{name: version(distribution) for name, distribution in LIBRARIES.items()},
    }


def summary_line(environment: dict) -> str:
    """One line for the final table: the libraries a result depends on."""
    return ", ".join(f"{name} {environment[name]}" for name in ("torch", "timm", "accelerate", "dali", "ffcv")
                     if environment.get(name))
