"""WebDataset tar shards as a source: which shards (spec.py), where each sample lies (index.py), reading one (read.py)."""
