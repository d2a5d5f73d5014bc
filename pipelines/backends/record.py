"""What a loader backend is, in one record (Backend), as a training method is one (train/methods/).

A backend turns a source (pipelines/sources/: a folder, local shards, streamed shards) into device
batches (pipelines/batches.py's contract), in the order of pipelines/sampling.py, replacing what
fails mid-run as pipelines/substitution.py says. Its record is light: it names the module that
does the work, imported only when the backend is used, so a backend whose libraries are not
installed still configures, validates and says how to install them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

Check = tuple[bool, str, str]  # (holds, config key, what is wrong when it does not)


def no_checks(cfg) -> list[Check]:
    return []


def no_bench_overrides(cfg, folder: Path, cache_dir: Path) -> list[str]:
    return []


@dataclass(frozen=True)
class Backend:
    """Everything the trainer needs to know about a backend; pipelines/loading.py (building and
    preparing), train/config.py (schema), train/config_checks.py (validation), train/resume_rules.py,
    train/environment.py, train/model_export.py, tools/bench_loaders.py and tools/readme_figures.py read it.

    name             the config's `loader=` value
    module           the module doing the work, imported on first use (its optional libraries with
                     it: an ImportError is one clear error with install_hint). It defines
                     make_loader(cfg, split, source, *, rank, world_size, device) → a Loader, and
                     may define prepare(cfg): one-time work after the sources' (FFCV converts)
    install_hint     how to install what it needs
    options          the dataclass of its own config node, cfg.data.<name> (None: none)
    checks           cfg → [(holds, key, problem)]: its node's values (always), and what it needs of
                     the rest of the config (when it is the loader)
    may_change       config keys that may change when a run is continued (how fast the data is read,
                     not what is learnt): usually its node, "data.<name>"
    libraries        {name: distribution}: versions recorded in the run's environment report
    decodes_files    it decodes a folder's files while training: the up-front image check applies
    reads_sources    make_loader gets the split's source; False: it reads what prepare made (None given)
    streams          it reads remote shards, streamed
    auto_augment     it applies data.auto_augment
    bench_overrides  (cfg, folder, cache_dir) → what tools/bench_loaders.py adds to its config
    bench_label      cfg → its row's name in the loader table (tools/readme_figures.py)
    val_resize       timm's name for how it resizes val images (an export's pretrained_cfg
                     `interpolation`, train/model_export.py, so timm's own transform matches it)
    val_crop         how it takes the val crop: "shorter side" (resized to round(size / crop_ratio),
                     then the center size × size) | "center fraction" (the center crop_ratio of the
                     image, resized to size)
    """
    name: str
    module: str
    install_hint: str = ""
    options: type | None = None
    checks: Callable[[object], list[Check]] = no_checks
    may_change: tuple[str, ...] = ()
    libraries: dict[str, str] = field(default_factory=dict)
    decodes_files: bool = True
    reads_sources: bool = True
    streams: bool = False
    auto_augment: bool = False
    bench_overrides: Callable[[object, Path, Path], list[str]] = no_bench_overrides
    bench_label: Callable[[object], str] | None = None
    val_resize: str = "bilinear"
    val_crop: str = "shorter side"

    def label(self, cfg) -> str:
        return self.bench_label(cfg) if self.bench_label is not None else self.name
