"""Mixup/CutMix, random erasing and repeated augmentation in real runs of train/run.py: a run resumed
from a mid-epoch checkpoint equals the uninterrupted one bit for bit with every option on; advprop
and fast_advprop train with them on every loader; a bad value stops before any work."""
import json

import pytest
from safetensors.torch import load_file

from conftest import train_in_process

pytestmark = pytest.mark.slow  # short runs of a tiny model: ~20 s each on one CPU thread (44 steps: enough to
# tell learning from chance with every augmentation on)

EVERY_OPTION = ["data.mixup=0.8", "data.cutmix=1.0", "data.mix_switch_prob=0.5", "label_smoothing=0.1",
                "data.random_erasing=0.25", "data.repeated_aug=3"]
SHORT = ["tracker=none", "model=test_resnet", "epochs=2", "attack=pgd1", "eval_robust=false", "log_every=1",
         "image_log_every=0"]


def step_losses(run_dir):
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {line["step"]: (line["train/loss/clean"], line["train/loss/adv"]) for line in lines
            if "train/loss/clean" in line}


def test_mid_epoch_resume_with_every_option_on_is_bit_exact(digits_root, tmp_path, monkeypatch):
    """The mix (numpy's RNG), the erasing (python's and torch's), the attack's targets outside the
    mix (torch's) and the repeated-augmentation order resume where they were: a run continued from
    its step-30 checkpoint (epoch 2, batch 8) ends with the uninterrupted run's weights."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    args = [f"data.root={digits_root}", *SHORT, *EVERY_OPTION, "data.mix_mode=elem", "advprop.mix_attacked=true",
            "checkpoint_every_steps=30"]
    straight = tmp_path / "straight"
    train_in_process(*args, f"output_dir={straight}")
    checkpoint = straight / "checkpoints" / "step_00000030"
    state = json.loads((checkpoint / "train_state.json").read_text())
    assert (state["epoch"], state["batch"]) == (1, 8)  # mid-epoch: 22 batches an epoch
    resumed = tmp_path / "resumed"
    out = train_in_process(*args, f"output_dir={resumed}", f"resume={checkpoint}")
    assert "resuming from" in out.stdout
    a, b = (load_file(str(d / "checkpoints" / "last" / "model.safetensors")) for d in (straight, resumed))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    later = {step: losses for step, losses in step_losses(straight).items() if step > 30}
    assert step_losses(resumed) == later and len(later) == 14  # every later step's losses, bit for bit


# Each dual-norm method on every loader (advprop on torchvision is the resume test above): the
# batch augmentation runs after the loader, in the loop, so a loader meets it only through its
# batches and repeated copies.
@pytest.mark.parametrize("method, loader", [("fast_advprop", "torchvision"), ("advprop", "dali"),
                                            ("fast_advprop", "dali"), ("advprop", "ffcv"),
                                            ("fast_advprop", "ffcv")])
def test_dual_norm_methods_learn_with_every_option_on_every_loader(method, loader, digits_root, tmp_path,
                                                                   monkeypatch):
    if loader == "dali":
        pytest.importorskip("nvidia.dali")
    if loader == "ffcv":
        pytest.importorskip("ffcv")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    run_dir = tmp_path / "run"
    train_in_process(f"data.root={digits_root}", f"output_dir={run_dir}", f"loader={loader}", f"method={method}",
                     *(["attack.targeted=false"] if method == "fast_advprop" else []), *SHORT, *EVERY_OPTION,
                     "data.dali.threads=1")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["clean_top1"] >= 30, summary  # chance: 10 %: the loader's labels and images line up
    assert summary["val_images"] == 360 and summary["environment"]["loader"] == loader  # each val digit once
    losses = step_losses(run_dir)
    assert len(losses) == 44 and all(0 < clean < 10 and 0 < adv < 10 for clean, adv in losses.values())


def test_a_bad_value_stops_the_run_before_any_work(digits_root, tmp_path):
    run_dir = tmp_path / "run"
    out = train_in_process(f"data.root={digits_root}", f"output_dir={run_dir}", "tracker=none", "data.mixup=-0.5",
                           check=False)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == ["error: bad value for data.mixup: -0.5 must be ≥ 0 (Mixup's Beta α; "
                                               "0 → off)"]
    assert not run_dir.exists()
