"""Loader backends: one record each (Backend, record.py), registered here by name.

    torchvision   PIL decoding in DataLoader workers: folders, local and streamed shards
    ffcv          .beton files (converted from a folder or shards once) read by ffcv's JIT pipeline
    dali          NVIDIA DALI: nvJPEG on CUDA, CPU threads otherwise; folders and local shards

A new backend is a folder here: its record (record.py: name, options and checks, what may change
on resume, install hint, libraries, benchmark case) and the module it names, whose make_loader
reads a source (pipelines/sources/) in pipelines/sampling.py's order; list its record in BUILT_IN
(or call register(record) from your own code before load_config). `loader=NAME` then selects it,
`data.NAME.<option>=…` sets its options, and validation, resume rules, the environment report and
tools/bench_loaders.py follow from the record.
"""
from __future__ import annotations

import importlib
from types import ModuleType

from common.errors import UserInputError
from common.registry import add_record
from pipelines.backends.dali.record import BACKEND as DALI
from pipelines.backends.ffcv.record import BACKEND as FFCV
from pipelines.backends.record import Backend
from pipelines.backends.torchvision.record import BACKEND as TORCHVISION

BUILT_IN = (TORCHVISION, FFCV, DALI)
BACKENDS: dict[str, Backend] = {}


def register(backend: Backend) -> Backend:
    """Make a backend selectable by `loader=<name>` (a name already taken is an error)."""
    return add_record(BACKENDS, backend, "a backend")


def backend_of(cfg) -> Backend:
    if cfg.loader not in BACKENDS:
        raise ValueError(f"loader={cfg.loader!r} is unknown; choose one of {sorted(BACKENDS)}")
    return BACKENDS[cfg.loader]


def implementation(backend: Backend) -> ModuleType:
    """The backend's module; a missing optional package (DALI, FFCV) is one clear error."""
    try:
        return importlib.import_module(backend.module)
    except ImportError as error:
        raise UserInputError(f"loader={backend.name} is not available here ({error}). {backend.install_hint}") from error


for built_in in BUILT_IN:
    register(built_in)

__all__ = ["BACKENDS", "BUILT_IN", "Backend", "backend_of", "implementation", "register"]
