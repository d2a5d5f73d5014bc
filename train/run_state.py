"""A run's progress (train_state.json in each checkpoint): where training stands, the best top-1 so
far and the throughput counters. Only the standard library: the bottom of train/."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from common.errors import UserInputError

STATE_FILE = "train_state.json"


class CheckpointError(UserInputError):
    """A checkpoint that cannot be read, loaded or used as asked."""


@dataclass
class TrainState:
    epoch: int = 0  # current epoch (0-based); == cfg.epochs when training is done
    batch: int = 0  # batches of `epoch` already consumed (mid-epoch resume)
    step: int = 0  # optimizer steps so far
    best_top1: float = -1.0
    best_epoch: int = 0  # the epoch (1-based) of best_top1; 0 → none yet
    train_images: int = 0  # images trained on, all processes
    train_seconds: float = 0.0
    steady_images: int = 0  # the same without each epoch's first logging window (start-up)
    steady_seconds: float = 0.0
    steady_wait_seconds: float = 0.0  # of steady_seconds, spent waiting for the loader
    processes: int = 0  # processes that trained it (0: not recorded); a resume must use as many
    # False: an epoch's training saved before its validation; a resume validates it first
    validated: bool = True
    metrics_lines: int = -1  # lines of metrics.jsonl when it was saved (-1: not recorded); a resume drops later ones


def read_state(folder: Path) -> TrainState:
    try:
        return TrainState(**json.loads((Path(folder) / STATE_FILE).read_text()))
    except (OSError, ValueError, TypeError) as error:
        raise CheckpointError(f"checkpoint {folder} is unreadable: {STATE_FILE}: {error}") from None
