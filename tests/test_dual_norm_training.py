"""AdvProp beyond BatchNorm, end to end: advprop and fast_advprop train a small ViT (LayerNorm) and a
small ConvNeXt (LayerNorm2d, LayerNorm) on the digits demo set with train/run.py; the exported
main-norm weights load strictly into plain timm and tools/evaluate.py scores them exactly as the
run's own final evaluation did."""
import json

import pytest
import timm
from safetensors.torch import load_file

from conftest import tool_in_process, train_in_process

pytestmark = pytest.mark.slow  # about 20 s of training per run on one CPU thread

# AdamW as the transformer recipes (configs/deit_s_advprop.yaml), at a learning rate for 3 short
# epochs (22 steps each); the weakest attacker keeps the budget small.
TRAIN = ["tracker=none", "epochs=3", "eval_robust=false", "attack=pgd1", "optimizer.name=adamw",
         "optimizer.lr_per_256=1e-2", "optimizer.weight_decay=0.05"]


@pytest.mark.parametrize("method", ["advprop", "fast_advprop"])
@pytest.mark.parametrize("model", ["test_vit", "test_convnext"])
def test_dual_layernorm_models_learn_and_export_plain_timm(model, method, digits_root, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # conftest's one_thread, for the runs
    run_dir = tmp_path / "run"
    train_in_process(f"data.root={digits_root}", f"output_dir={run_dir}", f"model={model}", f"method={method}",
                     *(["attack.targeted=false"] if method == "fast_advprop" else []), *TRAIN)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["clean_top1"] >= 50, summary  # chance: 10 %
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [line["train/loss/clean"] for line in metrics if "train/loss/clean" in line]
    assert losses[-1] < 0.8 * losses[0], losses
    trained = load_file(str(run_dir / "checkpoints" / "last" / "model.safetensors"))
    assert any(".aux." in key for key in trained)  # it did train auxiliary norms

    export = run_dir / "final_model"
    timm.create_model(model, num_classes=10).load_state_dict(load_file(str(export / "model.safetensors")), strict=True)
    result = tool_in_process("evaluate.py", export, "--data", digits_root / "val", "--workers", "0", "--json",
                             tmp_path / "eval.json")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["clean"]["top1"] == pytest.approx(summary["clean_top1"])
