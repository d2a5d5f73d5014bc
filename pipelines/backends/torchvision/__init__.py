"""loader=torchvision: PIL decoding in DataLoader workers."""
