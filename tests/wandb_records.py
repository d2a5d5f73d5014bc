"""What W&B itself recorded in an offline run: the records of its run-*.wandb file.

The file is a LevelDB-style log (wandb's datastore): a 7-byte header (":W&B", magic, version), then
32 KiB blocks of records, each with a 7-byte header (CRC-32C, little-endian length, type: 1 full,
2 first, 3 middle, 4 last fragment) and a wandb_internal_pb2.Record protobuf; a block's tail too
short for a header is zero padding. wandb 0.31 ships no Python reader, hence this small one.

    records = read_records(run_dir)                  # every Record, in order
    records_of(run_dir, "artifact")                  # only one kind (a Record's oneof field name)
"""
from __future__ import annotations

import struct
from pathlib import Path

BLOCK, HEADER = 32 * 1024, 7


def wandb_file(run_dir: Path) -> Path:
    """The one offline run file under run_dir/wandb/ (offline-run-*/run-*.wandb)."""
    files = sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"))
    assert files, f"no offline W&B run under {run_dir}/wandb"
    return files[-1]


def read_file(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    records, fragments, position = [], b"", HEADER
    while position + HEADER <= len(data):
        left = BLOCK - position % BLOCK
        if left < HEADER:  # padding at the end of a block
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + HEADER])
        if kind == 0:  # zeros: the rest of this block is padding (or the file's end)
            position += left
            continue
        chunk = data[position + HEADER:position + HEADER + length]
        position += HEADER + length
        fragments = chunk if kind in (1, 2) else fragments + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(fragments)
            records.append(record)
    return records


def read_records(run_dir: Path) -> list:
    """Every record of every offline run file under run_dir/wandb (a resumed run writes another)."""
    return [r for path in sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb")) for r in read_file(path)]


def records_of(run_dir: Path, kind: str) -> list:
    return [getattr(r, kind) for r in read_records(run_dir) if r.WhichOneof("record_type") == kind]


def item_key(item) -> str:
    """The metric name of a history/summary item (wandb fills `key` or `nested_key`)."""
    return item.key or "/".join(item.nested_key)


def logged_values(run_dir: Path) -> dict:
    """Metric name → its last logged value, over every `history` record (a logged table or plot
    shows up as its fields: name/_type, name/nrows, ...)."""
    import json
    return {item_key(item): json.loads(item.value_json) for record in records_of(run_dir, "history")
            for item in record.item}
