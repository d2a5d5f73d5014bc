"""A method is one record: a toy method registered here is configured, validated, trained end to end
and benchmarked from it alone; the methods' attack defaults reach every recipe, and a run made
before a default changed keeps, when continued, the attack it was made with."""
import json
import signal
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from conftest import REPO, saved_run_folder
from models.dual_norm import AUX, use_norm
from train.resume import check_resume, continued_settings
from train.config import ConfigError, load_config
from train.methods import METHODS, Backward, Method, StepOutput, register
from train.methods.common import accuracy, cross_entropy
from train.resume_rules import ResumeMismatch

QUICK = ["model=test_resnet", "epochs=1", "tracker=none", "eval_robust=false", "data.workers=0", "log_every=5"]


# ----------------------------------------------------------------------------- a toy method

@dataclass
class NoisyCopyConfig:
    sigma: float = 0.1  # std of the Gaussian pixel noise of the copy


def noisy_copy_step(ctx, images, labels):
    """The clean batch through the main norms, then a noisy copy through the aux norms: two backwards."""
    clean_logits = ctx.model(images)
    clean_loss = cross_entropy(ctx, clean_logits, labels)
    yield Backward({"clean": 0.5 * clean_loss})
    noisy = (images + ctx.cfg.noisy_copy.sigma * torch.randn_like(images)).clamp(0, 1)
    with use_norm(ctx.attack_model, AUX):
        noisy_logits = ctx.model(noisy)
    noisy_loss = cross_entropy(ctx, noisy_logits, labels)
    yield Backward({"adv": 0.5 * noisy_loss})
    return StepOutput({"loss/clean": clean_loss.detach(), "loss/adv": noisy_loss.detach(),
                       "acc/clean": accuracy(clean_logits, labels), "acc/adv": accuracy(noisy_logits, labels)}, noisy)


TOY = Method("noisy_copy", noisy_copy_step, dual_norm=True, attacks=False, backwards=lambda cfg: 2, options=NoisyCopyConfig,
             checks=lambda cfg: [(cfg.noisy_copy.sigma >= 0, "noisy_copy.sigma", "must be ≥ 0")],
             bench_cases={"noisy_copy": ["method=noisy_copy"]})


@pytest.fixture
def toy():
    register(TOY)
    yield TOY
    del METHODS[TOY.name]


@pytest.fixture
def in_process_runs():
    """train/run.py's main() in this process: the run folder's lock ends with each run (as it
    does with a run's process), and the SIGINT/SIGTERM handlers it installs are put back after."""
    from train import run_lock
    from train.run import main
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def run(argv):
        try:
            main(argv)
        finally:
            run_lock._close_in_child()
    yield run
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


def test_a_registered_method_is_configured_trained_and_benchmarked(toy, in_process_runs, digits_root, tmp_path,
                                                                   one_thread):
    with pytest.raises(ConfigError, match=r"noisy_copy\.sigma: -1\.0 must be ≥ 0"):
        load_config([f"data.root={digits_root}", "method=noisy_copy", "noisy_copy.sigma=-1"])
    with pytest.raises(ConfigError, match="noisy_copy.nonsense"):
        load_config([f"data.root={digits_root}", "method=noisy_copy", "noisy_copy.nonsense=1"])
    assert load_config([f"data.root={digits_root}", "method=noisy_copy", "attack.steps=0"]).attack.steps == 0  # no attack
    with pytest.raises(ConfigError, match="attack.steps: 0 must be ≥ 1 with method=advprop"):
        load_config([f"data.root={digits_root}", "method=advprop", "attack.steps=0"])
    run_dir = tmp_path / "run"
    in_process_runs([f"data.root={digits_root}", f"output_dir={run_dir}", "method=noisy_copy", "noisy_copy.sigma=0.2",
                     *QUICK, "epochs=2"])
    saved = OmegaConf.load(run_dir / "config.yaml")
    assert saved.method == "noisy_copy" and saved.noisy_copy.sigma == 0.2
    weights = load_file(str(run_dir / "checkpoints" / "last" / "model.safetensors"))
    assert any(".aux." in key for key in weights)  # dual norms, from the record
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [line["train/loss/adv"] for line in lines if "train/loss/adv" in line]
    assert losses[-1] < 0.8 * losses[0]  # the noisy copies' loss, trained through the aux norms
    assert json.loads((run_dir / "summary.json").read_text())["clean_top1"] > 30  # chance: 10

    from tools.bench_step import bench_cases, build_case
    assert bench_cases()["noisy_copy"] == ["method=noisy_copy"]
    from accelerate import Accelerator
    args = SimpleNamespace(model="test_resnet", batch=8, no_channels_last=False, nonfinite_check="host", compile=False)
    bench_step = build_case(bench_cases()["noisy_copy"], args, Accelerator(cpu=True))
    bench_step(torch.rand(8, 3, 32, 32).contiguous(memory_format=torch.channels_last), torch.arange(8) % 10)


# ----------------------------------------------------------------------------- attack defaults

RECIPES = sorted((REPO / "configs").glob("*.yaml"))


def test_every_dual_norm_recipe_attacks_as_the_references():
    attacks = {}
    for recipe in RECIPES:
        cfg = load_config([f"config={recipe}"])
        if cfg.attack.kind != "pgd":  # PyramidAT's recipes attack as its authors' code (tests/test_pyramid_at.py)
            continue
        attacks.setdefault(cfg.method, set()).add((cfg.attack.bn_mode, cfg.attack.start_rule, cfg.attack.reach_eps))
    assert attacks["advprop"] == {("eval", "batch", True)}  # demo, EfficientNets, ResNet-50, DeiT, ConvNeXt
    assert attacks["fast_advprop"] == {("train", "batch", True)}  # its attack step is a training step
    assert attacks["vanilla"] == {("train", "image", False)}  # the schema's: the methods without attack defaults
    given = load_config(["attack.bn_mode=train", "attack.start_rule=image", "attack.reach_eps=false"]).attack
    assert (given.bn_mode, given.start_rule, given.reach_eps) == ("train", "image", False)  # still options


def write_old_run(run_dir: Path, digits_root) -> None:
    """A run folder as an advprop run made before the attack defaults changed left it: bn_mode
    train written out, start_rule and reach_eps not yet keys."""
    cfg = load_config([f"data.root={digits_root}", f"output_dir={run_dir}", "tracker=none", "attack.bn_mode=train"])
    saved = OmegaConf.to_container(cfg, resolve=True)
    del saved["attack"]["start_rule"], saved["attack"]["reach_eps"]
    saved_run_folder(run_dir, saved)


def test_a_continued_run_keeps_the_attack_it_was_made_with(digits_root, tmp_path):
    run_dir = tmp_path / "old"
    write_old_run(run_dir, digits_root)
    args = [f"data.root={digits_root}", f"output_dir={run_dir}", "tracker=none"]
    one_process = SimpleNamespace(num_processes=1)
    assert continued_settings(load_config(args)).attack.bn_mode == "train"

    continued = load_config(args, continuing=continued_settings)
    attack = continued.attack
    assert (attack.bn_mode, attack.start_rule, attack.reach_eps) == ("train", "image", False)
    check_resume(one_process, continued, run_dir)  # the same command continues it
    with pytest.raises(ResumeMismatch, match=r"attack\.bn_mode \('train' → 'eval'\)"):
        check_resume(one_process, load_config(args), run_dir)  # with today's defaults it would change the attack
    with pytest.raises(ResumeMismatch, match=r"attack\.reach_eps \(False → True\)"):
        check_resume(one_process, load_config([*args, "attack.reach_eps=true"], continuing=continued_settings), run_dir)

    fresh = load_config([f"data.root={digits_root}", f"output_dir={tmp_path / 'new'}"], continuing=continued_settings)
    assert (fresh.attack.bn_mode, fresh.attack.start_rule, fresh.attack.reach_eps) == ("eval", "batch", True)


def test_an_old_run_resumes_with_the_same_command(in_process_runs, digits_root, tmp_path, capsys, one_thread):
    """End to end through train/run.py: a run trained as an older version would have (its config
    then stripped of the keys that version did not have) is continued by the plain command."""
    run_dir = tmp_path / "run"
    common = [f"data.root={digits_root}", f"output_dir={run_dir}", *QUICK]
    in_process_runs([*common, "attack.bn_mode=train", "attack.start_rule=image", "attack.reach_eps=false"])
    for config in run_dir.rglob("config.yaml"):
        saved = OmegaConf.load(config)
        del saved.attack["start_rule"], saved.attack["reach_eps"]
        config.write_text(OmegaConf.to_yaml(saved))
    capsys.readouterr()
    in_process_runs(common)  # trained already: it resumes, redoes the final evaluation and exports
    assert "resuming from" in capsys.readouterr().out
    resumed = OmegaConf.load(run_dir / "config.yaml")  # the resolved config of the continuing command
    assert (resumed.attack.bn_mode, resumed.attack.start_rule, resumed.attack.reach_eps) == ("train", "image", False)
