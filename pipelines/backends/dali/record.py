"""loader=dali: NVIDIA DALI (pipelines/backends/dali/loader.py); its options are cfg.data.dali."""
from dataclasses import dataclass

from pipelines.backends.record import Backend


@dataclass
class DaliConfig:
    threads: int = 4  # CPU threads per process (on CUDA they only read files and feed nvJPEG)
    prefetch: int = 2  # batches DALI prepares ahead of the one being trained on


def checks(cfg) -> list:
    dali = cfg.data.dali
    return [(dali.threads >= 1, "data.dali.threads", "must be ≥ 1"),
            (dali.prefetch >= 1, "data.dali.prefetch", "must be ≥ 1")]


BACKEND = Backend(
    name="dali",
    module="pipelines.backends.dali.loader",
    install_hint="`pip install nvidia-dali-cuda130` (or rerun ./setup.sh).",
    options=DaliConfig,
    checks=checks,
    may_change=("data.dali",),
    libraries={"dali": "nvidia-dali-cuda130"},
    auto_augment=True,  # inside the pipeline: pipelines/backends/dali/auto_augment.py
    bench_overrides=lambda cfg, folder, cache_dir: [f"data.dali.threads={cfg.data.workers}"],
    bench_label=lambda cfg: "DALI (CPU pipeline without CUDA)",
    val_resize="bilinear",  # its antialiased linear resize: PIL's bilinear
)
