"""The product end to end on the embedded digits set: learning, outputs, export, other methods and loaders."""
import importlib.util
import json
import sys

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file
from torchvision.utils import save_image

from conftest import REPO, digits_val_batch, run_train, tool_in_process, torch_default_threads, train_in_process
from train.model_loading import load_checkpoint_model
from train.tracking import PANEL_PADDING, perturbation_panel


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


def panel_images(path) -> list[torch.Tensor]:
    """A panel's rows (clean, adversarial, perturbation), each N×3×S×S uint8, cut on its own grid:
    S-pixel images with PANEL_PADDING pixels around and between them."""
    panel = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)
    pad, (height, width) = PANEL_PADDING, panel.shape[1:]
    cell = (height - pad) // 3  # one image and its padding
    assert 3 * cell + pad == height and (width - pad) % cell == 0, f"{path} is not a 3-row grid"
    return [torch.stack([panel[:, row * cell + pad:(row + 1) * cell, column * cell + pad:(column + 1) * cell]
                         for column in range((width - pad) // cell)]) for row in range(3)]


def assert_attacked(clean, adversarial, delta, eps: int) -> None:
    changed = (adversarial.int() - clean.int()).abs()
    assert changed.amax() > 0, "the attack changed no image"
    assert changed.amax() <= eps, "the perturbation is larger than ε"
    assert delta.float().std() > 0, "the perturbation row is flat"


def test_demo_writes_adversarial_panels(trained_demo_run):
    panels = sorted((trained_demo_run / "panels").glob("step_*.png"))
    assert panels
    clean, adversarial, delta = panel_images(panels[0])
    assert clean.shape[1:] == (3, 32, 32)  # the demo's digits
    assert_attacked(clean, adversarial, delta, eps=4)  # attack.eps=4 in configs/demo.yaml


def test_panel_check_fails_for_an_attack_that_changes_nothing(digits_root, tmp_path):
    images, _ = digits_val_batch(digits_root, 8)
    save_image(perturbation_panel(images, images.clone()), tmp_path / "panel.png")
    clean, adversarial, delta = panel_images(tmp_path / "panel.png")
    assert torch.equal(clean, (images * 255).round().to(torch.uint8))  # the grid is read where it is
    with pytest.raises(AssertionError, match="changed no image"):
        assert_attacked(clean, adversarial, delta, eps=4)
    assert delta.unique().tolist() == [128]  # grey: no change


def test_exports_load_strict_into_plain_timm(trained_demo_run, digits_root, tmp_path):
    out = tmp_path / "best"
    tool_in_process("export.py", trained_demo_run / "checkpoints" / "best", out, check=True)
    trained, cfg, classes = load_checkpoint_model(trained_demo_run / "checkpoints" / "best")
    images, _ = digits_val_batch(digits_root, 32)
    plain = timm.create_model(cfg.model, num_classes=len(classes)).eval()
    plain.load_state_dict(load_file(str(out / "model.safetensors")), strict=True)
    with torch.no_grad():
        expected = trained(images)
        torch.testing.assert_close(plain((images - trained.mean) / trained.std), expected)
    final = timm.create_model(cfg.model, num_classes=len(classes))
    final.load_state_dict(load_file(str(trained_demo_run / "final_model" / "model.safetensors")), strict=True)


LOADERS = [loader for loader, module in (("torchvision", "torchvision"), ("dali", "nvidia.dali"), ("ffcv", "ffcv"))
           if importlib.util.find_spec(module) is not None]


@pytest.fixture(scope="module")
def vanilla_runs(digits_root, tmp_path_factory) -> dict:
    """Vanilla training of timm's small test ResNet on the digits, 4 epochs, on every installed loader."""
    runs = {}
    for loader in LOADERS:
        run_dir = tmp_path_factory.mktemp(f"vanilla_{loader}") / "run"
        train_in_process(f"data.root={digits_root}", f"output_dir={run_dir}", "tracker=none", "method=vanilla",
                         f"loader={loader}", "model=test_resnet", "epochs=4", "eval_robust=false",
                         "image_log_every=0", "data.dali.threads=2")
        runs[loader] = run_dir
    return runs


def test_vanilla_method_learns(vanilla_runs):
    summary = json.loads((vanilla_runs["torchvision"] / "summary.json").read_text())
    assert summary["clean_top1"] >= 90
    state = load_file(str(vanilla_runs["torchvision"] / "checkpoints" / "last" / "model.safetensors"))
    assert not any(".aux." in key for key in state)  # vanilla trains a plain model


@pytest.mark.parametrize("loader", [loader for loader in LOADERS if loader != "torchvision"])
def test_every_loader_trains_the_digits_like_torchvision(vanilla_runs, digits_root, loader):
    """The same run on DALI and FFCV: each val digit once, labels lined up with their images; DALI
    reaches torchvision's accuracy (FFCV stores half the images as JPEG: its bar is lower)."""
    reports = {name: json.loads((vanilla_runs[name] / "summary.json").read_text()) for name in ("torchvision", loader)}
    assert reports[loader]["val_images"] == reports["torchvision"]["val_images"] == 360
    assert reports[loader]["environment"]["loader"] == loader
    assert reports[loader]["clean_top1"] > (85 if loader == "dali" else 80), reports[loader]
    if loader == "dali":
        assert abs(reports[loader]["clean_top1"] - reports["torchvision"]["clean_top1"]) < 5
    if loader == "ffcv":  # converted on first use, beside the data
        assert (digits_root / "ffcv" / "train.beton").is_file()


README_LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "accelerate_config.yaml")]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the run leaves the launcher's threads alone")
@pytest.mark.parametrize("omp_num_threads", [None, "1"])
def test_readme_launch_command_uses_the_cpu_cores_unless_told(few_digits, tmp_path, monkeypatch, omp_num_threads):
    """The README's `accelerate launch --config_file accelerate_config.yaml train/run.py`: the launcher
    exports OMP_NUM_THREADS=1 by default; on a CPU the run uses the cores, unless the user set it."""
    cores = torch_default_threads()
    if omp_num_threads is None and cores < 2:
        pytest.skip("one core: one thread is all there is")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    if omp_num_threads:
        monkeypatch.setenv("OMP_NUM_THREADS", omp_num_threads)
    run_train(f"data.root={few_digits}", f"output_dir={tmp_path}", "tracker=none", "model=test_resnet",
              "method=vanilla", "epochs=1", "eval_robust=false", launcher=README_LAUNCH)
    environment = json.loads((tmp_path / "summary.json").read_text())["environment"]
    expected = int(omp_num_threads or cores)
    assert environment["cpu_threads"] == expected and environment["device"].endswith(f", {expected} threads)")
