"""How a source becomes device batches: one folder per backend (torchvision, dali, ffcv)."""
