"""What travels to the GPU machine: tools/slim_elf.py keeps, byte for byte, what the loader and an
sm_90 GPU read of a real DALI library (cuobjdump, where Triton ships it, is the reference), and
tools/gpu_install.py joins a carry split over two calls, checks it, and refuses a part missing."""
import hashlib
import io
import lzma
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO))
from tools.gpu_install import install  # noqa: E402
from tools.slim_elf import KIND_ELF, fatbin_blobs, sections, slim  # noqa: E402

dali = pytest.importorskip("nvidia.dali")
LIBDALI = Path(dali.__file__).parent / "libdali.so"  # 15 MB, fat binaries for six GPU generations


def cuobjdump() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(tool) if tool.is_file() else None


def entries(path: Path) -> list[tuple[int, int, bytes]]:
    data = path.read_bytes()
    blobs = fatbin_blobs(data, *sections(data)[".nv_fatbin"])
    return [(kind, arch, data[offset:offset + size]) for _, _, _, found in blobs for offset, size, kind, arch in found]


def test_slimmed_library_keeps_what_the_loader_and_an_sm90_gpu_read(tmp_path):
    slimmed = tmp_path / "libdali.so"
    shutil.copy(LIBDALI, slimmed)
    report = slim(slimmed, keep_sm=90)
    before, after = LIBDALI.read_bytes(), slimmed.read_bytes()
    assert len(after) == len(before) and report["symbols"] > 1e6 and report["fatbin"] > 1e5
    original_sections = sections(before)
    for name, (offset, size) in original_sections.items():  # every section but three is untouched
        if name not in (".symtab", ".strtab", ".nv_fatbin"):
            assert after[offset:offset + size] == before[offset:offset + size], name
    kept, original = entries(slimmed), entries(LIBDALI)
    assert kept and all(kind == KIND_ELF and arch == 90 for kind, arch, _ in kept)
    assert [e for e in original if e[0] == KIND_ELF and e[1] == 90] == kept  # the same sm_90 code, in order
    assert len(original) > len(kept) and {arch for _, arch, _ in original} > {90}
    tool = cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump here (Triton ships one) to read the slimmed fat binaries independently")
    listing = subprocess.run([tool, "-lelf", str(slimmed)], capture_output=True, text=True, check=True).stdout
    assert listing.count("sm_90.cubin") == len(kept) and "sm_80" not in listing


def write_carry(folder: Path, name: str, data: bytes, manifest_line: str) -> None:
    folder.mkdir(parents=True)
    (folder / name).write_bytes(data)
    (folder / "MANIFEST").write_text(f"packed for a test\n{manifest_line}\n")


def dali_like_tar() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for path, text in (("nvidia/__init__.py", "__path__ = __import__('pkgutil').extend_path(__path__, __name__)\n"),
                           ("nvidia/dali/__init__.py", "__version__ = 'carried'\n")):
            info = tarfile.TarInfo(path)
            info.size = len(text)
            archive.addfile(info, io.BytesIO(text.encode()))
    return lzma.compress(buffer.getvalue(), filters=[{"id": lzma.FILTER_X86}, {"id": lzma.FILTER_LZMA2}])


def test_a_carry_split_over_two_calls_is_joined_checked_and_unpacked(tmp_path):
    packed = dali_like_tar()
    line = f"dali.tar.xz {len(packed)} {hashlib.sha256(packed).hexdigest()}"
    call1, call0 = tmp_path / "call1", tmp_path / "call0"
    write_carry(call1, "dali.tar.xz.a", packed[:100], line)  # the parts join in name order
    write_carry(call0, "dali.tar.xz.b", packed[100:], line)
    lines = install(tmp_path / "site", None, [call0, call1])
    assert (tmp_path / "site" / "nvidia" / "dali" / "__init__.py").read_text() == "__version__ = 'carried'\n"
    assert lines[0].startswith("export PYTHONPATH=") and lines[0].endswith(str(tmp_path / "site"))
    assert str(tmp_path / "site" / "nvidia" / "cu13" / "lib") in lines[1]


def test_a_missing_part_leaves_dali_out_with_one_line(tmp_path, capfd):
    packed = dali_like_tar()
    line = f"dali.tar.xz {len(packed)} {hashlib.sha256(packed).hexdigest()}"
    write_carry(tmp_path / "call1", "dali.tar.xz.a", packed[:100], line)  # call0's part never came
    install(tmp_path / "site", None, [tmp_path / "call0", tmp_path / "call1"])
    assert not (tmp_path / "site" / "nvidia").exists()
    assert f"make 100 bytes, not the {len(packed)} packed" in capfd.readouterr().err
