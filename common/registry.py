"""Records selectable by name (train/methods/'s methods, train/attacks/'s attack kinds,
pipelines/backends/' loader backends)."""
from __future__ import annotations

from typing import TypeVar

Record = TypeVar("Record")


def add_record(registry: dict[str, Record], record: Record, what: str) -> Record:
    """Add a record under its `name`; another record under a name already taken is an error."""
    if record.name in registry and registry[record.name] is not record:
        raise ValueError(f"{what} named {record.name!r} is already registered")
    registry[record.name] = record
    return record
