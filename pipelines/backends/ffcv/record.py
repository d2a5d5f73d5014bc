"""loader=ffcv: .beton files read by ffcv (pipelines/backends/ffcv/loader.py), converted from the
source once (betons.py); its options are cfg.data.ffcv."""
from dataclasses import dataclass, field

from pipelines.backends.record import Backend
from pipelines.writers.beton_storage import WRITE_MODES, StorageSettings

STORAGE = StorageSettings()  # the .beton storage defaults: the converter's


@dataclass
class ProgressiveConfig:
    """FFCV progressive resizing (ffcv-imagenet): train crops grow from min_res to max_res."""
    min_res: int = 0  # train resolution up to start_epoch; 0 → off (data.image_size throughout)
    max_res: int = 0  # from end_epoch on; 0 → data.image_size (linear in between, multiples of 8)
    start_epoch: int = 0
    end_epoch: int = 0


@dataclass
class FfcvConfig:
    train_beton: str = ""  # "" → <data.root>/ffcv/train.beton, converted on first use; a path: used as is
    val_beton: str = ""
    # storage of the converted .beton: the converter's own defaults (tools/convert_ffcv.py --help)
    max_resolution: int = STORAGE.max_resolution  # longer side cap, px
    write_mode: str = STORAGE.write_mode  # raw | jpg | smart | proportion (the writer's WRITE_MODES)
    compress_probability: float = STORAGE.compress_probability  # proportion: share stored as JPEG, the rest raw
    jpeg_quality: int = STORAGE.jpeg_quality
    os_cache: bool = True  # True: the .beton fits in RAM (page cache); False: ffcv's process cache
    progressive: ProgressiveConfig = field(default_factory=ProgressiveConfig)


def checks(cfg) -> list:
    ffcv, progressive = cfg.data.ffcv, cfg.data.ffcv.progressive
    return [
        (ffcv.write_mode in WRITE_MODES, "data.ffcv.write_mode", f"must be one of {WRITE_MODES}"),
        (progressive.min_res <= (progressive.max_res or cfg.data.image_size),
         "data.ffcv.progressive.min_res", "must be ≤ max_res (or data.image_size)"),
        (progressive.start_epoch <= progressive.end_epoch, "data.ffcv.progressive.start_epoch",
         "must be ≤ end_epoch"),
    ]


def bench_betons(cfg, folder, cache_dir) -> list[str]:
    """The benchmark's folder converted with its storage settings, once (kept under cache_dir)."""
    from pipelines.backends.ffcv.betons import storage_settings, converted_copy
    beton = converted_copy(folder, cache_dir, storage_settings(cfg))
    return [f"data.ffcv.train_beton={beton}", f"data.ffcv.val_beton={beton}"]


def label(cfg) -> str:
    f = cfg.data.ffcv
    return f"FFCV, {f.write_mode} {f.compress_probability:g}, max resolution {f.max_resolution}"


BACKEND = Backend(
    name="ffcv",
    module="pipelines.backends.ffcv.loader",
    install_hint="FFCV needs system libraries: `apt-get install pkg-config libopencv-dev libturbojpeg0-dev` "
                 "then `pip install ffcv==1.0.2` (or rerun ./setup.sh as root).",
    options=FfcvConfig,
    checks=checks,
    may_change=("data.ffcv",),
    libraries={"ffcv": "ffcv"},
    decodes_files=False,  # the converter checks and leaves out bad images
    reads_sources=False,  # it reads the .beton files its prepare() made from the source
    bench_overrides=bench_betons,
    bench_label=label,
    val_resize="box",  # OpenCV's INTER_AREA, which is PIL's box
    val_crop="center fraction",  # ffcv's CenterCropRGBImageDecoder
)
