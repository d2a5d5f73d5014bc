"""loader=torchvision: the baseline backend (pipelines/backends/torchvision/loader.py)."""
from pipelines.backends.record import Backend

BACKEND = Backend(
    name="torchvision",
    module="pipelines.backends.torchvision.loader",
    streams=True,  # remote shards: pipelines/backends/torchvision/stream.py
    auto_augment=True,
    val_resize="bilinear",  # PIL's antialiased bilinear
)
