"""pretrained_path: a local weights file starts the model (a fresh head where the classes differ);
weights that do not fit the model are refused with one line, before anything is written."""
import timm
import torch
from safetensors.torch import save_file

from conftest import one_error_line, train_in_process
from models.factory import create_model


def test_weights_from_a_safetensors_file_start_the_model(demo_cfg, tmp_path):
    torch.manual_seed(1)
    source = timm.create_model("test_resnet", num_classes=10)
    save_file(source.state_dict(), tmp_path / "w.safetensors")
    model = create_model(demo_cfg("model=test_resnet", f"pretrained_path={tmp_path / 'w.safetensors'}"), 10,
                         dual_norm=False)
    loaded, saved = model.net.state_dict(), source.state_dict()
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)


def test_a_checkpoint_of_other_classes_keeps_a_fresh_head(demo_cfg, tmp_path):
    """A DDP-saved torch file ({"state_dict": {"module.…"}}) of a 1000-class model, for 10 classes."""
    torch.manual_seed(1)
    source = timm.create_model("test_resnet", num_classes=1000)
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, tmp_path / "w.pth")
    model = create_model(demo_cfg("model=test_resnet", f"pretrained_path={tmp_path / 'w.pth'}", "method=advprop"),
                         10, dual_norm=True)
    saved = source.state_dict()
    assert model.net.get_classifier().weight.shape == (10, saved["fc.weight"].shape[1])
    for key, value in model.net.state_dict().items():
        plain = key.replace(".main.", ".").replace(".aux.", ".")  # both norm copies start from the file
        if not plain.startswith("fc."):
            assert torch.equal(value, saved[plain]), key


def test_weights_of_another_model_are_refused_with_one_line(digits_root, tmp_path):
    save_file(timm.create_model("test_resnet", num_classes=10).state_dict(), tmp_path / "w.safetensors")
    result = train_in_process(f"data.root={digits_root}", f"output_dir={tmp_path / 'run'}", "tracker=none",
                              "model=test_vit", f"pretrained_path={tmp_path / 'w.safetensors'}", check=False)
    line = one_error_line(result)
    assert "pretrained_path" in line and "does not fit" in line
    assert not (tmp_path / "run").exists()
