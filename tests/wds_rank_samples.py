"""Run under `accelerate launch` (tests/test_wds_multinode.py): this process's train and val loaders
over a shard set, the labels they yield written to OUT/rank<global rank>.json.

    accelerate launch ... tests/wds_rank_samples.py OUT key=value...
"""
import json
import os
import sys

from accelerate import Accelerator

from pipelines.loading import build_loader, prepare_dataset
from train.config import load_config

out, *overrides = sys.argv[1:]
accelerator = Accelerator(cpu=True)
cfg = load_config(overrides)
with accelerator.main_process_first():
    prepare_dataset(cfg)
rank, world = accelerator.process_index, accelerator.num_processes
train, val = (build_loader(cfg, split, rank=rank, world_size=world) for split in ("train", "val"))
train.set_epoch(0)
record = {"rank": rank, "world": world, "machine": int(os.environ.get("GROUP_RANK", -1)), "steps": len(train),
          "train": [y for _, labels in train for y in labels.tolist()],
          "val": [y for _, labels in val for y in labels.tolist()]}
with open(os.path.join(out, f"rank{rank}.json"), "w") as file:
    json.dump(record, file)
accelerator.wait_for_everyone()
