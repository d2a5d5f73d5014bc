"""Image loaders: every backend yields (uint8 NCHW channels-last images, int64 labels) on the device."""
from pipelines.batches import Loader
from pipelines.loading import build_loader, prepare_dataset
from pipelines.sources.folder.listing import find_classes

__all__ = ["Loader", "build_loader", "find_classes", "prepare_dataset"]
