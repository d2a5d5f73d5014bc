"""What converters write: FFCV .beton files (beton.py), WebDataset tar shards (shards.py)."""
