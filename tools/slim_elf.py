#!/usr/bin/env python
"""Blank, in place, the bytes of a shared library that one GPU never reads, so that it compresses
to a fraction of its size for a transfer; what the loader and the CUDA driver read stays byte for
byte, at the same offsets (no section moves, as `strip` would do to a patchelf-ed library).

    python tools/slim_elf.py --keep-sm 90 lib1.so lib2.so ...     # prints what it blanked

Two kinds of bytes are blanked (zeroed):
  - the static symbol table and its strings (.symtab, .strtab): not loaded at run time (the
    dynamic linker reads .dynsym/.dynstr); only debuggers and `nm` read them;
  - in the CUDA fat binaries (.nv_fatbin), each entry the GPU cannot use: SASS for another major
    architecture (SASS runs only on its own major version) and PTX newer than the GPU (PTX is
    compiled forward only). Each fat binary keeps its place; its usable entries move to its
    front and its size is lowered, as if it had been built for that GPU alone, and the rest of
    its old extent is zeroed. A fat binary with no usable entry is left whole.
A fat binary in a layout this parser does not recognise is left untouched (and said so).
"""
from __future__ import annotations

import argparse
import mmap
import struct
import sys
from pathlib import Path

FATBIN_MAGIC = 0xBA55ED50
KIND_PTX, KIND_ELF = 1, 2
SYMBOL_SECTIONS = (".symtab", ".strtab")
NOBITS = 8


def sections(data) -> dict[str, tuple[int, int]]:
    """ELF64 section name → (file offset, size), for sections with bytes in the file."""
    if data[:4] != b"\x7fELF" or data[4] != 2:
        raise ValueError("not an ELF64 file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    headers = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names_offset = headers[shstrndx][4]
    found = {}
    for name_at, kind, _flags, _addr, offset, size in headers:
        end = data.find(b"\0", names_offset + name_at)
        name = bytes(data[names_offset + name_at:end]).decode()
        if kind != NOBITS and size:
            found[name] = (offset, size)
    return found


def fatbin_blobs(data, start: int, size: int):
    """[(header offset, body offset, body size, [(entry offset, entry size, kind, arch), ...]), ...]:
    the fat binaries of a section and their entries."""
    position, end, blobs = start, start + size, []
    while position < end:
        if struct.unpack_from("<I", data, position)[0] != FATBIN_MAGIC:
            if any(data[position:position + 8]):  # only zero padding may lie between fat binaries
                raise ValueError(f"unknown bytes at {position:#x}")
            position += 8
            continue
        header_size, = struct.unpack_from("<H", data, position + 6)
        body, body_size = position + header_size, struct.unpack_from("<Q", data, position + 8)[0]
        entry, entries = body, []
        while entry < body + body_size:
            kind, _version, entry_header = struct.unpack_from("<HHI", data, entry)
            payload, = struct.unpack_from("<Q", data, entry + 8)
            arch, = struct.unpack_from("<I", data, entry + 28)
            if kind not in (KIND_PTX, KIND_ELF) or entry_header < 32 or entry + entry_header + payload > body + body_size:
                raise ValueError(f"unknown fat binary entry at {entry:#x}")
            entries.append((entry, entry_header + payload, kind, arch))
            entry += entry_header + payload
        blobs.append((position, body, body_size, entries))
        position = body + body_size
    return blobs


def usable(kind: int, arch: int, keep_sm: int) -> bool:
    if kind == KIND_ELF:
        return arch // 10 == keep_sm // 10
    return arch <= keep_sm  # PTX


def keep_usable_entries(data, header: int, body: int, body_size: int, entries, keep_sm: int) -> int:
    """Moves the usable entries to the front of the body, lowers its size; bytes freed."""
    kept = [bytes(data[offset:offset + size]) for offset, size, kind, arch in entries if usable(kind, arch, keep_sm)]
    if not kept or len(kept) == len(entries):
        return 0
    new_body = b"".join(kept)
    data[body:body + body_size] = new_body + bytes(body_size - len(new_body))
    struct.pack_into("<Q", data, header + 8, len(new_body))  # the header's body size
    return body_size - len(new_body)


def slim(path: Path, keep_sm: int) -> dict:
    """Blanks path in place; returns {"symbols": bytes, "fatbin": bytes, "entries": n, "kept": n, "note": str}."""
    report = {"symbols": 0, "fatbin": 0, "entries": 0, "kept": 0, "note": ""}
    with open(path, "r+b") as file, mmap.mmap(file.fileno(), 0) as data:
        found = sections(data)
        for name in SYMBOL_SECTIONS:
            if name in found:
                offset, size = found[name]
                data[offset:offset + size] = bytes(size)
                report["symbols"] += size
        if ".nv_fatbin" in found:
            try:
                blobs = fatbin_blobs(data, *found[".nv_fatbin"])
            except (ValueError, struct.error) as error:
                report["note"] = f".nv_fatbin left as it is ({error})"
                return report
            for header, body, body_size, entries in blobs:
                report["fatbin"] += keep_usable_entries(data, header, body, body_size, entries, keep_sm)
                report["entries"] += len(entries)
                report["kept"] += sum(usable(kind, arch, keep_sm) for _, _, kind, arch in entries)
    return report


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep-sm", type=int, default=90, help="the GPU's compute capability ×10 (H100/H200: 90)")
    parser.add_argument("libraries", nargs="+", type=Path)
    args = parser.parse_args(argv)
    for library in args.libraries:
        try:
            report = slim(library, args.keep_sm)
        except ValueError as error:
            print(f"{library}: skipped ({error})")
            continue
        print(f"{library.name}: blanked {report['symbols'] / 1e6:.1f} MB of symbols, {report['fatbin'] / 1e6:.1f} MB "
              f"of GPU code (kept {report['kept']} of {report['entries']} entries) {report['note']}".rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
