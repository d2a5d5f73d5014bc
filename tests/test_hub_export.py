"""A trained model shared the way timm users do: the run's export folder (timm's Hub layout and a
model card) loads with timm alone and, through timm's own transform, scores the top-1 the run
reported; tools/export.py writes the same folder and refuses an upload it cannot make with one line;
the folder (model=local-dir:…) starts a run with its own preprocessing; misspelt model names are
refused before any data is prepared."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import REPO, one_error_line, tool_in_process, train_in_process
from models.hub import CONFIG_FILE, WEIGHTS_FILE

# the export's preprocessing differs from configs/demo.yaml's (imagenet, crop ratio 1.0), so a run
# that starts from it shows whose it took; at 32 px a crop ratio of 0.875 resizes to round(36.6) = 37
HUB_RUN = ["model=test_resnet", "epochs=2", "attack.steps=1", "tracker=none", "normalization=inception",
           "data.crop_ratio=0.875", "image_log_every=0"]


@pytest.fixture(scope="module")
def hub_run(digits_root, tmp_path_factory):
    """AdvProp (dual norms: the export keeps the main ones) on the whole digits set: ~95 % top-1 in
    2 epochs of timm's test ResNet (16-28 s on this 2-core machine), so an equal top-1 through timm's
    pipeline is no accident; the tests of this file share it."""
    run_dir = tmp_path_factory.mktemp("hub") / "run"
    train_in_process(f"data.root={digits_root}", f"output_dir={run_dir}", *HUB_RUN)
    return run_dir


def timm_top1(folder, val_folder) -> tuple[float, int]:
    """(top-1 %, images) of the export `folder` on an ImageFolder, with timm and torchvision only."""
    import timm
    from torchvision.datasets import ImageFolder

    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    data = ImageFolder(val_folder, transform=transform)
    assert model.pretrained_cfg["label_names"] == data.classes  # output i is the folder's class i
    correct = 0
    with torch.no_grad():
        for images, labels in torch.utils.data.DataLoader(data, batch_size=120):
            correct += int((model(images).argmax(1) == labels).sum())
    return 100 * correct / len(data), len(data)


def assert_timm_reproduces_the_run(run_dir, val_folder) -> None:
    """The run's final_model/, loaded and preprocessed by timm alone, scores the clean top-1 the run
    reported, within one image."""
    reported = json.loads((run_dir / "summary.json").read_text())["clean_top1"]
    top1, images = timm_top1(run_dir / "final_model", val_folder)
    assert reported >= 80, reported  # a trained model: agreement is not the agreement of chance
    assert abs(top1 - reported) <= 100 / images + 1e-9, (top1, reported)


def test_timm_alone_scores_the_top1_the_run_reported(hub_run, digits_root):
    assert_timm_reproduces_the_run(hub_run, digits_root / "val")
    export = hub_run / "final_model"
    assert sorted(p.name for p in export.iterdir()) == ["README.md", CONFIG_FILE, WEIGHTS_FILE]
    assert not [p for p in hub_run.iterdir() if p.name.startswith(".")]  # no temporary folder left
    config = json.loads((export / CONFIG_FILE).read_text())
    pretrained = config["pretrained_cfg"]
    assert (config["architecture"], config["num_classes"]) == ("test_resnet", 10)
    assert (pretrained["mean"], pretrained["std"], pretrained["input_size"]) == ([0.5] * 3, [0.5] * 3, [3, 32, 32])
    assert int(32 / pretrained["crop_pct"]) == 37 and pretrained["interpolation"] == "bilinear"
    assert "tag" not in pretrained and "license" not in pretrained  # timm's own weights' facts are not ours


def test_the_model_card(hub_run):
    from huggingface_hub import ModelCard

    card = ModelCard.load(hub_run / "final_model" / "README.md")
    summary = json.loads((hub_run / "summary.json").read_text())
    assert card.data.library_name == "timm" and card.data.datasets == ["digits"] and card.data.metrics == ["accuracy"]
    assert {"adversarial-training", "advprop", "image-classification"} <= set(card.data.tags)
    results = {r.metric_name: r.metric_value for r in card.data.eval_results}
    assert results["clean top-1"] == round(summary["clean_top1"], 2)
    assert results[f"robust top-1 ({summary['robust_attack']})"] == round(summary["robust_top1"], 2)
    for words in ("training attack: PGD-1 eps=4/255", "targeted (random target classes)", "train/run.py config=config.yaml",
                  "model: test_resnet", "main norms", 'timm.create_model("local-dir:', "crop_pct 0.8649"):
        assert words in card.text, words


def test_tools_export_writes_the_same_folder_and_evaluate_reads_it(hub_run, digits_root, tmp_path):
    """tools/evaluate.py takes the folder; its report goes into the card of tools/export.py's folder."""
    from common.exit_status import run_entry_point
    from tools import evaluate, export

    report = tmp_path / "eval.json"
    assert evaluate.main([str(hub_run / "final_model"), "--data", str(digits_root / "val"), "--workers", "0",
                          "--attack", "pgd", "eps=4", "steps=1", "--json", str(report)]) == 0
    evaluated = json.loads(report.read_text())
    assert evaluated["clean"]["top1"] == pytest.approx(json.loads((hub_run / "summary.json").read_text())["clean_top1"])

    out = tmp_path / "shared"
    assert run_entry_point(export.main, [str(hub_run / "checkpoints" / "last"), str(out),
                                         "--eval-report", str(report)]) == 0
    final = json.loads((hub_run / "final_model" / CONFIG_FILE).read_text())
    assert json.loads((out / CONFIG_FILE).read_text()) == final  # one format: the run's last = the run's end
    assert f"| {evaluated['robust'][0]['attack']} | robust top-1 | {evaluated['robust'][0]['top1']:.2f} |" in \
        (out / "README.md").read_text()
    assert run_entry_point(export.main, [str(hub_run), str(out)]) == 2  # there already: --overwrite
    assert run_entry_point(export.main, [str(hub_run), str(out), "--overwrite"]) == 0

    from huggingface_hub import ModelCard  # an earlier epoch's card: that epoch's validation, not the run's end
    early = tmp_path / "epoch1"
    assert run_entry_point(export.main, [str(hub_run / "checkpoints" / "epoch_0001"), str(early)]) == 0
    lines = [json.loads(line) for line in (hub_run / "metrics.jsonl").read_text().splitlines()]
    validated = next(line for line in lines if line.get("epoch") == 1 and "val/top1" in line)
    card = ModelCard.load(early / "README.md")
    assert {r.metric_name: r.metric_value for r in card.data.eval_results} == {
        "clean top-1": round(validated["val/top1"], 2)}
    assert "measured by the validation after epoch 1" in card.text


@pytest.fixture
def hub_offline(monkeypatch, tmp_path):
    """huggingface_hub offline (it reads HF_HUB_OFFLINE at import) and without a stored token."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no_token"))
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)


def test_push_without_a_token_or_a_network_is_one_line(hub_run, tmp_path, hub_offline, monkeypatch, capsys):
    from common.exit_status import run_entry_point
    from tools import export

    out = tmp_path / "shared"
    assert run_entry_point(export.main, [str(hub_run), str(out), "--push-to-hub", "someone/advprop-digits"]) == 2
    assert "no Hugging Face token" in capsys.readouterr().err and not out.exists()  # checked before any work

    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    assert run_entry_point(export.main, [str(hub_run), "--push-to-hub", "someone/advprop-digits", "--private"]) == 2
    printed = capsys.readouterr()
    assert printed.out.startswith("uploading README.md, config.json, model.safetensors (")
    assert "to https://huggingface.co/someone/advprop-digits (private)" in printed.out
    errors = printed.err.strip().splitlines()
    assert len(errors) == 1 and "offline mode is enabled" in errors[0] and "nothing was uploaded" in errors[0]


def test_an_export_starts_a_run_with_its_own_preprocessing(hub_run, few_digits, tmp_path):
    from safetensors.torch import load_file

    from models.dual_norm import export_main_norm
    from models.factory import create_model
    from train.config import load_config

    export = hub_run / "final_model"
    cfg = load_config([f"data.root={few_digits}", f"model=local-dir:{export}", "method=advprop"])
    assert (cfg.model, cfg.pretrained_path) == ("test_resnet", f"local-dir:{export.resolve()}")
    assert cfg.normalization == "inception" and round(32 / cfg.data.crop_ratio) == 37  # not the recipe's
    later = load_config([f"model=local-dir:{export}", "data.crop_ratio=1.0"])  # keys after it win
    assert later.data.crop_ratio == 1.0 and later.normalization == "inception"

    started = export_main_norm(create_model(cfg, 10, dual_norm=True).net)
    shared = load_file(str(export / WEIGHTS_FILE))
    assert started.keys() == shared.keys() and all(torch.equal(started[k], shared[k]) for k in shared)

    run_dir = tmp_path / "finetuned"
    train_in_process(f"data.root={few_digits}", f"output_dir={run_dir}", f"model=local-dir:{export}", "epochs=1",
                     "method=vanilla", "tracker=none", "eval_robust=false", "optimizer.lr_per_256=0.01")
    assert json.loads((run_dir / "summary.json").read_text())["clean_top1"] >= 80  # 4 small steps from ~95 %


def test_a_recipe_naming_an_export_takes_its_preprocessing_and_other_constants_need_normalization(hub_run, tmp_path):
    import shutil

    from common.errors import UserInputError
    from train.config import load_config

    recipe = tmp_path / "finetune.yaml"
    recipe.write_text(f"base: {REPO / 'configs' / 'demo.yaml'}\nmodel: local-dir:{hub_run / 'final_model'}\n"
                      f"normalization: imagenet\n")
    cfg = load_config([f"config={recipe}"])
    assert cfg.normalization == "inception" and round(32 / cfg.data.crop_ratio) == 37  # the folder's, not the recipe's
    assert load_config([f"config={recipe}", "normalization=imagenet"]).normalization == "imagenet"  # the command line's

    clip = tmp_path / "clip_like"  # mean/std that are neither ImageNet's nor 0.5
    shutil.copytree(hub_run / "final_model", clip)
    config = json.loads((clip / CONFIG_FILE).read_text())
    config["pretrained_cfg"].update(mean=[0.4815, 0.4578, 0.4082], std=[0.2686, 0.2613, 0.2758])
    (clip / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(UserInputError, match="neither imagenet nor inception: give normalization=… after it"):
        load_config([f"model=local-dir:{clip}"])
    assert load_config([f"model=local-dir:{clip}", "normalization=imagenet"]).normalization == "imagenet"


@pytest.mark.parametrize("model, named", [
    ("resnt18", "'resnt18' is not a timm model; closest: resnet18"),
    ("local-dir:/nonexistent/model", "names /nonexistent/model, which is not there"),
    ("local-dir:{empty}", "which has no config.json"),
    ("hf-hub:nobody/nothing-here", "cannot read the config.json of hf-hub:nobody/nothing-here"),
    ("hf-hub:no-user-part", "must be hf-hub:USER/NAME"),
])
def test_a_bad_model_name_is_refused_before_any_data(model, named, tmp_path, hub_offline):
    (tmp_path / "empty").mkdir()
    data = tmp_path / "digits"  # the digits set is built on first use: not for a run refused first
    result = train_in_process(f"data.root={data}", f"output_dir={tmp_path / 'run'}",
                              f"model={model.format(empty=tmp_path / 'empty')}", check=False)
    assert named in one_error_line(result) and "bad value for model" in one_error_line(result)
    assert not data.exists() and not (tmp_path / "run").exists()


def test_evaluate_refuses_an_hf_hub_model_it_cannot_fetch(digits_root, hub_offline):
    result = tool_in_process("evaluate.py", "hf-hub:nobody/nothing-here", "--data", digits_root / "val")
    assert "cannot read the config.json of hf-hub:nobody/nothing-here" in one_error_line(result)


PREPROCESSING = {"input_size": (3, 32, 32), "crop_pct": 1.0, "crop_mode": "center", "interpolation": "bilinear",
                 "mean": (0.5,) * 3, "std": (0.5,) * 3}


def dual_norm_net(name: str, **kwargs):
    from models.dual_norm import convert_dual_norm
    from models.factory import create_net

    torch.manual_seed(0)
    net = create_net(name, 10, **kwargs)
    convert_dual_norm(net)
    return net.eval()


def test_a_bn_eps_of_the_run_travels_where_timm_can_build_it(tmp_path):
    """The EfficientNet recipes' bn_eps: config.json's model_args carry it, so timm's model computes
    the trained logits (a ResNet, which takes no bn_eps, is exported with a warning saying so)."""
    import timm

    from models.export import save_export

    net = dual_norm_net("test_efficientnet", bn_eps=1e-2)
    save_export(net, tmp_path / "b", classes=list("0123456789"), data_config=PREPROCESSING, card="card")
    assert json.loads((tmp_path / "b" / CONFIG_FILE).read_text())["model_args"]["bn_eps"] == 1e-2
    images = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(timm.create_model(f"local-dir:{tmp_path / 'b'}", pretrained=True).eval()(images),
                                   net(images))
    with pytest.warns(UserWarning, match="BatchNorm eps"):
        save_export(dual_norm_net("test_resnet", bn_eps=1e-2), tmp_path / "r", classes=list("0123456789"),
                    data_config=PREPROCESSING, card="card")


def test_an_export_that_fails_midway_leaves_the_previous_one(tmp_path, monkeypatch):
    from models import export

    target = tmp_path / "model"
    export.save_export(dual_norm_net("test_resnet"), target, classes=list("0123456789"), data_config=PREPROCESSING,
                       card="the first")
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def disk_full(model, folder, **kwargs):  # timm's save_for_hf makes the folder, then writes the weights
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export, "save_for_hf", disk_full)
    with pytest.raises(OSError, match="No space left"):
        export.save_export(dual_norm_net("test_resnet"), target, classes=list("0123456789"),
                           data_config=PREPROCESSING, card="the second")
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary folder left
