"""tools/evaluate.py on real data: the trained demo run, the digits val set, folders built from it."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from conftest import old_single_file_export, tool_in_process
from common.errors import UserInputError
from tools.robustness import imagenet_c, sets
from tools.robustness.load import imagenet_wnids, load_any
from train.model_loading import checkpoint_folder


@pytest.fixture(scope="module")
def accelerator():
    from accelerate import Accelerator
    return Accelerator(cpu=True)


def context(source, accelerator, **kwargs) -> sets.EvalContext:
    model, cfg, classes = source if isinstance(source, tuple) else load_any(source)
    return sets.EvalContext(model, cfg, classes, accelerator, workers=0, **kwargs)


def run_cli(*args, cwd):
    return tool_in_process("evaluate.py", *args, cwd=cwd, env={"OMP_NUM_THREADS": "1"})


# ----------------------------------------------------------------------------------------------
# weight sources and clean accuracy

def test_checkpoint_export_and_run_folder_agree(trained_demo_run, digits_root, accelerator, one_thread):
    last = sets.clean(context(trained_demo_run / "checkpoints" / "last", accelerator), digits_root / "val")
    export = sets.clean(context(trained_demo_run / "final_model", accelerator), digits_root / "val")
    assert last["images"] == export["images"] == len(list((digits_root / "val").rglob("*.png")))
    assert export["top1"] == last["top1"] and export["top5"] == last["top5"]
    # the same images and transform as the training run's own final validation
    assert last["top1"] == pytest.approx(json.loads((trained_demo_run / "summary.json").read_text())["clean_top1"])
    assert checkpoint_folder(trained_demo_run).resolve() == (trained_demo_run / "checkpoints" / "best").resolve()


def test_export_away_from_its_run_keeps_the_val_geometry(trained_demo_run, tmp_path):
    moved = tmp_path / "model.safetensors"  # no config.yaml beside it: the metadata says the geometry
    old_single_file_export(trained_demo_run / "final_model", moved)  # a single-file export of before the folder
    _, cfg, classes = load_any(moved)
    assert (cfg.data.val_image_size, cfg.data.crop_ratio, cfg.model) == (32, 1.0, "test_resnet")  # the demo run's
    assert classes == [str(d) for d in range(10)]


def test_export_without_geometry_or_config_warns_and_uses_the_defaults(trained_demo_run, tmp_path):
    # an export from before the geometry was recorded
    old_single_file_export(trained_demo_run / "final_model", tmp_path / "old.safetensors", geometry=False)
    with pytest.warns(UserWarning, match="no config.yaml beside it"):
        _, cfg, _ = load_any(tmp_path / "old.safetensors")
    assert (cfg.data.image_size, cfg.data.crop_ratio) == (224, 0.875)


def test_plain_timm_state_dict_needs_model_and_fits_strictly(tmp_path):
    import timm
    from safetensors.torch import save_file

    net = timm.create_model("tf_efficientnet_b0.ap_in1k", pretrained=False)
    save_file(net.state_dict(), str(tmp_path / "b0_ap.safetensors"))
    with pytest.raises(UserInputError, match="--model"):
        load_any(tmp_path / "b0_ap.safetensors")
    model, cfg, classes = load_any(tmp_path / "b0_ap.safetensors", model_name="tf_efficientnet_b0.ap_in1k")
    assert cfg.normalization == "inception" and classes == imagenet_wnids() and len(set(classes)) == 1000
    assert cfg.data.val_image_size == 224 and cfg.data.crop_ratio == pytest.approx(0.875)
    with pytest.raises(UserInputError, match="does not fit"):
        load_any(tmp_path / "b0_ap.safetensors", model_name="resnet18")


# ----------------------------------------------------------------------------------------------
# ImageNet-C: synthesised, and an official-layout folder built from the digits

def test_synthesized_corruptions_from_digits(trained_demo_run, digits_root, accelerator, one_thread):
    ctx = context(trained_demo_run / "checkpoints" / "last", accelerator, limit=128)
    clean_error = 100 - sets.clean(ctx, digits_root / "val")["top1"]
    result = sets.synthesized_corruptions(ctx, digits_root / "val", ["gaussian_noise", "contrast"], [1, 5])
    assert set(result["errors"]) == {"gaussian_noise", "contrast"}
    assert all(set(e) == {1, 5} for e in result["errors"].values())
    assert "mce" not in result and result["normalized"] is False and result["complete"] is False
    values = [e for errors in result["errors"].values() for e in errors.values()]
    assert result["mean_corruption_error"] == pytest.approx(sum(values) / len(values))
    # the corruptions reach the model: the strongest noise hurts more than none and than the weakest
    noise = result["errors"]["gaussian_noise"]
    assert noise[5] > max(noise[1], clean_error)


def predictions(model, cfg, files) -> list[tuple[int, float]]:
    """(argmax, top-1 minus top-2 logit) of each image file through the val transform."""
    from pipelines.backends.torchvision.loader import image_transform
    transform = image_transform(cfg, "val")
    x = torch.stack([transform(Image.open(f).convert("RGB")) for f in files]).float() / 255
    with torch.no_grad():
        top2 = model(x).topk(2, dim=1)
    return list(zip(top2.indices[:, 0].tolist(), (top2.values[:, 0] - top2.values[:, 1]).tolist()))


def test_imagenet_c_folder_layout_and_mce(trained_demo_run, digits_root, accelerator, tmp_path, one_thread):
    """2 corruptions × 2 severities of digits, each image filed under the class the model predicts
    for it (counts as right) or under another class (wrong): the errors are known by construction."""
    model, cfg, classes = source = load_any(trained_demo_run / "checkpoints" / "last")
    files = sorted((digits_root / "val").rglob("*.png"))[::7]
    confident = [f for f, (_, margin) in zip(files, predictions(model, cfg, files)) if margin > 1.0]
    predicted = dict(zip(confident, (p for p, _ in predictions(model, cfg, confident))))
    wrong_counts = {("fog", 1): (1, 8), ("fog", 3): (4, 10), ("contrast", 2): (0, 6), ("contrast", 5): (7, 9)}
    root = tmp_path / "imagenet-c"
    for (corruption, severity), (wrong, total) in wrong_counts.items():
        for i, file in enumerate(confident[:total]):
            label = (predicted[file] + 1) % len(classes) if i < wrong else predicted[file]
            folder = root / corruption / str(severity) / classes[label]
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copy(file, folder / file.name)
    (root / "spatter" / "1" / "0").mkdir(parents=True)  # a held-out extra corruption: ignored

    result = sets.imagenet_c_folder(context(source, accelerator, batch_size=4), root, clean_error=5.0)
    expected = {c: {s: 100 * w / t for (c2, s), (w, t) in wrong_counts.items() if c2 == c} for c in ("fog", "contrast")}
    assert list(result["errors"]) == ["fog", "contrast"]  # the authors' order
    for corruption, errors in expected.items():
        assert result["errors"][corruption] == pytest.approx(errors)
    ce = {c: sum(e.values()) / len(e) / imagenet_c.ALEXNET_ERROR[c] for c, e in expected.items()}
    assert result["mce"] == pytest.approx(sum(ce.values()) / 2)
    relative = {c: (sum(e.values()) / len(e) - 5.0) / (imagenet_c.ALEXNET_ERROR[c] - imagenet_c.ALEXNET_CLEAN_ERROR)
                for c, e in expected.items()}
    assert result["relative_mce"] == pytest.approx(sum(relative.values()) / 2)
    assert result["complete"] is False
    zooming = OmegaConf.merge(cfg, {"data": {"crop_ratio": 0.5}})  # a val ratio that would crop away digits
    again = sets.imagenet_c_folder(context((model, zooming, classes), accelerator, batch_size=4), root, 5.0)
    assert again["errors"] == result["errors"]  # ImageNet-C images are evaluated whole (ratio 1)

    (root / "fog" / "6").mkdir()
    with pytest.raises(UserInputError, match="severity"):
        imagenet_c.read_layout(root)
    (root / "fog" / "6").rmdir()
    (root / "Fog").mkdir()
    with pytest.raises(UserInputError, match="Fog"):
        imagenet_c.read_layout(root)


def test_alexnet_table_is_the_published_one():
    """Hendrycks & Dietterich 2019, Table 1 (AlexNet's error per corruption, %) and the raw errors
    every public mCE implementation divides by (AugMix's imagenet.py: ALEXNET_ERR)."""
    published = {"gaussian_noise": 88.6, "shot_noise": 89.4, "impulse_noise": 92.3, "defocus_blur": 82.0,
                 "glass_blur": 82.6, "motion_blur": 78.6, "zoom_blur": 79.8, "snow": 86.7, "frost": 82.7,
                 "fog": 81.9, "brightness": 56.5, "contrast": 85.3, "elastic_transform": 64.6, "pixelate": 71.8,
                 "jpeg_compression": 60.7}
    augmix = [0.886428, 0.894468, 0.922640, 0.819880, 0.826268, 0.785948, 0.798360, 0.866816, 0.826572,
              0.819324, 0.564592, 0.853204, 0.646056, 0.717840, 0.606500]
    assert list(imagenet_c.ALEXNET_ERROR) == list(imagenet_c.CORRUPTIONS) == list(published)
    assert list(imagenet_c.ALEXNET_ERROR.values()) == augmix
    assert all(abs(100 * imagenet_c.ALEXNET_ERROR[c] - value) <= 0.05 + 1e-9 for c, value in published.items())
    assert round(100 * imagenet_c.ALEXNET_CLEAN_ERROR, 1) == 43.5  # the paper's clean error


# ----------------------------------------------------------------------------------------------
# ImageNet-A / -R: WordNet ids → 1000-class indices, argmax over the subset's logits

SUBSET = (5, 300, 900)  # ImageNet-1k indices the fake IN-A holds
DECOY = 1  # not in the subset


class GreyLevelModel(torch.nn.Module):
    """1000 logits: image j of the subset (grey level 40 + 60 j) gets its largest logit on DECOY and the
    second largest on its true class SUBSET[j], so only an argmax over the subset's logits is right."""

    def forward(self, x):
        j = ((x.mean(dim=(1, 2, 3)) * 255 - 40) / 60).round().long()
        logits = torch.zeros(len(x), 1000)
        logits[:, DECOY] = 10.0
        logits[torch.arange(len(x)), torch.tensor(SUBSET)[j]] = 5.0
        logits[:, SUBSET[0]] += 1.0  # a wrong subset class ahead of the rest
        return logits


def test_imagenet_a_subset_argmax(demo_cfg, accelerator, tmp_path):
    wnids = imagenet_wnids()
    root = tmp_path / "imagenet-a"
    for j, index in enumerate(SUBSET):
        (root / wnids[index]).mkdir(parents=True)
        for k in range(3 + j):
            Image.new("RGB", (20, 20), (40 + 60 * j,) * 3).save(root / wnids[index] / f"{k}.png")
    cfg = demo_cfg("data.image_size=16", "data.crop_ratio=1.0")
    result = sets.imagenet_subset(context((GreyLevelModel(), cfg, wnids), accelerator), root)
    assert result["images"] == 3 + 4 + 5 and result["classes"] == 3
    assert result["top1"] == 100.0
    full = sets.clean(context((GreyLevelModel(), cfg, wnids), accelerator), root)  # all 1000 logits: decoy wins
    assert full["top1"] == 0.0

    with pytest.raises(UserInputError, match="1000 ImageNet-1k"):
        sets.imagenet_subset(context((GreyLevelModel(), cfg, [str(i) for i in range(10)]), accelerator), root)


# ----------------------------------------------------------------------------------------------
# the command line

def test_cli_plain_state_dict_json_and_wandb(trained_demo_run, digits_root, accelerator, tmp_path, one_thread):
    from safetensors.torch import load_file
    torch.save(load_file(str(trained_demo_run / "final_model" / "model.safetensors")), tmp_path / "plain.pth")
    result = run_cli(tmp_path / "plain.pth", "--model", "test_resnet", "--image-size", "32", "--crop-ratio", "1",
                     "--data", digits_root / "val", "--attack", "pgd", "eps=4", "steps=1", "--workers", "0",
                     "--corrupt", "--corruptions", "contrast", "--severities", "2",
                     "--json", tmp_path / "out.json", "--wandb-run", "evaltest1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "out.json").read_text())
    direct = sets.clean(context(trained_demo_run / "final_model", accelerator), digits_root / "val")
    assert report["clean"]["top1"] == pytest.approx(direct["top1"])
    assert report["robust"][0]["top1"] <= report["clean"]["top1"] and report["errors"] == {}
    assert "clean val" in result.stdout and "PGD-1 eps=4/255" in result.stdout
    assert report["corrupted"]["errors"]["contrast"].keys() == {"2"}
    assert "UN-normalised" in result.stdout
    # the offline W&B run: the numbers table and the per-corruption bar chart's table
    tables = {tuple(t["columns"]): t["data"] for t in map(json.loads, map(Path.read_text, (tmp_path / "wandb").glob(
        "offline-run-*-evaltest1/files/media/table/**/*.table.json")))}
    assert dict(tables["metric", "value"])["eval/clean/top1"] == pytest.approx(report["clean"]["top1"])
    assert tables["corruption", "error"] == [["contrast", pytest.approx(report["corrupted"]["errors"]["contrast"]["2"])]]


def test_cli_bad_folder_keeps_earlier_results(trained_demo_run, digits_root, tmp_path):
    missing = tmp_path / "no-such-imagenet-c"
    result = run_cli(trained_demo_run, "--data", digits_root / "val", "--imagenet-c", missing,
                     "--stylized", digits_root / "val", "--limit", "64", "--workers", "0",
                     "--json", tmp_path / "out.json", cwd=tmp_path)
    assert result.returncode == 1
    assert str(missing) in result.stderr
    report = json.loads((tmp_path / "out.json").read_text())
    assert str(missing) in report["errors"]["imagenet_c"] and "imagenet_c" not in report
    assert report["clean"]["images"] == report["stylized"]["images"] == 64  # before and after the failure
    assert "FAILED imagenet_c" in result.stdout
