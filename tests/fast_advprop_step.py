"""One fast_advprop training step through train/loop.py's train_step, as run.py sets it up, on
rows [rank·20, rank·20 + 20) of a digits val batch, with STEPS attack iterations; writes what the
tests compare.

    python -m accelerate.commands.launch --multi_gpu --num_processes 2 tests/fast_advprop_step.py DIGITS OUT STEPS
    python tests/fast_advprop_step.py DIGITS OUT STEPS      # one process: rows 0-19

OUT/grads.pt: every parameter's gradient as the optimizer sees it (after DDP and the per-group
scales; rank 0); OUT/shuffle_<rank>.pt: the tags (rank·1000 + row) each rank holds after
shuffle_across_processes, the adversarial examples it trained on, and `inputs`: the input of every
forward of the step, in order (the clean rows, each attack iterate, the adversarial rows).
"""
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import digits_val_batch  # noqa: E402
from models.factory import create_model  # noqa: E402
from train.run_state import TrainState  # noqa: E402
from train.config import load_config  # noqa: E402
from train.loop import train_step  # noqa: E402
from train.methods import StepContext  # noqa: E402
from train.methods.fast_advprop import shuffle_across_processes  # noqa: E402
from train.optim import create_schedule  # noqa: E402
from train.step_guard import StepGuard  # noqa: E402

ROWS = 20  # per process: 16 clean, 4 attacked (adv_fraction 0.2); seed 1 mixes the attacked rows
OVERRIDES = ["method=fast_advprop", "seed=1", "attack.targeted=false", "attack.random_start=false",
             "attack.eps=4", "attack.step_size=1", f"batch_size={ROWS}", "tracker=none"]  # and attack.steps=STEPS


def batch(digits: Path):
    """40 val digits at 64 px: BN over a few attacked rows at 1×1 px (32 px input, ResNet's last
    stage) is so ill-conditioned that float rounding flips ReLUs; at 64 px it is 2×2 px."""
    images, labels = digits_val_batch(digits, 64)
    images = torch.nn.functional.interpolate(images[:2 * ROWS], size=64, mode="bilinear", align_corners=False)
    return images.clamp(0, 1).contiguous(memory_format=torch.channels_last), labels[:2 * ROWS]


class RecordingSGD(torch.optim.SGD):
    """Plain SGD that keeps a copy of the gradients it is asked to apply."""

    def step(self, closure=None):
        self.seen = [p.grad.clone() for group in self.param_groups for p in group["params"]]
        return super().step(closure)


def main(digits: Path, out: Path, steps: int) -> None:
    cfg = load_config([f"data.root={digits}", *OVERRIDES, f"attack.steps={steps}"])
    accelerator = Accelerator(cpu=True, kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    rank = accelerator.process_index
    torch.manual_seed(0)
    model = create_model(cfg, 10, dual_norm=True).to(memory_format=torch.channels_last)
    names = [name for name, _ in model.named_parameters()]
    inputs = []  # of every forward, in order
    model.register_forward_pre_hook(lambda module, args: inputs.append(args[0].detach().clone()))
    optimizer = RecordingSGD(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    ctx = StepContext(model, accelerator.unwrap_model(model), cfg, 10, rank=rank,
                      world_size=accelerator.num_processes, gather=accelerator.gather)
    guard = StepGuard(ctx.attack_model, optimizer, accelerator, mode="host", on_nonfinite="stop")
    images, labels = batch(digits)
    mine = slice(rank * ROWS, (rank + 1) * ROWS)
    x = images[mine].contiguous(memory_format=torch.channels_last)
    result = train_step(ctx, accelerator, optimizer, create_schedule(cfg, optimizer, 10), TrainState(), x,
                        labels[mine], True, guard)
    out.mkdir(parents=True, exist_ok=True)
    if accelerator.is_main_process:
        torch.save(dict(zip(names, optimizer.optimizer.seen)), out / "grads.pt")
    tags = torch.arange(ROWS, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 3, 1, 1) + 1000 * rank
    shuffled, tag_labels = shuffle_across_processes(ctx, tags.contiguous(), torch.arange(ROWS) + 1000 * rank)
    torch.save({"tags": shuffled[:, 0, 0, 0], "labels": tag_labels, "adversarial": result.adversarial,
                "metrics": result.metrics, "inputs": inputs},
               out / f"shuffle_{rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]))
