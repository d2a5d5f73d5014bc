"""An attack is one record (train/attacks/seam.py AttackKind): a toy kind registered here is
configured, validated, trained through (its iterates, by a frozen descent and by fast_advprop's
training backwards), robust-evaluated as its node says and benchmarked from it alone. loss=bce is
timm's BinaryCrossEntropy; grad_clip_norm clips what the optimizer sees; a run folder of the PGD era
(nodes without `kind`) still resumes, and another kind is one named difference."""
import json
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from omegaconf import OmegaConf
from timm.data import Mixup
from timm.loss import BinaryCrossEntropy

from conftest import digits_val_batch, saved_run_folder, train_in_process
from models.factory import create_model
from train.attacks import ATTACKS, AttackKind, attack_steps, register_attack
from train.config import ConfigError, load_config
from train.loop import train_step
from train.methods import METHODS, StepContext
from train.methods.common import attack_loss, training_loss
from train.resume import check_resume, continued_settings
from train.resume_rules import ResumeMismatch
from train.run_state import TrainState
from train.step_guard import StepGuard
from train.summary import robust_attack

pytestmark = pytest.mark.usefixtures("one_thread")
QUICK = ["model=test_resnet", "epochs=1", "tracker=none", "data.workers=0", "log_every=1", "image_log_every=0"]


# ----------------------------------------------------------------------------- a toy kind

@dataclass
class BrightnessConfig:
    kind: str = "brightness"
    eps: float = 16.0  # pixel units: the largest shift of an image's every pixel
    steps: int = 2


class BrightnessIterates:
    """One shift per image, stepped by the sign of the loss gradient summed over its pixels."""

    def __init__(self, node, images, *, targeted=False):
        self.images, self.eps, self.steps = images.detach(), node.eps / 255, node.steps
        self.direction = -1.0 if targeted else 1.0
        self.shift = images.new_zeros(len(images), 1, 1, 1)

    def __iter__(self):
        for _ in range(self.steps):
            x = (self.images + self.shift).clamp(0, 1).requires_grad_(True)
            yield x
            step = self.direction * self.eps / self.steps * x.grad.sum((1, 2, 3), keepdim=True).sign()
            self.shift = (self.shift + step).clamp(-self.eps, self.eps)

    @property
    def adversarial(self):
        return (self.images + self.shift).clamp(0, 1)


TOY = AttackKind(
    "brightness", BrightnessConfig,
    describe=lambda node: (f"brightness{node.steps}_eps{node.eps:g}", f"Brightness-{node.steps} eps={node.eps:g}/255"),
    checks=lambda node, key: [(0 < node.eps <= 255, f"{key}.eps", "must be in (0, 255]")],
    steps=lambda node: node.steps, presets={"brightness_strong": {"eps": 64.0}}, iterates=BrightnessIterates,
    targets=lambda labels, num_classes: (labels.argmax(1) if labels.is_floating_point() else labels + 1) % num_classes,
    bench_cases={"adv_train_brightness": ["method=adv_train", "attack=brightness"]})


@pytest.fixture
def toy():
    register_attack(TOY)
    yield TOY
    del ATTACKS[TOY.name]


def run_steps(cfg, images, labels):
    """One method step as the loop runs it (without Accelerate): the number of backwards and the output."""
    torch.manual_seed(0)
    model = create_model(cfg, 10, dual_norm=METHODS[cfg.method].dual_norm).train()
    steps, backwards = METHODS[cfg.method].step(StepContext(model, model, cfg, 10), images, labels), 0
    try:
        while True:
            sum(next(steps).terms.values()).backward()
            backwards += 1
    except StopIteration as done:
        return backwards, done.value


def test_a_registered_attack_is_configured_trained_evaluated_and_benchmarked(toy, few_digits, digits_root, tmp_path):
    attack = load_config(["attack=brightness"]).attack
    assert (attack.kind, attack.eps, attack.steps, attack.targeted) == ("brightness", 16, 2, True)
    assert attack.bn_mode == "eval"  # advprop's attack default, for any kind that has the key
    assert load_config(["attack=brightness_strong", "attack.steps=3"]).attack.eps == 64  # its preset, then a key
    assert load_config(["eval_attack=brightness"]).eval_attack.kind == "brightness"
    with pytest.raises(ConfigError, match=r"attack\.eps: 0\.0 must be in \(0, 255\]"):
        load_config(["attack=brightness", "attack.eps=0"])
    with pytest.raises(ConfigError, match=r"attack\.steps: 0 must be ≥ 1 with method=advprop"):
        load_config(["attack=brightness", "attack.steps=0"])
    with pytest.raises(ConfigError, match="random_start"):  # a PGD key on the toy's node
        load_config(["attack=brightness", "attack.random_start=false"])

    images, labels = digits_val_batch(digits_root, 20)
    fast = load_config(["method=fast_advprop", "attack=brightness", "attack.targeted=false", "model=test_resnet"])
    backwards, out = run_steps(fast, images, labels)
    assert backwards == 3  # each of the 2 iterates trained, then the adversarial rows
    shifts = torch.tensor([-16, 0, 16]).view(1, 3, 1, 1, 1) / 255  # two steps of ±8/255, then the clip
    candidates = (out.source.unsqueeze(1) + shifts).clamp(0, 1)  # (rows, 3 shifts, C, H, W)
    matches = (candidates - out.adversarial.unsqueeze(1)).flatten(2).abs().amax(2) < 1e-6
    assert matches.any(1).all() and not matches[:, 1].all()  # the toy's own steps, and they moved images

    run_dir = tmp_path / "run"
    train_in_process(f"data.root={few_digits}", f"output_dir={run_dir}", "method=adv_train", "attack=brightness",
                     *QUICK)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["robust_attack"] == "Brightness-2 eps=16/255"  # the training node, as it is
    assert OmegaConf.load(run_dir / "config.yaml").attack.kind == "brightness"

    from tools.bench_step import bench_cases, build_case
    from tools.evaluate import parse_attack
    assert bench_cases()["adv_train_brightness"] == ["method=adv_train", "attack=brightness"]
    args = SimpleNamespace(model="test_resnet", batch=8, no_channels_last=False, nonfinite_check="host", compile=False)
    bench = build_case(bench_cases()["adv_train_brightness"], args, Accelerator(cpu=True))
    bench(torch.rand(8, 3, 32, 32).contiguous(memory_format=torch.channels_last), torch.arange(8) % 10)
    assert parse_attack(["brightness", "eps=8"])["name"] == "Brightness-2 eps=8/255"


def test_the_robust_evaluation_takes_the_attack_node_as_it_is():
    pyramid = load_config(["method=pyramid_at", "attack=pyramid", "attack.steps=3"])
    assert robust_attack(pyramid) == pyramid.attack and attack_steps(robust_attack(pyramid)) == 3
    pgd = load_config(["attack=pgd5"])  # advprop: the references' one coin per batch when training
    assert (pgd.attack.start_rule, robust_attack(pgd).start_rule) == ("batch", "image")  # evaluated per image
    assert {k: v for k, v in robust_attack(pgd).items() if k != "start_rule"} == {
        k: v for k, v in pgd.attack.items() if k != "start_rule"}
    autoattack = load_config(["eval_attack=autoattack", "eval_attack.eps=2"])
    assert robust_attack(autoattack).kind == "autoattack" and attack_steps(robust_attack(autoattack)) == 1
    with pytest.raises(ConfigError, match="apgd is an evaluation attack"):
        load_config(["attack=apgd"])


# ----------------------------------------------------------------------------- loss=bce

def test_bce_is_timms_binary_cross_entropy_and_the_attack_takes_it_unsmoothed():
    torch.manual_seed(0)
    logits, labels = torch.randn(8, 10), torch.randint(0, 10, (8,))
    cfg = OmegaConf.create({"loss": "bce", "bce_sum_classes": False, "label_smoothing": 0.1})
    ctx = SimpleNamespace(cfg=cfg)
    torch.testing.assert_close(training_loss(ctx, logits, labels), BinaryCrossEntropy(smoothing=0.1)(logits, labels))
    torch.testing.assert_close(training_loss(ctx, logits, labels, "sum"),
                               8 * BinaryCrossEntropy(smoothing=0.1)(logits, labels))
    mixed = Mixup(mixup_alpha=1.0, label_smoothing=0.1, num_classes=10)(torch.rand(8, 3, 4, 4), labels)[1]
    torch.testing.assert_close(training_loss(ctx, logits, mixed), BinaryCrossEntropy(smoothing=0.1)(logits, mixed))
    summed = OmegaConf.merge(cfg, {"bce_sum_classes": True})
    torch.testing.assert_close(training_loss(SimpleNamespace(cfg=summed), logits, labels),
                               BinaryCrossEntropy(smoothing=0.1, sum_classes=True)(logits, labels))
    torch.testing.assert_close(attack_loss(cfg)(logits, labels), 8 * BinaryCrossEntropy(smoothing=0.0)(logits, labels))
    ce = OmegaConf.merge(cfg, {"loss": "ce"})
    torch.testing.assert_close(training_loss(SimpleNamespace(cfg=ce), logits, labels),
                               torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.1))


# ----------------------------------------------------------------------------- grad_clip_norm

class RecordingSGD(torch.optim.SGD):
    def step(self, closure=None):
        self.norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad)
                                                          for g in self.param_groups for p in g["params"]
                                                          if p.grad is not None]))
        return super().step(closure)


@pytest.mark.parametrize("clip", [0.0, 1e-3])
def test_grad_clip_norm_is_the_norm_the_optimizer_sees(digits_root, clip):
    cfg = load_config(["method=vanilla", "model=test_resnet", "tracker=none", f"grad_clip_norm={clip}"])
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = create_model(cfg, 10, dual_norm=False).to(memory_format=torch.channels_last)
    optimizer = RecordingSGD(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    ctx = StepContext(model, accelerator.unwrap_model(model), cfg, 10)
    guard = StepGuard(ctx.attack_model, optimizer, accelerator, mode="host", on_nonfinite="stop")
    images, labels = digits_val_batch(digits_root, 16)
    scheduler = SimpleNamespace(step_update=lambda step: None)
    images = images.contiguous(memory_format=torch.channels_last)
    train_step(ctx, accelerator, optimizer, scheduler, TrainState(), images, labels, True, guard)
    norm = optimizer.optimizer.norm.item()
    assert norm == pytest.approx(clip, rel=1e-3) if clip else norm > 0.1


# ----------------------------------------------------------------------------- run folders

def saved_run(run_dir, args, strip_kind: bool = False):
    """A run folder whose checkpoint was made with load_config(args); strip_kind: as the PGD era
    wrote it, its attack nodes without `kind`."""
    saved = OmegaConf.to_container(load_config(args), resolve=True)
    if strip_kind:
        for key in ("attack", "eval_attack"):
            saved[key].pop("kind")
    saved_run_folder(run_dir, saved)


def test_a_pgd_era_run_folder_resumes_and_another_kind_is_one_difference(digits_root, tmp_path):
    one_process = SimpleNamespace(num_processes=1)
    old = [f"data.root={digits_root}", f"output_dir={tmp_path / 'old'}", "tracker=none", "attack=pgd3",
           "eval_attack=pgd5"]
    saved_run(tmp_path / "old", old, strip_kind=True)
    check_resume(one_process, load_config(old, continuing=continued_settings), tmp_path / "old")

    pyramid = [f"data.root={digits_root}", f"output_dir={tmp_path / 'pyramid'}", "tracker=none", "method=pyramid_at",
               "attack=pyramid"]
    saved_run(tmp_path / "pyramid", pyramid)
    check_resume(one_process, load_config(pyramid, continuing=continued_settings), tmp_path / "pyramid")
    with pytest.raises(ResumeMismatch) as refused:
        check_resume(one_process, load_config([*pyramid[:-1], "attack=pgd1"]), tmp_path / "pyramid")
    assert "attack.kind ('pyramid' → 'pgd')" in str(refused.value) and "attack.levels" not in str(refused.value)
