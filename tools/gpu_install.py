#!/usr/bin/env python
"""Installs, on the GPU machine, what tools/pack_gpu.sh packed and the `run` calls carried, into one
folder; prints the shell lines that put it to use (tools/gpu_session.sh evals them).

    eval "$(python3 tools/gpu_install.py --site /tmp/gpu-site)"
    python tools/gpu_install.py --site /tmp/x --for-python 3.12     # here: unpack and check only

It looks for the carried folders in .device/call0, .device/call1 and /tmp/gpu-carry/call0 (where
the optional first call copies its carry). DALI's xz tar may come in parts (dali.tar.xz.a, .b):
they are joined in name order and checked against the MANIFEST's size and SHA-256 before anything
is unpacked; a missing or damaged part leaves DALI out, said in one line, and the rest goes on.
Pillow's carried wheel is installed only where the machine's Pillow is 13 or newer (13 rejects
posterize(bits=0), which timm's v0 policy uses).
"""
from __future__ import annotations

import argparse
import hashlib
import shlex
import subprocess
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CARRIED = (REPO / ".device" / "call0", REPO / ".device" / "call1", Path("/tmp/gpu-carry/call0"))


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)  # stdout is for the shell lines


def carried_folders(candidates) -> list[Path]:
    return [folder for folder in candidates if (folder / "MANIFEST").is_file()]


def dali_expected(folders: list[Path]) -> tuple[int, str] | None:
    for folder in folders:
        for line in (folder / "MANIFEST").read_text().splitlines():
            if line.startswith("dali.tar.xz "):
                _, size, digest = line.split()
                return int(size), digest
    return None


def join_dali(folders: list[Path], target: Path) -> bool:
    """The DALI tar from its parts, checked; False (and why) if it cannot be had."""
    expected = dali_expected(folders)
    parts = {part.name: part for folder in folders for part in folder.glob("dali.tar.xz.*")}
    if expected is None or not parts:
        say("DALI: not carried (tools/pack_gpu.sh packs it): loader=dali unavailable")
        return False
    digest, size = hashlib.sha256(), 0
    with open(target, "wb") as joined:
        for name in sorted(parts):
            data = parts[name].read_bytes()
            joined.write(data)
            digest.update(data)
            size += len(data)
    if (size, digest.hexdigest()) != expected:
        say(f"DALI: the parts {sorted(parts)} make {size} bytes, not the {expected[0]} packed "
            "(a call's carry missing?): loader=dali unavailable")
        return False
    return True


def pip_install(wheels: list[Path], site: Path, for_python: str | None) -> None:
    if not wheels:
        return
    # linux_x86_64: FFCV's wheel, built here
    platforms = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "linux_x86_64")
    foreign = ["--python-version", for_python, "--only-binary=:all:", "--implementation", "cp",
               *(f"--platform={p}" for p in platforms)] if for_python else []
    names = ", ".join(w.name.split("-")[0] for w in wheels)
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                           "--no-cache-dir", "--upgrade", "--target", str(site), *foreign, *map(str, wheels)],
                          stdout=sys.stderr)
    say(f"installed {names}" if done.returncode == 0 else f"pip could not install {names} (exit {done.returncode})")


def machine_pillow_is_13_or_newer() -> bool:
    try:
        import PIL
    except ImportError:
        return True
    return int(PIL.__version__.split(".")[0]) >= 13


def install(site: Path, for_python: str | None, candidates=CARRIED) -> list[str]:
    """Installs into site; the shell lines that use it."""
    folders = carried_folders(candidates)
    say("carried: " + (", ".join(str(f) for f in folders) or "nothing (no .device/call*/MANIFEST)"))
    site.mkdir(parents=True, exist_ok=True)
    wheels = sorted(w for folder in folders for w in (folder / "wheels").glob("*.whl"))
    pillow = [w for w in wheels if w.name.lower().startswith("pillow-")]
    pip_install([w for w in wheels if w not in pillow], site, for_python)
    if pillow and machine_pillow_is_13_or_newer():
        pip_install(pillow[:1], site, for_python)
    joined = site.parent / f"{site.name}-dali.tar.xz"
    if join_dali(folders, joined):
        with tarfile.open(joined) as archive:
            archive.extractall(site, filter="tar")
        joined.unlink()
        say(f"DALI unpacked into {site}")
    libraries = []
    for archive_path in (folder / "ffcv-libs.tar.xz" for folder in folders):
        if archive_path.is_file():
            with tarfile.open(archive_path) as archive:
                archive.extractall(site / "ffcv-libs", filter="tar")
            libraries.append(site / "ffcv-libs" / "lib")
    libraries.append(site / "nvidia" / "cu13" / "lib")  # nvJPEG, for nvImageCodec
    search = ":".join(shlex.quote(str(p)) for p in libraries)
    return [f"export PYTHONPATH={shlex.quote(str(REPO))}:{shlex.quote(str(site))}",
            f"export LD_LIBRARY_PATH={search}" + "${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--site", type=Path, required=True, help="the folder to install into")
    parser.add_argument("--for-python", metavar="X.Y", help="wheels for another Python (a check here, not a use)")
    parser.add_argument("--carried", nargs="+", type=Path, default=list(CARRIED), help="where to look for the carry")
    args = parser.parse_args(argv)
    try:
        lines = install(args.site.resolve(), args.for_python, args.carried)
    except (OSError, tarfile.TarError, EOFError) as error:  # a damaged carry: go on without it
        say(f"install failed: {error}")
        return 1
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
