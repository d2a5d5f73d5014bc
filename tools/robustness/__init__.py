"""Pieces of tools/evaluate.py: ImageNet-C (read or synthesised), IN-A/IN-R subsets, folders, report."""
