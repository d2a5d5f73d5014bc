"""Shard sets for the WebDataset tests, written by tools/convert_wds.py and by webdataset's own
ShardWriter (a writer this project did not write), from the digits and photo ImageFolders."""
from __future__ import annotations

import hashlib
import json
import subprocess
from collections import Counter
from pathlib import Path

from conftest import tool_in_process
from pipelines.sources.folder.listing import list_image_folder


def convert_wds(src: Path, out: Path, *args) -> subprocess.CompletedProcess:
    return tool_in_process("convert_wds.py", src, out, *args)


def digest(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def folder_samples(folder: Path) -> Counter:
    """(image bytes digest, class index) of every image of an ImageFolder split."""
    return Counter((digest(Path(path).read_bytes()), label) for path, label in list_image_folder(folder).images())


def reference_samples(urls: list[str]) -> Counter:
    """(image bytes digest, cls) of every sample, as webdataset's own reader sees the shards."""
    import webdataset as wds
    samples = Counter()
    for sample in wds.WebDataset(urls, shardshuffle=False):
        image = next(sample[ext] for ext in ("jpg", "jpeg", "png", "webp") if ext in sample)
        samples[(digest(image), int(sample["cls"]))] += 1
    return samples


def write_with_shardwriter(folder: Path, out: Path, *, maxcount: int, label_is_index: bool = False,
                           info_split: str = "", prefix: str = "part") -> str:
    """The folder's images as shards written by webdataset.ShardWriter (PAX-free ustar tars, no index
    files, sorted file order); cls = the class index, or the sample's position (label_is_index: each
    sample its own class, so a loader's labels name the samples it read). Returns the brace pattern
    of out/<prefix>-NNNN.tar; info_split also writes an _info.json naming the shards under that split."""
    import webdataset as wds

    out.mkdir(parents=True, exist_ok=True)
    images = list_image_folder(folder).images()
    with wds.ShardWriter(str(out / f"{prefix}-%04d.tar"), maxcount=maxcount, verbose=0) as writer:
        for position, (path, label) in enumerate(images):
            writer.write({"__key__": f"s{position:06d}", Path(path).suffix.lstrip(".").lower(): Path(path).read_bytes(),
                          "cls": str(position if label_is_index else label)})
    shards = sorted(out.glob(f"{prefix}-*.tar"))
    if info_split:
        lengths = [min(maxcount, len(images) - i * maxcount) for i in range(len(shards))]
        (out / "_info.json").write_text(json.dumps({"splits": {info_split: {
            "name": info_split, "num_samples": len(images), "filenames": [s.name for s in shards],
            "shard_lengths": lengths}}, "num_classes": len(images) if label_is_index else None}))
    return str(out / f"{prefix}-{{0000..{len(shards) - 1:04d}}}.tar")


def numbered_set(folder_root: Path, out: Path, *, maxcount: int = 170) -> Path:
    """Digits whose cls is the sample's number in its split (each sample its own class): the labels a
    loader yields name the samples it read. ShardWriter's shards (train-NNNN.tar, val-NNNN.tar in
    out/<split>/) of uneven length (maxcount a shard, the last shorter), no index files; one info
    file naming both splits."""
    splits = {}
    for split in ("train", "val"):
        write_with_shardwriter(folder_root / split, out / split, maxcount=maxcount, label_is_index=True,
                               info_split=split, prefix=split)
        entry = json.loads((out / split / "_info.json").read_text())["splits"][split]
        splits[split] = {**entry, "filenames": [f"{split}/{name}" for name in entry["filenames"]]}
    (out / "_info.json").write_text(json.dumps({"splits": splits, "num_classes": 1437}))
    return out
