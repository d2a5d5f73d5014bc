"""loader=ffcv after the folder changed: a .beton of the old contents is never trained on silently;
and a conversion stopped or killed leaves no temporary file behind for long.

    pytest -q tests/test_ffcv_stale.py            # ~1 min on 2 cores; the real run (slow) ~1 min more
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("ffcv")
# Freeing an ffcv Loader makes numba's dispatcher finalizer raise a harmless KeyError.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

from conftest import REPO, photo_folder, spoil, train_in_process  # noqa: E402
from pipelines.atomic_files import remove_stale_temporaries, written_whole  # noqa: E402
from pipelines.backends.ffcv.betons import is_current, staleness, storage_settings  # noqa: E402
from pipelines.writers.beton import StorageSettings, convert_imagefolder  # noqa: E402
from pipelines.loading import build_loader, prepare_dataset  # noqa: E402


def ffcv_cfg(demo_cfg, root: Path, *overrides: str):
    return demo_cfg("loader=ffcv", "data.dataset=imagefolder", f"data.root={root}", "data.image_size=16",
                    "batch_size=4", "data.workers=1", *overrides)


def edit_as_the_issue_does(train: Path) -> None:
    """Fix the truncated file, add 32 images, delete 10."""
    shutil.copy(train / "cat" / "01.jpg", train / "cat" / "00.jpg")
    for k in range(32):
        shutil.copy(train / "astronaut" / f"{k % 8:02d}.jpg", train / "astronaut" / f"new_{k:02d}.jpg")
    for path in sorted((train / "coffee").glob("0*.jpg"))[:5] + sorted((train / "astronaut").glob("0*.jpg"))[:5]:
        path.unlink()


def test_a_changed_folder_is_reconverted(demo_cfg, tmp_path, capsys):
    root = photo_folder(tmp_path / "data", {"train": 8, "val": 2}, size=24)
    spoil(root / "train")
    cfg = ffcv_cfg(demo_cfg, root)
    prepare_dataset(cfg)
    beton = root / "ffcv" / "train.beton"
    assert build_loader(cfg, "train").sampler.n == 3 * 8 - 1  # the truncated image is not in it
    assert is_current(beton, root / "train", storage_settings(cfg))

    edit_as_the_issue_does(root / "train")
    assert "changed since it was converted (28 files then, 50 now)" in staleness(beton, root / "train",
                                                                                 storage_settings(cfg))
    capsys.readouterr()
    prepare_dataset(cfg)
    assert f"converting {root / 'train'} → {beton} ({root / 'train'} changed since" in capsys.readouterr().out
    train = build_loader(cfg, "train")
    assert train.sampler.n == 3 * 8 + 32 - 10  # the fixed one is back in
    assert sorted(reason.split(":")[0] for _, reason in train.left_out) == ["empty file (0 bytes)",
                                                                            "not a readable image"]
    assert is_current(beton, root / "train", storage_settings(cfg))


def test_a_given_beton_of_a_changed_folder_is_used_with_a_warning(demo_cfg, tmp_path, capsys):
    root = photo_folder(tmp_path / "data", {"train": 8, "val": 2}, size=24)
    given = tmp_path / "mine" / "train.beton"
    convert_imagefolder(root / "train", given, StorageSettings(max_resolution=64), workers=1)
    made = given.stat().st_mtime_ns
    edit_as_the_issue_does(root / "train")
    capsys.readouterr()
    prepare_dataset(ffcv_cfg(demo_cfg, root, f"data.ffcv.train_beton={given}"))
    warning = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:"))
    assert f"data.ffcv.train_beton={given}: {root / 'train'} changed since it was converted (24 files then, " \
           f"46 now); it is used as it is" in warning
    assert given.stat().st_mtime_ns == made  # the user's file is not replaced


@pytest.mark.slow
def test_a_run_after_the_folder_changed_trains_on_the_new_folder(tmp_path):
    root = photo_folder(tmp_path / "data", {"train": 8, "val": 4}, size=24)
    common = ["data.dataset=imagefolder", f"data.root={root}", "loader=ffcv", "tracker=none", "model=test_resnet",
              "method=vanilla", "epochs=1", "batch_size=4", "data.image_size=16", "eval_robust=false",
              "image_log_every=0", "data.workers=1"]
    train_in_process(*common, f"output_dir={tmp_path / 'before'}")
    edit_as_the_issue_does(root / "train")
    for k in range(5):  # and 5 more val images
        shutil.copy(root / "val" / "cat" / "00.jpg", root / "val" / "cat" / f"new_{k}.jpg")
    result = train_in_process(*common, f"output_dir={tmp_path / 'after'}")
    assert f"converting {root / 'train'} → {root / 'ffcv' / 'train.beton'} ({root / 'train'} changed" in result.stdout
    assert json.loads((tmp_path / "before" / "summary.json").read_text())["val_images"] == 12
    assert json.loads((tmp_path / "after" / "summary.json").read_text())["val_images"] == 17
    assert json.loads((root / "ffcv" / "train.beton.json").read_text())["written"] == 3 * 8 + 32 - 10


# ---------------------------------------------------------------------------------------------
# Temporary files

def test_a_signal_removes_the_temporary_file_and_writes_nothing(tmp_path):
    target = tmp_path / "x.beton"
    with pytest.raises(SystemExit) as stop:
        with written_whole(target) as temporary:
            temporary.write_bytes(b"half a .beton")
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the signal arrives first
    assert stop.value.code == 128 + signal.SIGTERM
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handler is the caller's again


def wait_ignoring_sigterm(ready) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # as a child where no handler runs (blocked in C, a fork deadlock)
    ready.set()
    time.sleep(600)


def test_a_stopped_block_ends_a_child_that_never_acts_on_sigterm(tmp_path):
    """Else the process's exit waits for that child forever (multiprocessing joins its children)."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    ready = context.Event()
    with pytest.raises(SystemExit):
        with written_whole(tmp_path / "x.beton"):
            child = context.Process(target=wait_ignoring_sigterm, args=(ready,))
            child.start()
            assert ready.wait(60)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the signal arrives first
    assert not child.is_alive() and child.exitcode == -signal.SIGKILL  # SIGTERM first, then SIGKILL
    assert list(tmp_path.iterdir()) == []


class SignalledWhileCollected:
    """Python drops an exception raised in __del__, as in a fork hook: the handler's SystemExit is lost."""
    def __del__(self):
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1000):  # the handler runs here, and its SystemExit goes nowhere
            pass


@pytest.mark.parametrize("then", ["keep writing", "finish at once"])
def test_a_signal_whose_exit_python_dropped_still_stops_the_block(tmp_path, then):
    target = tmp_path / "x.beton"
    with pytest.raises(SystemExit) as stop:
        with written_whole(target) as temporary:
            temporary.write_bytes(b"half a .beton")
            SignalledWhileCollected()  # collected at once
            if then == "keep writing":
                time.sleep(5)  # the signal is sent again and ends the sleep
    assert stop.value.code == 128 + signal.SIGTERM
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_temporaries_of_killed_writers_are_removed_and_no_others(tmp_path):
    target = tmp_path / "x.beton"
    gone = dead_pid()
    stale = [tmp_path / f".x.beton.tmp-{gone}-{socket.gethostname()}", tmp_path / f"x.beton.tmp-{gone}"]
    kept = [tmp_path / f".x.beton.tmp-{os.getpid()}-{socket.gethostname()}",  # a writer still at work
            tmp_path / f".x.beton.tmp-{gone}-another-host",  # on shared storage: not ours to judge
            tmp_path / f".y.beton.tmp-{gone}-{socket.gethostname()}"]  # another target
    for path in stale + kept:
        path.write_bytes(b"partial")
    assert sorted(remove_stale_temporaries(target)) == sorted(stale)
    assert sorted(tmp_path.iterdir()) == sorted(kept)


def test_a_stopped_conversion_removes_its_partial_file(tmp_path):
    from PIL import Image
    from conftest import small_photos
    src = tmp_path / "src"
    for name, photo in zip("abc", small_photos(256)):
        (src / name).mkdir(parents=True)
        for k in range(15):
            Image.fromarray(photo[:, ::1 if k % 2 else -1]).save(src / name / f"{k}.png")
    out = tmp_path / "out" / "x.beton"
    converter = subprocess.Popen([sys.executable, str(REPO / "tools" / "convert_ffcv.py"), str(src), str(out),
                                  "--workers", "1", "--write-mode", "jpg", "--jpeg-quality", "95"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    temporary = out.parent / f".x.beton.tmp-{converter.pid}-{socket.gethostname()}"
    deadline = time.monotonic() + 240
    while not temporary.exists() and converter.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert temporary.exists(), "the conversion ended before it could be stopped"
    converter.send_signal(signal.SIGTERM)  # to the converter only: it ends its writer processes itself
    _, stderr = converter.communicate(timeout=60)
    assert converter.returncode == 128 + signal.SIGTERM, stderr
    assert f"stopped: nothing written to {out}" in stderr and "Traceback" not in stderr
    assert list(out.parent.iterdir()) == []


KILLED_WRITER = """
import sys, time
from pathlib import Path
from pipelines.atomic_files import written_whole
with written_whole(Path(sys.argv[1])) as temporary:
    temporary.write_bytes(bytes(10**6))
    print("writing", flush=True)
    time.sleep(300)
"""


def test_what_a_killed_conversion_left_is_removed_by_the_next(tmp_path, capsys):
    root = photo_folder(tmp_path / "data", {"train": 3}, size=24)
    out = tmp_path / "out" / "x.beton"
    out.parent.mkdir()
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(out)], stdout=subprocess.PIPE, text=True,
                              cwd=REPO)
    assert writer.stdout.readline() == "writing\n"
    writer.kill()  # SIGKILL: nothing can clean up
    writer.wait()
    left = [p.name for p in out.parent.iterdir()]
    assert left == [f".x.beton.tmp-{writer.pid}-{socket.gethostname()}"]
    convert_imagefolder(root / "train", out, StorageSettings(max_resolution=64), workers=1)
    assert f"removed 1 temporary files left by killed writers of {out}: {left[0]}" in capsys.readouterr().out
    assert sorted(p.name for p in out.parent.iterdir()) == ["x.beton", "x.beton.json", "x.beton.skipped.txt"]
