"""loader=dali: NVIDIA DALI decodes and augments (nvJPEG on CUDA, CPU threads otherwise)."""
