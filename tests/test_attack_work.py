"""The work one frozen-weight attack step does, op by op (aten ops under a dispatch mode): what
makes it cheaper than a training step must stay so. A clock-free guard beside tools/bench_step.py
--check: a weight or norm-parameter gradient, a layout conversion, an extra copy of the batch or
an autocast cast inside the attack loop shows here as a changed op list, on any machine."""
import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import digits_val_batch
from models.dual_norm import AUX
from models.factory import create_model
from train.config import load_config
from train.methods import StepContext
from train.methods.common import make_adversarial


class OpLog(TorchDispatchMode):
    """Every aten op dispatched inside, with its tensor arguments and bool-list flags."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append((func.overloadpacket.__name__, args))
        return func(*args, **(kwargs or {}))

    def count(self) -> collections.Counter:
        return collections.Counter(name for name, _ in self.calls)


def attack_ops(bn_mode: str, steps: int, batch) -> OpLog:
    cfg = load_config(["model=test_resnet", "method=advprop", f"attack=pgd{steps}", f"attack.bn_mode={bn_mode}",
                       "tracker=none"])
    torch.manual_seed(0)
    model = create_model(cfg, 10, dual_norm=True).to(memory_format=torch.channels_last).train()
    images = batch[0].contiguous(memory_format=torch.channels_last)
    ctx = StepContext(model, model, cfg, 10)
    with OpLog() as log:
        make_adversarial(ctx, images, batch[1], route=AUX)
    return log


@pytest.fixture(scope="module")
def batch(digits_root):
    return digits_val_batch(digits_root, 16)


@pytest.mark.parametrize("bn_mode", ["eval", "train"])
def test_an_attack_step_computes_input_gradients_only_in_channels_last(batch, bn_mode):
    log = attack_ops(bn_mode, 3, batch)
    convs = [args for name, args in log.calls if name == "convolution_backward"]
    norms = [args for name, args in log.calls if name == "native_batch_norm_backward"]
    assert convs and norms
    assert all(list(args[-1]) == [True, False, False] for args in convs)  # no weight or bias gradient
    assert all(list(args[-1]) == [True, False, False] for args in norms)  # no norm-parameter gradient
    activations = [t for name, args in log.calls if name in ("convolution", "convolution_backward")
                   for t in args[:2] if isinstance(t, torch.Tensor) and t.dim() == 4 and t.shape[1] > 1]
    assert all(t.is_contiguous(memory_format=torch.channels_last) for t in activations)
    assert not [name for name, _ in log.calls if name in ("_to_copy", "to", "contiguous")]  # no casts, no re-layout


@pytest.mark.parametrize("bn_mode", ["eval", "train"])
def test_each_further_attack_step_is_one_forward_one_input_backward_and_the_step(batch, bn_mode):
    """PGD-3 minus PGD-1: two attack steps' ops, against a plain forward and input-gradient backward
    of the same frozen model, which is all a step needs beside the signed step and its projection."""
    one, three = attack_ops(bn_mode, 1, batch).count(), attack_ops(bn_mode, 3, batch).count()
    per_step = {name: (three[name] - one[name]) / 2 for name in three | one if three[name] != one[name]}
    convs = one["convolution"]
    assert per_step["convolution"] == per_step["convolution_backward"] == convs
    assert per_step["native_batch_norm"] == per_step["native_batch_norm_backward"] == one["native_batch_norm"]
    assert per_step["mm"] == 1  # the classifier's input gradient only: a weight gradient is a second mm
    assert per_step.get("clone", 0) == 0 and per_step.get("copy_", 0) <= 1  # one new tensor per step at most
    assert "_to_copy" not in per_step and "empty_like" not in per_step
