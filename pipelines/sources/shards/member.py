"""An image inside a tar shard where the converters and the decode rule take a path.

ShardMember is a str ("<shard>:<key>.<ext>", as reports name it; ending in the image's extension,
as the path rules expect) that also knows where its bytes lie. pipelines/sources/image_decode.py and the
FFCV writer open what they are given through image_file() and size it with image_file_size(), so a
shard's images go through the very checks and decoding of a folder's files (pipelines/backends/ffcv/betons.py).
"""
from __future__ import annotations

import io
import os


class ShardMember(str):
    def __new__(cls, shard: str, key: str, ext: str, offset: int, size: int):
        member = super().__new__(cls, f"{shard}:{key}.{ext}")
        member.shard, member.key, member.ext, member.offset, member.size = shard, key, ext, offset, size
        return member

    def __reduce__(self):  # to worker processes
        return ShardMember, (self.shard, self.key, self.ext, self.offset, self.size)

    def open(self) -> io.BytesIO:
        with open(self.shard, "rb") as file:
            return io.BytesIO(os.pread(file.fileno(), self.size, self.offset))


def image_file(path):
    """What PIL opens for a path: the path itself, or a shard member's bytes."""
    return path.open() if isinstance(path, ShardMember) else path


def image_file_size(path) -> int:
    return path.size if isinstance(path, ShardMember) else os.path.getsize(path)
