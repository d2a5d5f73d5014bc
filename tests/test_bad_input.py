"""Bad input: one clear line naming the problem, exit code 2, nothing written or overwritten.
The runs are train/run.py's command line in this process (train_in_process); one test runs the
script itself, for the exit status and the line a shell sees."""
import contextlib
import os
import shutil
import subprocess

import pytest

from conftest import DEMO_RUN, one_error_line, run_train, train_in_process


def test_the_script_exits_2_with_one_line(tmp_path):
    """The exit status and stderr as a shell sees them (the in-process runs share the mapping)."""
    result = run_train("epochs=abc", f"output_dir={tmp_path / 'run'}", check=False)
    assert "epochs" in one_error_line(result)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override, named", [
    ("nonsense=1", "nonsense"), ("epochs=abc", "epochs"), ("method=magic", "method"),
    ("attack.eps=-1", "attack.eps"), ("data.nonsense=3", "nonsense"), ("epochs", "key=value"),
    ("model=resnet_18", "closest: resnet18"), ("pretrained_path=/nonexistent/w.pth", "pretrained_path"),
    ("eval_attack.targeted=true", "targeted"),
    ("model=test_nfnet", "test_nfnet has no BatchNorm, LayerNorm"),  # advprop needs norms to duplicate
    # settings that used to fail only once training ran (or never: a NaN LR wrote NaN weights)
    ("optimizer.lr_per_256=nan", "optimizer.lr_per_256: nan must be a finite number"),
    ("optimizer.lr_per_256=inf", "optimizer.lr_per_256: inf must be a finite number"),
    ("optimizer.lr_per_256=-1", "optimizer.lr_per_256: -1.0 must be ≥ 0"),
    ("log_every=0", "log_every: 0 must be ≥ 1"),
    ("data.workers=-1", "data.workers: -1 must be ≥ 0"),
    ("attack.eps=1000", "attack.eps: 1000.0 must be ≤ 255 (pixel units"),
    ("attack.steps=0", "attack.steps: 0 must be ≥ 1 with method=advprop"),
])
def test_bad_config_is_one_clear_error(override, named, tmp_path):
    result = train_in_process(override, f"output_dir={tmp_path / 'run'}", check=False)
    assert named in one_error_line(result)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("content, named", [
    (b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR", "is not a YAML recipe: it is not text"),
    (b"model: resnet18\nattack: {eps: 4\n", "is not valid YAML"),
    (b"- model=resnet18\n- epochs=2\n", "holds a list, not a mapping of keys"),
])
def test_a_recipe_that_is_not_a_yaml_mapping_is_one_clear_error(content, named, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes(content)
    result = train_in_process(f"config={recipe}", f"output_dir={tmp_path / 'run'}", check=False)
    assert f"config file {recipe} {named}" in one_error_line(result)
    assert not (tmp_path / "run").exists()


@contextlib.contextmanager
def read_only(folder):
    """folder made read-only for this process: a read-only bind mount as root (permission bits do
    not stop root), its mode bits otherwise."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield
        folder.chmod(0o755)
        return
    if subprocess.run(["mount", "--bind", str(folder), str(folder)], capture_output=True).returncode:
        pytest.skip("cannot bind-mount here")
    try:
        if subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)], capture_output=True).returncode:
            pytest.skip("cannot remount read-only here")
        yield
    finally:
        subprocess.run(["umount", str(folder)])


def test_an_output_dir_that_cannot_hold_a_run_is_one_clear_error(digits_root, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    for output_dir, named in [(a_file, f"output_dir {a_file}: {a_file} is a file, not a folder"),
                              (a_file / "run", f"output_dir {a_file / 'run'}: {a_file} is a file, not a folder"),
                              ("/proc/advprop_run", "output_dir /proc/advprop_run cannot be created in /proc")]:
        result = train_in_process(f"data.root={digits_root}", f"output_dir={output_dir}", "tracker=none", check=False)
        assert named in one_error_line(result)
    assert a_file.read_text() == "not a folder"
    disk = tmp_path / "read_only_disk"
    disk.mkdir()
    with read_only(disk):
        result = train_in_process(f"data.root={digits_root}", f"output_dir={disk / 'run'}", "tracker=none", check=False)
        assert f"output_dir {disk / 'run'} cannot be created in {disk}" in one_error_line(result)
    assert list(disk.iterdir()) == []


def test_a_read_only_wandb_folder_is_one_clear_error(digits_root, tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "wandb").mkdir(parents=True)
    with read_only(run_dir / "wandb"):
        result = train_in_process(f"data.root={digits_root}", f"output_dir={run_dir}", "tracker=wandb", check=False)
        line = one_error_line(result)
        assert f"cannot write in {run_dir / 'wandb'}" in line and "tracker=none" in line
    assert [p.name for p in run_dir.iterdir()] == ["wandb"]


def test_missing_data_folder(tmp_path):
    result = train_in_process("data.dataset=imagefolder", f"data.root={tmp_path / 'nowhere'}",
                       f"output_dir={tmp_path / 'run'}", "tracker=none", check=False)
    assert result.returncode == 2 and "nowhere" in result.stderr and "does not exist" in result.stderr
    assert not (tmp_path / "run").exists()


def test_unreadable_checkpoint_overwrites_nothing(trained_demo_run, digits_root, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(trained_demo_run / "checkpoints" / "last", damaged)
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])  # a disk-full truncation
    run_dir = tmp_path / "existing"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    result = train_in_process(f"data.root={digits_root}", f"output_dir={run_dir}", *DEMO_RUN, f"resume={damaged}",
                              "tracker=none", check=False)
    assert result.returncode == 2 and "cannot be loaded" in result.stderr and str(damaged) in result.stderr
    assert sorted(p.name for p in run_dir.iterdir()) == ["metrics.jsonl"]
    assert (run_dir / "metrics.jsonl").read_text() == '{"step": 1}\n'


class RunsCode:
    """A pickle that would run a shell command when unpickled without weights_only."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_pretrained_weights_holding_code_are_refused_without_unsafe_advice(digits_root, tmp_path):
    import torch

    weights, marker = tmp_path / "weights.pth", tmp_path / "code-ran"
    torch.save({"conv1.weight": RunsCode(marker)}, weights)
    result = train_in_process(f"data.root={digits_root}", f"output_dir={tmp_path / 'run'}", "tracker=none",
                       f"pretrained_path={weights}", check=False)
    line = one_error_line(result)
    assert f"cannot read weights {weights}: it holds pickled objects other than tensors (it would call " \
           f"posix.system): refused, never run" in line
    assert "weights_only=False" not in result.stderr and not marker.exists() and not (tmp_path / "run").exists()
