"""Bad input: one clear line naming the problem, exit code 2, nothing written or overwritten."""
import shutil

import pytest

from conftest import run_train


@pytest.mark.parametrize("override, named", [
    ("nonsense=1", "nonsense"), ("epochs=abc", "epochs"), ("method=magic", "method"),
    ("attack.eps=-1", "attack.eps"), ("data.nonsense=3", "nonsense"), ("epochs", "key=value"),
    ("model=resnet_18", "closest: resnet18"), ("pretrained_path=/nonexistent/w.pth", "pretrained_path"),
    ("eval_attack.targeted=true", "targeted"),
    ("model=test_nfnet", "test_nfnet has no BatchNorm, LayerNorm"),  # advprop needs norms to duplicate
])
def test_bad_config_is_one_clear_error(override, named, tmp_path):
    result = run_train(override, f"output_dir={tmp_path / 'run'}", check=False)
    assert result.returncode == 2
    assert named in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_missing_data_folder(tmp_path):
    result = run_train("data.dataset=imagefolder", f"data.root={tmp_path / 'nowhere'}",
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
    result = run_train(f"data.root={digits_root}", f"output_dir={run_dir}", f"resume={damaged}",
                       "tracker=none", check=False)
    assert result.returncode == 2 and "cannot be loaded" in result.stderr and str(damaged) in result.stderr
    assert sorted(p.name for p in run_dir.iterdir()) == ["metrics.jsonl"]
    assert (run_dir / "metrics.jsonl").read_text() == '{"step": 1}\n'
