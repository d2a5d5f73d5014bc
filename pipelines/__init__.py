"""Image loaders: every backend yields (uint8 NCHW channels-last images, int64 labels) on the device."""
from pipelines.loading import Loader, build_loader, find_classes

__all__ = ["Loader", "build_loader", "find_classes"]
