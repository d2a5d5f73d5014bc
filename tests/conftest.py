"""Shared fixtures: the digits demo set and one trained demo run, built once per test session."""
from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import traceback
from pathlib import Path

# As train/run.py does before torch loads OpenMP: threads waiting for each other sleep, so the
# in-process runs do not spin against each other on shared cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402

from pipelines.sources.offline.digits import build_digits_imagefolder  # noqa: E402
from train.config import load_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A local TCP port nothing listens on now (bound once, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def two_processes() -> list[str]:
    """`accelerate launch` of two local processes (torchrun without CUDA: real 2-process gloo training)
    on a port of their own, so that tests running side by side (pytest -n) never share a rendezvous."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--main_process_port", str(free_port()), "--mixed_precision", "no",
            "--dynamo_backend", "no"]


def run_train(*args: str, launcher: list[str] | None = None, check: bool = True, timeout: int = 900,
              env: dict | None = None):
    """Run train/run.py in a subprocess; returns the CompletedProcess. Only where the process is the
    point (signals, kills, launchers, several processes, the exit status a shell sees): everything
    else runs `train_in_process`, which skips ~7 s of imports per run.
    env: variables set on top of os.environ and WANDB_MODE=offline."""
    command = (launcher or [sys.executable]) + [str(REPO / "train" / "run.py"), *args]
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1", **(env or {})}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-5000:]}")
    return result


@contextlib.contextmanager
def process_state_kept(env: dict | None = None):
    """What a run changes in its process, put back after it: environment variables (env is set for
    the run), signal handlers, torch's threads, the unraisable hook, the working folder, Accelerate's
    process-wide state (as it was before), the run folder's lock, dynamo's compiled graphs; and W&B's
    service is ended, as at a process's exit."""
    import torch
    from accelerate.state import AcceleratorState, GradientState, PartialState

    from train import run_lock, tracking
    saved_env, cwd, threads = dict(os.environ), os.getcwd(), torch.get_num_threads()
    shared = [AcceleratorState._shared_state, PartialState._shared_state, GradientState._shared_state]
    accelerate_before = [dict(state) for state in shared]  # an Accelerator of the test itself keeps working
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    hook = sys.unraisablehook
    os.environ.update({"WANDB_MODE": "offline", **(env or {})})
    try:
        yield
    finally:
        run_lock._close_in_child()  # the lock ends with the run, as it does with a run's process
        if "wandb" in sys.modules:  # W&B's service writes the run file to its end when its process ends
            sys.modules["wandb"].teardown()
        tracking.reachable_or_offline.cache_clear()  # one probe of the W&B server per process: per run here
        if "torch._dynamo" in sys.modules:  # compiled graphs and their counter are per process: per run here
            torch._dynamo.reset()
            torch._dynamo.utils.counters.clear()
        os.environ.clear()
        os.environ.update(saved_env)
        os.chdir(cwd)
        torch.set_num_threads(threads)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        sys.unraisablehook = hook
        for state, before in zip(shared, accelerate_before):
            state.clear()
            state.update(before)


def train_in_process(*args: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """train/run.py's command line run in this process (`train.run.cli`: the same exit statuses and
    error lines as the script), its stdout and stderr captured; returns a CompletedProcess like
    run_train's (returncode 1 and the traceback in stderr for an error without a documented status)."""
    from train.run import cli
    stdout, stderr = io.StringIO(), io.StringIO()
    with process_state_kept(env), contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            code = cli(list(args))
        except SystemExit as stop:  # argparse-style exits
            code = stop.code if isinstance(stop.code, int) else 1
        except Exception:
            traceback.print_exc()
            code = 1
    result = subprocess.CompletedProcess(["train/run.py", *args], code, stdout.getvalue(), stderr.getvalue())
    if check and code != 0:
        raise AssertionError(f"train/run.py {' '.join(args)} failed ({code}):\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-5000:]}")
    return result


def tool_in_process(name: str, *args, check: bool = False, env: dict | None = None,
                    cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`python tools/<name> ARGS` run in this process (its main() through common/exit_status.py, as the
    script's own `__main__` does), in the folder cwd, stdout and stderr captured; a CompletedProcess
    like subprocess.run's."""
    import importlib
    import inspect

    from common.exit_status import run_entry_point
    module = importlib.import_module(f"tools.{name.removesuffix('.py')}")
    argv = [str(arg) for arg in args]
    takes_argv = bool(inspect.signature(module.main).parameters)
    stdout, stderr = io.StringIO(), io.StringIO()
    saved_argv = sys.argv
    with process_state_kept(env), contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        sys.argv = [name, *argv]
        if cwd is not None:
            os.chdir(cwd)
        try:
            code = run_entry_point(lambda argv: module.main(argv) if takes_argv else module.main(), argv)
        except SystemExit as stop:  # argparse, and tools that exit with a message
            if isinstance(stop.code, str):
                print(stop.code, file=sys.stderr)
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        except Exception:
            traceback.print_exc()
            code = 1
        finally:
            sys.argv = saved_argv
    result = subprocess.CompletedProcess([f"tools/{name}", *argv], code, stdout.getvalue(), stderr.getvalue())
    if check and code != 0:
        raise AssertionError(f"tools/{name} {' '.join(argv)} failed ({code}):\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-5000:]}")
    return result


def one_error_line(result, code: int = 2) -> str:
    """The one `error:` line of a run that ended with status `code` and no traceback."""
    assert result.returncode == code, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return errors[0]


@pytest.fixture(scope="session", autouse=True)
def image_check_cache(tmp_path_factory):
    """The image check's cache (pipelines/sources/folder/image_check.py) in a fresh folder, not the user's
    ~/.cache: for this process and the runs it starts."""
    folder = tmp_path_factory.mktemp("xdg_cache")
    previous = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop("XDG_CACHE_HOME")
    else:
        os.environ["XDG_CACHE_HOME"] = previous


def with_code(code: str) -> list[str]:
    """A run_train launcher that runs `code` (a fault to inject, as a process must see it) in the
    training process, then train/run.py as the script."""
    return [sys.executable, "-c", f"{code}\nimport runpy, sys\nsys.argv = sys.argv[1:]\n"
                                  f"runpy.run_path(sys.argv[0], run_name='__main__')"]


def torch_default_threads() -> int:
    """The threads torch takes in a fresh process without OMP_NUM_THREADS: the machine's cores."""
    env = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}
    result = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"], env=env,
                            capture_output=True, text=True, check=True)
    return int(result.stdout)


@pytest.fixture(scope="module")
def one_thread():
    """Small models on a shared 2-core machine: with other processes busy, two OpenMP threads
    stall each other (a 75 ms step takes 1–2 s); one thread keeps these tests fast."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def built_once(tmp_path_factory, name: str, build) -> Path:
    """A session fixture's folder, built by build(folder) once for the whole test run: with
    pytest-xdist the workers share it (the first builds it under a file lock, the others wait for
    it and reuse it). Tests copy it before changing it."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # each worker's base is a folder of the run's
        root = root.parent
    folder = root / name
    with FileLock(f"{folder}.lock"):
        if not (root / f"{name}.built").exists():
            build(folder)
            (root / f"{name}.built").touch()
    return folder


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory) -> Path:
    return built_once(tmp_path_factory, "digits", build_digits_imagefolder)


def copy_few_digits(digits: Path, root: Path, per_class: int = 20) -> Path:
    import shutil

    for folder in sorted((digits / "train").iterdir()):
        (root / "train" / folder.name).mkdir(parents=True)
        for image in sorted(folder.iterdir())[:per_class]:
            shutil.copy(image, root / "train" / folder.name / image.name)
    shutil.copytree(digits / "val", root / "val")
    return root


@pytest.fixture(scope="session")
def few_digits(digits_root, tmp_path_factory) -> Path:
    """The digits set with 20 train images per class (200: runs of a few steps) and the whole val split."""
    return built_once(tmp_path_factory, "few_digits", lambda root: copy_few_digits(digits_root, root))


@pytest.fixture
def demo_cfg(digits_root, tmp_path):
    """A config factory: the demo recipe on the session's digits set, plus overrides."""
    def make(*overrides: str):
        return load_config([f"data.root={digits_root}", f"output_dir={tmp_path / 'run'}", "tracker=none",
                            *overrides])
    return make


# trained_demo_run's settings beyond configs/demo.yaml, which a command continuing it repeats: timm's
# small test ResNet, with the normalisation of its timm tag (mean = std = 0.5) as the demo's ResNet-18
# has its own tag's (ImageNet's), so a plain state dict of it evaluates with timm's defaults
DEMO_RUN = ("model=test_resnet", "normalization=inception")


@pytest.fixture(scope="session")
def trained_demo_run(digits_root, tmp_path_factory) -> Path:
    """The demo recipe (configs/demo.yaml: AdvProp, PGD-2, 8 epochs on the digits) on timm's small
    test ResNet instead of its ResNet-18 (DEMO_RUN; the model is incidental to the tests that read
    it, and the ResNet-18 costs minutes), trained once for the whole test run: a run directory with
    checkpoints and exports. Copy it before changing it."""
    return built_once(tmp_path_factory, "demo_run", lambda run_dir: train_in_process(
        f"data.root={digits_root}", f"output_dir={run_dir}", "tracker=none", *DEMO_RUN))


def load_exported(path: Path):
    """A plain timm model (in our [0, 1]-input wrapper) from an export: a folder in timm's Hub layout
    (timm loads it), or a single-file export of before (main-norm safetensors, our metadata)."""
    import timm
    from safetensors.torch import load_file

    from models.export import read_metadata
    from models.factory import Normalized, normalization_named

    path = Path(path)
    if path.is_dir():
        net = timm.create_model(f"local-dir:{path}", pretrained=True)
        return Normalized(net, normalization_named(net.pretrained_cfg["mean"], net.pretrained_cfg["std"])).eval()
    meta = read_metadata(path)
    net = timm.create_model(meta["model"], num_classes=int(meta["num_classes"]))
    net.load_state_dict(load_file(str(path)), strict=True)
    return Normalized(net, meta["normalization"]).eval()


def old_single_file_export(folder: Path, path: Path, *, export_format: str = "advprop-main-norm",
                           geometry: bool = True) -> Path:
    """The export `folder` (timm's Hub layout) rewritten as the single .safetensors file tools/export.py
    wrote before the folder: main-norm weights, metadata model/normalization/num_classes/classes/format
    and (geometry: exports since the val geometry was recorded) image_size/crop_ratio."""
    import json

    from safetensors.torch import load_file, save_file

    from models.factory import normalization_named

    config = json.loads((Path(folder) / "config.json").read_text())
    pretrained = config["pretrained_cfg"]
    metadata = {"model": config["architecture"], "num_classes": str(config["num_classes"]),
                "normalization": normalization_named(pretrained["mean"], pretrained["std"]),
                "classes": json.dumps(config["label_names"]), "format": export_format}
    if geometry:
        metadata.update(image_size=str(pretrained["input_size"][-1]), crop_ratio=str(pretrained["crop_pct"]))
    save_file(load_file(str(Path(folder) / "model.safetensors")), str(path), metadata=metadata)
    return path


def digits_val_batch(digits_root: Path, n: int = 64):
    """n val digits as float [0, 1] NCHW with labels, spread over all classes."""
    import torch
    from torchvision import datasets, transforms
    data = datasets.ImageFolder(digits_root / "val", transform=transforms.ToTensor())
    picks = [data[i] for i in range(0, len(data), max(1, len(data) // n))][:n]
    return torch.stack([p[0] for p in picks]), torch.tensor([p[1] for p in picks])


def small_photos(size: int) -> list:
    """Three scikit-image photos (astronaut, coffee, cat) as size × size RGB uint8 arrays."""
    import numpy as np
    from PIL import Image
    from skimage import data as photos
    return [np.asarray(Image.fromarray(load()).convert("RGB").resize((size, size), Image.BILINEAR))
            for load in (photos.astronaut, photos.coffee, photos.chelsea)]


CLASSES = ["astronaut", "cat", "coffee"]  # photo_folder's, sorted


def photo_folder(root: Path, per_class: dict[str, int], size: int = 40) -> Path:
    """root/<split>/<class>/<k>.jpg (k < per_class[split]): distinct windows of three scikit-image photos."""
    from PIL import Image
    for split, count in per_class.items():
        for name, photo in zip(["astronaut", "coffee", "cat"], small_photos(size + count)):
            folder = root / split / name
            folder.mkdir(parents=True)
            for k in range(count):
                Image.fromarray(photo[k:k + size, k:k + size]).save(folder / f"{k:02d}.jpg", quality=90)
    return root


def spoil(folder: Path) -> dict[str, str]:
    """The bad files of the issue, added to an ImageFolder split: {path: word of its reason}."""
    whole = (folder / "cat" / "00.jpg").read_bytes()
    (folder / "cat" / "00.jpg").write_bytes(whole[:len(whole) // 2])  # truncated
    (folder / "coffee" / "empty.jpg").write_bytes(b"")
    (folder / "coffee" / "text.jpg").write_text("a text file with an image name\n")
    (folder / "coffee" / "notes.txt").write_text("not an image: no loader reads it\n")
    (folder / "astronaut" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    return {str(folder / "cat" / "00.jpg"): "truncated", str(folder / "coffee" / "empty.jpg"): "empty",
            str(folder / "coffee" / "text.jpg"): "identify"}


def saved_run_folder(run_dir: Path, saved: dict) -> None:
    """A run folder as an older version of the trainer left it after one epoch of one process:
    `saved` (a config as a dict, edited to the old shape) in the folder and in its checkpoint."""
    import json

    from omegaconf import OmegaConf

    checkpoint = run_dir / "checkpoints" / "epoch_0001"
    checkpoint.mkdir(parents=True)
    for folder in (run_dir, checkpoint):
        (folder / "config.yaml").write_text(OmegaConf.to_yaml(saved))
    (checkpoint / "train_state.json").write_text(json.dumps({"epoch": 1, "step": 22, "processes": 1}))
