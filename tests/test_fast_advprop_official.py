"""fast_advprop's step equals the Fast AdvProp authors' step, on one process and on two (gloo on
CPU), with one and two attack iterations. The reference below is their loop — meijieru/fast_advprop
imagenet.py train() with their script's flags (--reuse_mid_grad --attack_in_train --original_attack
--shuffle_before_train_adv, loss_strategy clean:1,attack:0.5,adv:0.5, multi_clean_strategy 4:1),
fast_advprop.py use_param_sets / reinit_adv_params_count and attacker.py PGDAttacker — transcribed
for one batch: every attack iteration's backward trains the shared and aux weights and counts
its rows with the attack weight, the adversarial rows (the last iterate) are shuffled across
processes, and each parameter's gradient is divided by its count."""
import os
import runpy
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, process_state_kept, two_processes
from models.dual_norm import AUX, MAIN, use_norm
from models.factory import create_model
from train.config import load_config

SCRIPT = REPO / "tests" / "fast_advprop_step.py"
ROWS, CLEAN, ATTACKED = 20, 16, 4  # per process (adv_fraction 0.2)
LOSS_STRATEGY = {"clean": 1.0, "attack": 0.5, "adv": 0.5}


def params_split(model) -> dict:
    """get_adv_params_split: the aux norms ("adv"), the main norms ("clean"), everything else."""
    group = {"adv": ".aux.", "clean": ".main."}
    split = {"shared": [], "clean": [], "adv": []}
    for name, param in model.named_parameters():
        split[next((key for key, part in group.items() if part in name), "shared")].append(param)
    return split


def use_param_sets(split, counts, used_keys, count_inc):
    """Theirs: only the used groups require grad, and each of their parameters counts count_inc more images."""
    for key, params in split.items():
        for param in params:
            param.requires_grad_(key in used_keys)
            if key in used_keys:
                counts[param] += count_inc


def attack_update(image_clean, adv, adv_grad, *, eps, step_size):
    """PGDAttacker.attack_update with original_attack (untargeted), in [0, 1] units (theirs: [-1, 1])."""
    lower_bound = torch.clamp(image_clean - eps, min=0, max=1)
    upper_bound = torch.clamp(image_clean + eps, min=0, max=1)
    adv = adv + torch.sign(adv_grad) * step_size
    adv = torch.where(adv > lower_bound, adv, lower_bound)
    return torch.where(adv < upper_bound, adv, upper_bound).detach()


def assert_same_but_a_few_signs(ours, theirs, step):
    """The attack takes the sign of the input gradient: where a component is ~0, float rounding in
    another process (or another kernel order) can flip it, moving a pixel one step the other way."""
    flipped = (ours - theirs).abs() > 1e-6
    assert flipped.float().mean() < 0.02 and (ours - theirs).abs().max() <= 2.01 * step


def authors_gradients(digits_root, processes: int, steps: int, recorded: list, shuffle: bool = True) -> dict:
    """Their train() on `processes` shards of ROWS images, gradients averaged over processes as DDP does,
    then divided by each parameter's count. recorded[p]: the inputs of our process p's forwards
    (clean rows, each attack iterate, the adversarial rows): their iterate must equal ours but for a
    few flipped signs, and their next forward then runs on ours, so the gradients compare the rule,
    not the rounding of a sign."""
    from fast_advprop_step import OVERRIDES, batch
    cfg = load_config([f"data.root={digits_root}", *OVERRIDES, f"attack.steps={steps}"])
    torch.manual_seed(0)
    model = create_model(cfg, 10, dual_norm=True).to(memory_format=torch.channels_last).train()
    split = params_split(model)
    images, labels = batch(digits_root)
    eps = 4 / 255
    step_size = max(1, 4 / steps) / 255  # PGDAttacker: step_size = max(step_size, epsilon / num_iter)
    shards = [(images[p * ROWS:(p + 1) * ROWS], labels[p * ROWS:(p + 1) * ROWS]) for p in range(processes)]
    counts = {param: 0.0 for param in model.parameters()}  # reinit_adv_params_count (the same on every process)
    accumulated = [{} for _ in shards]

    def backward(process, loss):
        loss.backward()
        for param in model.parameters():
            if param.grad is not None:
                accumulated[process][param] = accumulated[process].get(param, 0) + param.grad
                param.grad = None

    last_iterates = []
    for p, (x, y) in enumerate(shards):
        inputs, targets = (x[:CLEAN], x[CLEAN:]), (y[:CLEAN], y[CLEAN:])  # input_split_fun, 4:1
        use_param_sets(split, counts if p == 0 else dict.fromkeys(counts, 0), ["shared", "clean"],
                       CLEAN * LOSS_STRATEGY["clean"])
        with use_norm(model, MAIN):  # to_clean_status
            losses = F.cross_entropy(model(inputs[0]), targets[0], reduction="none")
            backward(p, (losses * LOSS_STRATEGY["clean"]).sum())
        inputs_attack = inputs[1].clone().detach()  # attack_init, start from the clean image
        for iteration in range(steps):
            if iteration > 0:
                assert_same_but_a_few_signs(recorded[p][1 + iteration], inputs_attack, step_size)
                inputs_attack = recorded[p][1 + iteration].clone()
            inputs_attack.requires_grad_(True)
            use_param_sets(split, counts if p == 0 else dict.fromkeys(counts, 0), ["shared", "adv"],
                           ATTACKED * LOSS_STRATEGY["attack"])
            with use_norm(model, AUX):  # to_adv_status, model.train() (--attack_in_train)
                losses = F.cross_entropy(model(inputs_attack), targets[1], reduction="none")
                backward(p, (losses * LOSS_STRATEGY["attack"]).sum())
            inputs_attack = attack_update(inputs[1], inputs_attack, inputs_attack.grad, eps=eps, step_size=step_size)
        last_iterates.append(inputs_attack)

    # --shuffle_before_train_adv: all processes' rows, permuted by a seed they share (seed, step 0;
    # theirs is a randperm of the same RNG state on every process, rows [rank::world_size])
    everyone, everyone_labels = torch.cat(last_iterates), torch.cat([y[CLEAN:] for _, y in shards])
    order = torch.randperm(len(everyone), generator=torch.Generator().manual_seed(cfg.seed * 1_000_003)) \
        if shuffle else torch.arange(len(everyone))
    use_param_sets(split, counts, ["shared", "adv"], ATTACKED * LOSS_STRATEGY["adv"])
    for p in range(processes):
        rows = order[p * ATTACKED:(p + 1) * ATTACKED]
        inputs_adv = everyone[rows]
        if shuffle:
            assert_same_but_a_few_signs(recorded[p][-1], inputs_adv, step_size)
            inputs_adv = recorded[p][-1]
        with use_norm(model, AUX):
            backward(p, (F.cross_entropy(model(inputs_adv), everyone_labels[rows], reduction="none")
                         * LOSS_STRATEGY["adv"]).sum())
    for param in model.parameters():
        param.requires_grad_(True)
    names = {param: name for name, param in model.named_parameters()}
    # DDP averages the processes' gradients; then param.grad.div_(count)
    return {names[param]: sum(a.get(param, torch.zeros_like(param)) for a in accumulated) / processes / count
            for param, count in counts.items()}


def run_step(digits_root, out, processes, steps):
    """The step script on `processes` processes: two under the launcher, one in this process.
    One thread everywhere (torchrun's default for its workers): the same kernels, the same
    rounding as the reference computed here, which BN over a few attacked rows amplifies."""
    args = [str(SCRIPT), str(digits_root), str(out), str(steps)]
    if processes == 1:
        with process_state_kept({"OMP_NUM_THREADS": "1"}):
            saved_argv, sys.argv = sys.argv, args
            try:
                runpy.run_path(str(SCRIPT), run_name="__main__")
            finally:
                sys.argv = saved_argv
    else:
        result = subprocess.run([*two_processes(), *args], cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-4000:]
    return torch.load(out / "grads.pt")


@pytest.mark.parametrize("processes, steps", [(1, 1), (1, 2), pytest.param(2, 2, marks=pytest.mark.processes)])
def test_step_equals_the_authors_step(digits_root, tmp_path, processes, steps, one_thread):
    ours = run_step(digits_root, tmp_path, processes, steps)
    recorded = [torch.load(tmp_path / f"shuffle_{rank}.pt")["inputs"] for rank in range(processes)]
    assert all(len(inputs) == steps + 2 for inputs in recorded)  # clean, each attack iterate, adversarial
    expected = authors_gradients(digits_root, processes, steps, recorded)
    assert ours.keys() == expected.keys()
    for name in ours:  # float rounding of sums over many pixels, relative to the tensor's scale (the stem's
        # weight gradient sums 64 × 64 positions per image); a wrong rule is off by O(1)
        scale = expected[name].abs().max().item()
        torch.testing.assert_close(ours[name], expected[name], rtol=1e-4, atol=max(1e-5, 1e-4 * scale), msg=name)
    if processes == 2:
        unshuffled = authors_gradients(digits_root, processes, steps, recorded, shuffle=False)
        assert not torch.allclose(ours["net.conv1.weight"], unshuffled["net.conv1.weight"], rtol=1e-2, atol=1e-3)
        shuffled = [torch.load(tmp_path / f"shuffle_{rank}.pt") for rank in (0, 1)]
        tags = torch.cat([s["tags"] for s in shuffled]).long()
        assert sorted(tags.tolist()) == [r * 1000 + i for r in (0, 1) for i in range(ROWS)]  # each row once
        assert all(torch.equal(s["tags"].long(), s["labels"]) for s in shuffled)  # labels travel with rows
        moved = [int((s["tags"] // 1000 != rank).sum()) for rank, s in enumerate(shuffled)]
        assert min(moved) > 0  # rows cross between processes
