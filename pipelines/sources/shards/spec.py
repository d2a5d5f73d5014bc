"""Which tar shards make a split of a WebDataset set, and what the set says about itself.

Two ways to name them (`data.dataset=webdataset`):
  data.root=DIR            DIR/_info.json (or _info.yaml) in timm's layout, as the Hugging Face sets
                           (timm/imagenet-1k-wds) and tools/convert_wds.py write it:
                           {"splits": {"train": {"name", "num_samples", "filenames", "shard_lengths"}, ...},
                            "classes": [...] and/or "num_classes": K   (optional; ours writes both)}
                           Train reads the split named data.train_dir (default "train"); val the one
                           named data.val_dir ("val"), else "validation" (the Hugging Face name).
  data.train_shards=SPEC   a brace pattern, e.g. /data/x/train-{0000..0099}.tar, or several joined by
  data.val_shards=SPEC     "::" (webdataset's rule), with timm's optional "|N" sample-count suffix.
                           When data.root also has an info file, its shard lengths are looked up by
                           file name; otherwise the index files give them (pipelines/sources/shards/index.py).
A shard is a local path or a URL that webdataset opens (`pipe:CMD`, http://, https://, ...): the
latter are streamed (pipelines/backends/torchvision/stream.py), the former read by index.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from common.errors import UserInputError

INFO_FILES = ("_info.json", "_info.yaml", "_info.yml")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # a sample's image component (first found wins)
LABEL_EXTENSION = "cls"  # an integer class index, as text
URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")  # pipe:..., http://..., s3://...; not C:\ (1 letter)


class ShardSetError(UserInputError):
    """A shard set that cannot be read as named: the message says which file or key is wrong."""


@dataclass
class ShardSplit:
    split: str  # "train" or "val": what the trainer asked for
    source: str  # for messages: "DIR/_info.json, split train" or the pattern
    urls: list[str]  # local paths or URLs, in the set's order
    lengths: list[int] | None  # samples per shard, when the info file says (else the index files)
    total: int | None  # samples in the split, when known up front (info file or "|N")
    classes: list[str] | None  # class names from the info file
    num_classes: int | None  # from the info file

    @property
    def remote(self) -> bool:
        return any(is_url(url) for url in self.urls)


def is_url(name: str) -> bool:
    """A shard that webdataset opens as a stream (pipe:, http:, ...) rather than a local file."""
    return bool(URL.match(name)) and not name.startswith("file:")


def local_path(name: str) -> str:
    return name[len("file:"):] if name.startswith("file:") else name


# ---------------------------------------------------------------------------------------------
# The info file

def find_info(root: str) -> str | None:
    """The info file of root, if any (root may be a URL: the Hugging Face set's resolve/main)."""
    if is_url(root):
        return root.rstrip("/") + "/" + INFO_FILES[0]
    return next((str(Path(root) / name) for name in INFO_FILES if (Path(root) / name).is_file()), None)


def read_info(path: str) -> dict:
    try:
        if is_url(path):
            from webdataset import gopen
            with gopen(path) as stream:
                text = stream.read().decode()
        else:
            text = Path(path).read_text()
        info = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as error:
        raise ShardSetError(f"cannot read the shard set's info file {path}: {error}") from None
    if not isinstance(info, dict) or not isinstance(info.get("splits"), dict):
        raise ShardSetError(f"{path} has no \"splits\" mapping (timm's _info.json layout: "
                            f"{{\"splits\": {{\"train\": {{\"filenames\": [...], \"shard_lengths\": [...]}}}}}})")
    return info


def split_entry(info: dict, path: str, names: list[str]) -> tuple[str, dict]:
    name = next((n for n in names if n in info["splits"]), None)
    if name is None:
        raise ShardSetError(f"{path} has no split {' or '.join(map(repr, names))} "
                            f"(it has {sorted(info['splits'])}); set data.train_dir/data.val_dir to one of them")
    entry = info["splits"][name]
    files, lengths = entry.get("filenames"), entry.get("shard_lengths")
    if not isinstance(files, list) or not files:
        raise ShardSetError(f"{path}: split {name!r} lists no \"filenames\"")
    if not isinstance(lengths, list) or len(lengths) != len(files) or not all(isinstance(n, int) for n in lengths):
        raise ShardSetError(f"{path}: split {name!r} needs \"shard_lengths\", one integer per file "
                            f"({len(files)} files)")
    if "num_samples" in entry and entry["num_samples"] != sum(lengths):
        raise ShardSetError(f"{path}: split {name!r} says num_samples {entry['num_samples']} but its "
                            f"shard_lengths sum to {sum(lengths)}")
    return name, entry


def info_classes(info: dict, path: str) -> tuple[list[str] | None, int | None]:
    classes, count = info.get("classes"), info.get("num_classes")
    if classes is not None and not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
        raise ShardSetError(f"{path}: \"classes\" must be a list of class names")
    if count is not None and (not isinstance(count, int) or count < 1 or (classes and count != len(classes))):
        raise ShardSetError(f"{path}: \"num_classes\" {count!r} must be a positive integer equal to the "
                            f"number of \"classes\"")
    return classes, count or (len(classes) if classes else None)


# ---------------------------------------------------------------------------------------------
# A split

def expand_pattern(spec: str) -> tuple[list[str], int | None]:
    """A brace pattern (with an optional |N count) → (shard names, N or None); webdataset expands it."""
    from webdataset.shardlists import expand_urls

    pattern, _, count = spec.partition("|")
    if count and not count.strip().isdigit():
        raise ShardSetError(f"shard pattern {spec!r}: the part after '|' must be the number of samples")
    urls = expand_urls(pattern.strip())
    if not urls or not all(urls):
        raise ShardSetError(f"shard pattern {spec!r} names no shard")
    return urls, int(count) if count else None


def shard_name(url: str) -> str:
    """The file name a shard has in an info file: a path's or URL's last part; for `pipe:CMD` the
    last word of CMD that names a .tar (pipe:cat /x/a.tar → a.tar)."""
    if url.startswith("pipe:"):
        words = [w for w in url[5:].split() if ".tar" in w]
        url = words[-1] if words else url
    return url.rstrip("/").rsplit("/", 1)[-1].split("?")[0]


def shard_split(data, split: str) -> ShardSplit:
    """The shards of split "train" or "val" of data config `data` (see the module doc)."""
    spec = data.train_shards if split == "train" else data.val_shards
    info_path = find_info(data.root) if data.root else None
    info = read_info(info_path) if info_path else None
    classes, count = info_classes(info, info_path) if info else (None, None)
    if spec:
        urls, total = expand_pattern(spec)
        lengths = lengths_by_name(info, urls) if info else None
        if lengths and total and total != sum(lengths):
            raise ShardSetError(f"shard pattern {spec!r} says {total} samples but {info_path} gives its "
                                f"shards {sum(lengths)}")
        return ShardSplit(split, spec, urls, lengths, total or (sum(lengths) if lengths else None), classes, count)
    if info is None:
        key = "data.train_shards" if split == "train" else "data.val_shards"
        raise ShardSetError(f"data.dataset=webdataset: {data.root} has no {' or '.join(INFO_FILES)}; point data.root "
                            f"at a shard set made by tools/convert_wds.py (or timm's layout) or set {key}=PATTERN")
    names = [data.train_dir, "train"] if split == "train" else [data.val_dir, "validation", "val"]
    name, entry = split_entry(info, info_path, list(dict.fromkeys(names)))
    base = info_path.rsplit("/", 1)[0]
    urls = [f if is_url(f) or os.path.isabs(f) else f"{base}/{f}" for f in entry["filenames"]]
    lengths = list(entry["shard_lengths"])
    return ShardSplit(split, f"{info_path}, split {name}", urls, lengths, sum(lengths), classes, count)


def lengths_by_name(info: dict, urls: list[str]) -> list[int] | None:
    """Shard lengths of urls from any split of the info file, matched by file name (timm does the
    same); None when some shard is not listed there."""
    known = {}
    for entry in info["splits"].values():
        known.update(zip(map(shard_name, entry.get("filenames", [])), entry.get("shard_lengths", [])))
    lengths = [known.get(shard_name(url)) for url in urls]
    return None if None in lengths else lengths


def shard_data(source: str, split: str = "train", name: str = "") -> dict | None:
    """The data config keys that make a tool's SRC a shard split, when it names one: a folder with an
    info file (its split `name`, else the trainer's names for `split`), or a pattern of .tar shards;
    None for anything else (an ImageFolder)."""
    if os.path.isdir(source) and find_info(source):
        return {"dataset": "webdataset", "root": source, "train_shards": "", "val_shards": "",
                "train_dir": name or "train", "val_dir": name or "val"}
    if ".tar" in source:
        return {"dataset": "webdataset", "root": "", "train_shards": source if split == "train" else "",
                "val_shards": source if split == "val" else "", "train_dir": "train", "val_dir": "val"}
    return None


def named_shards(source: str, split: str = "train", name: str = "") -> ShardSplit | None:
    """shard_data's split, read (None: source is no shard set)."""
    from types import SimpleNamespace

    data = shard_data(source, split, name)
    return None if data is None else shard_split(SimpleNamespace(**data), split)
