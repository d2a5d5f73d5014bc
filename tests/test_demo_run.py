"""The product end to end on the embedded digits set: learning, outputs, export, other methods."""
import json
import subprocess
import sys

import timm
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import REPO, digits_val_batch, run_train
from train.checkpoint import load_checkpoint_model


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_default_demo_learns_digits(trained_demo_run):
    summary = json.loads((trained_demo_run / "summary.json").read_text())
    assert summary["clean_top1"] >= 90
    assert summary["val_images"] == 360
    assert 0 <= summary["robust_top1"] <= summary["clean_top1"]
    assert summary["train_img_per_s"] > 0
    evals = [line for line in read_jsonl(trained_demo_run / "metrics.jsonl") if "val/top1" in line]
    assert [line["epoch"] for line in evals] == list(range(1, 9))
    assert all(0 <= line["val/top5"] <= 100 and line["val/top5"] >= line["val/top1"] for line in evals)
    train = [line for line in read_jsonl(trained_demo_run / "metrics.jsonl") if "train/loss/adv" in line]
    assert train[-1]["train/loss/clean"] < train[0]["train/loss/clean"]
    best = json.loads((trained_demo_run / "checkpoints" / "best" / "train_state.json").read_text())
    assert best["best_top1"] == max(line["val/top1"] for line in evals)
    assert (trained_demo_run / "config.yaml").read_text().count("method: advprop") == 1


def test_demo_writes_adversarial_panels(trained_demo_run):
    panels = sorted((trained_demo_run / "panels").glob("step_*.png"))
    assert panels
    rows = Image.open(panels[0]).convert("RGB")
    clean, adversarial, delta = (torch.tensor(list(rows.crop((0, r * 35, rows.width, r * 35 + 35)).getdata()))
                                 .float() for r in range(3))
    assert not torch.equal(clean, adversarial)  # the attack changed the images
    assert delta.std() > 0


def test_exports_load_strict_into_plain_timm(trained_demo_run, digits_root, tmp_path):
    out = tmp_path / "best.safetensors"
    subprocess.run([sys.executable, str(REPO / "tools" / "export.py"),
                    str(trained_demo_run / "checkpoints" / "best"), str(out)], check=True)
    trained, cfg, classes = load_checkpoint_model(trained_demo_run / "checkpoints" / "best")
    images, _ = digits_val_batch(digits_root, 32)
    plain = timm.create_model(cfg.model, num_classes=len(classes)).eval()
    plain.load_state_dict(load_file(str(out)), strict=True)
    with torch.no_grad():
        expected = trained(images)
        torch.testing.assert_close(plain((images - trained.mean) / trained.std), expected)
    final = timm.create_model(cfg.model, num_classes=len(classes))
    final.load_state_dict(load_file(str(trained_demo_run / "final_main_bn.safetensors")), strict=True)


def test_vanilla_method_learns(digits_root, tmp_path):
    run_train(f"data.root={digits_root}", f"output_dir={tmp_path}", "tracker=none", "method=vanilla",
              "model=test_resnet", "epochs=4", "eval_robust=false")  # timm's small test ResNet: seconds
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["clean_top1"] >= 90
    state = load_file(str(tmp_path / "checkpoints" / "last" / "model.safetensors"))
    assert not any(".aux." in key for key in state)  # vanilla trains a plain model


def test_wandb_offline_run_resumes_into_the_same_run(digits_root, tmp_path):
    common = [f"data.root={digits_root}", f"output_dir={tmp_path}", "tracker=wandb", "method=vanilla",
              "eval_robust=false"]
    run_train(*common, "epochs=1")
    run_id = (tmp_path / "wandb_id.txt").read_text().strip()
    run_train(*common, "epochs=2")  # resume=auto: the second epoch
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(run_id) for r in runs)
    assert all(list(r.glob("*.wandb")) for r in runs)
