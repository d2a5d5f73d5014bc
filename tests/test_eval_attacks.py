"""Evaluation attacks beyond PGD (train/attacks/library.py): AutoAttack's standard version as the paper
defines it, built from torchattacks' parts; through tools/evaluate.py it is at most PGD's robust
accuracy and equals torchattacks run directly on the same model and images."""
import json
from pathlib import Path

import pytest
import timm
import torch

from conftest import tool_in_process
from models.factory import Normalized
from tools.robustness import sets
from tools.robustness.load import load_any
from train.attacks import build_attack
from train.attacks.library import AutoAttackConfig, run_quietly, standard_autoattack

torchattacks = pytest.importorskip("torchattacks")

pytestmark = pytest.mark.usefixtures("one_thread")
# The digits demo model is robust far beyond its training ε (4): at ε = 32 APGD breaks every image
# (PGD-10 still leaves some), which keeps AutoAttack's later, costly parts short here.
EPS = 32  # pixel units
LIMIT = 16  # val images, one batch


def test_standard_autoattack_is_the_papers():
    """Croce & Hein 2020 / fra31/auto-attack set_version('standard'), L∞: APGD-CE 100 iterations 1 restart,
    APGD-T and FAB-T 100 iterations on 9 target classes, Square 5000 queries (p_init 0.8, no rescaled
    schedule). torchattacks' own AutoAttack("standard") differs: 10 iterations, n_classes − 1 targets."""
    model = Normalized(timm.create_model("test_resnet", num_classes=1000)).eval()
    apgd, apgd_t, fab_t, square = standard_autoattack(model, 4 / 255, 1000, seed=0)
    assert (type(apgd), apgd.steps, apgd.n_restarts, apgd.loss) == (torchattacks.APGD, 100, 1, "ce")
    assert (type(apgd_t), apgd_t.steps, apgd_t.n_restarts, apgd_t.n_target_classes) == (torchattacks.APGDT, 100, 1, 9)
    assert (type(fab_t), fab_t.steps, fab_t.n_restarts, fab_t.multi_targeted, fab_t.n_target_classes) == (
        torchattacks.FAB, 100, 1, True, 9)
    assert (type(square), square.n_queries, square.p_init, square.rescale_schedule) == (
        torchattacks.Square, 5000, 0.8, False)
    theirs = torchattacks.AutoAttack(model, norm="Linf", eps=4 / 255, version="standard", n_classes=1000, seed=0)
    library_apgd, library_apgd_t, _, library_square = theirs._autoattack.attacks
    assert (library_apgd.steps, library_apgd_t.n_target_classes, library_square.rescale_schedule) == (10, 999, True)


def test_library_attacks_leave_the_model_and_the_random_state_as_found(digits_root):
    """FAB backpropagates into the parameters' .grad and APGD reseeds the global generator: run through
    run_quietly (as build_attack's attacks are), neither leaves a trace."""
    from conftest import digits_val_batch
    images, _ = digits_val_batch(digits_root, 8)
    images = images.contiguous(memory_format=torch.channels_last)
    torch.manual_seed(0)
    model = Normalized(timm.create_model("test_resnet", num_classes=10)).eval()
    with torch.no_grad():
        labels = model(images).argmax(1)  # every image classified "correctly": each part attacks all of them
    torch.nn.functional.cross_entropy(model(images), labels).backward()  # gradients that must survive
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    parts = [torchattacks.FAB(model, norm="Linf", eps=16 / 255, steps=5, n_classes=10),
             torchattacks.APGD(model, norm="Linf", eps=16 / 255, steps=5)]
    rng = torch.get_rng_state()
    for part in parts:
        adversarial = run_quietly(part, model, images, labels)
        assert adversarial.shape == images.shape and adversarial.is_contiguous(memory_format=torch.channels_last)
        assert (adversarial - images).abs().max() <= 16 / 255 + 1e-6
        assert 0 <= adversarial.min() <= adversarial.max() <= 1
        assert (adversarial != images).any()
        assert all(torch.equal(grads[name], p.grad) and p.requires_grad for name, p in model.named_parameters())
        assert torch.equal(torch.get_rng_state(), rng) and not model.training
    parts[0](images.contiguous(), labels)  # FAB on its own: the parameters' gradients change
    assert not all(torch.equal(grads[name], p.grad) for name, p in model.named_parameters())


def run_cli(*args, cwd):
    return tool_in_process("evaluate.py", *args, cwd=cwd, env={"OMP_NUM_THREADS": "1"})


def robust_top1(attack, model, loader) -> tuple[float, list]:
    """torchattacks' own attack over the loader's images (NCHW, as it needs): top-1 (percent) of its
    examples, and the examples."""
    hits, images, examples = 0, 0, []
    for batch, labels in loader:
        examples.append(attack(batch.float().div(255).contiguous(), labels))
        with torch.no_grad():
            hits += (model(examples[-1]).argmax(1) == labels).sum().item()
        images += len(labels)
    return 100 * hits / images, examples


def test_autoattack_is_at_most_pgd_and_equals_torchattacks(trained_demo_run, digits_root, tmp_path):
    result = run_cli(trained_demo_run, "--data", digits_root / "val", "--limit", LIMIT, "--batch-size", LIMIT,
                     "--workers", "0", "--attack", "pgd", f"eps={EPS}", "steps=10", "reach_eps=true",
                     "--attack", "autoattack", f"eps={EPS}", "--attack", "apgd", "eps=8", "steps=20",
                     "--json", tmp_path / "out.json", "--wandb-run", "aatest1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "out.json").read_text())
    pgd, autoattack, apgd = report["robust"]
    assert autoattack["images"] == pgd["images"] == apgd["images"] == LIMIT
    assert autoattack["top1"] <= pgd["top1"] < report["clean"]["top1"]
    assert 0 < apgd["top1"] < report["clean"]["top1"]  # at ε = 8 some images hold
    assert f"robust: AutoAttack standard eps={EPS}/255" in result.stdout
    tables = [json.loads(path.read_text()) for path in (tmp_path / "wandb").glob(
        "offline-run-*-aatest1/files/media/table/**/*.table.json")]
    logged = dict(next(t["data"] for t in tables if t["columns"] == ["metric", "value"]))
    assert logged[f"eval/robust_autoattack_eps{EPS}/top1"] == pytest.approx(autoattack["top1"])

    model, cfg, classes = load_any(trained_demo_run)  # the same weights, images and order, torchattacks directly
    model = model.to(memory_format=torch.channels_last)
    from accelerate import Accelerator
    loader = sets.EvalContext(model, cfg, classes, Accelerator(cpu=True), batch_size=LIMIT, workers=0,
                              limit=LIMIT).loader(Path(digits_root) / "val")
    theirs = torchattacks.AutoAttack(model, norm="Linf", eps=EPS / 255, version="standard", n_classes=10, seed=0)
    for part in theirs._autoattack.attacks[:3]:  # the paper's iterations (their default is 10)
        part.steps = 100
    theirs._autoattack.attacks[3].rescale_schedule = False  # the authors' Square schedule
    top1, examples = robust_top1(theirs, model, loader)
    assert autoattack["top1"] == top1
    images, labels = next(iter(loader))
    ours = build_attack(AutoAttackConfig(eps=EPS))(model, images.float().div(255), labels)
    torch.testing.assert_close(ours, examples[0], rtol=0, atol=0)
    apgd_theirs = torchattacks.APGD(model, norm="Linf", eps=8 / 255, steps=20, n_restarts=1, seed=0, loss="ce")
    assert apgd["top1"] == robust_top1(apgd_theirs, model, loader)[0]


@pytest.mark.parametrize("tokens, problem", [
    (["autoattack", "eps=0"], "autoattack.eps"), (["apgd", "loss=hinge"], "apgd.loss"),
    (["apgd", "nonsense=1"], "nonsense"), (["cw"], "use one of")])
def test_bad_attack_options_are_one_clear_error(tokens, problem):
    from common.errors import UserInputError
    from tools.evaluate import parse_attack
    with pytest.raises(UserInputError, match=problem):
        parse_attack(tokens)
