"""What the methods' steps share: the run's loss and metrics, the training attack, matched
dropout masks, dual-norm forwards and the per-group gradient scale."""
from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from timm.loss import BinaryCrossEntropy

from models.dual_norm import AUX, MAIN, route_parameters, use_norm
from train.attacks import cross_entropy_sum, train_attack
from train.batch_augment import dominant_label
from train.methods.record import StepContext

LOSSES = ("ce", "bce")  # cfg.loss


def training_loss(ctx: StepContext, logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean"):
    """The run's loss (cfg.loss), averaged or summed over the batch. Class indices: with
    cfg.label_smoothing; class probabilities (mixed targets, whose smoothing timm's Mixup already
    applied) as they are. ce: softmax cross-entropy (for probabilities timm's SoftTargetCrossEntropy);
    bce: binary_cross_entropy_per_image."""
    smoothing = 0.0 if labels.is_floating_point() else ctx.cfg.label_smoothing
    if ctx.cfg.loss == "bce":
        losses = binary_cross_entropy_per_image(logits, labels, smoothing, ctx.cfg.bce_sum_classes)
        return losses.sum() if reduction == "sum" else losses.mean()
    return F.cross_entropy(logits.float(), labels, label_smoothing=smoothing, reduction=reduction)


cross_entropy = training_loss  # its name from before loss=bce


def binary_cross_entropy_per_image(logits: torch.Tensor, labels: torch.Tensor, smoothing: float = 0.0,
                                   sum_classes: bool = False) -> torch.Tensor:
    """timm's BinaryCrossEntropy (one sigmoid per class; class indices one-hot with its smoothing)
    per image: the mean over classes (timm's default, so the batch mean is timm's loss) or, with
    sum_classes, the sum (timm's sum_classes; scenic's sigmoid cross-entropy, PyramidAT's loss)."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    losses = BinaryCrossEntropy(smoothing=smoothing, reduction="none")(logits, labels)
    return losses.sum(1) if sum_classes else losses.mean(1)


def attack_loss(cfg):
    """The loss the training attack descends or ascends, summed over the batch: the run's kind of
    loss without label smoothing (the references' attacks use the plain loss)."""
    if cfg.loss == "bce":
        return lambda logits, labels: binary_cross_entropy_per_image(logits, labels, 0.0, cfg.bce_sum_classes).sum()
    return cross_entropy_sum


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Top-1 in percent; against the dominant label of mixed targets."""
    return (logits.argmax(1) == dominant_label(labels)).float().mean().detach() * 100


def two_part_metrics(clean_loss, adv_loss, clean_logits, adv_logits, clean_labels, adv_labels) -> dict:
    return {"loss/clean": clean_loss.detach(), "loss/adv": adv_loss.detach(),
            "acc/clean": accuracy(clean_logits, clean_labels), "acc/adv": accuracy(adv_logits, adv_labels)}


# ----------------------------------------------------------------------------- the training attack

def make_adversarial(ctx: StepContext, images: torch.Tensor, labels: torch.Tensor, route: str = MAIN,
                     masks: MatchedMasks | None = None) -> torch.Tensor:
    """The run's training attack (cfg.attack, any kind: train/attacks/seam.py train_attack) on
    images through the norms of `route`, on the run's loss; masks: its forwards draw the step's
    dropout masks."""
    forward = masks.around(ctx.attack_model) if masks is not None else None
    return train_attack(ctx.cfg.attack, ctx.attack_model, images, labels, num_classes=ctx.num_classes, route=route,
                        loss=attack_loss(ctx.cfg), forward=forward)


def attack_source(ctx: StepContext, images: torch.Tensor, labels: torch.Tensor, mix_attacked: bool):
    """What a dual-norm method attacks: the batch it was given, or, with Mixup/CutMix on and
    mix_attacked false (the Fast AdvProp authors' default), the batch before the mix."""
    if ctx.unmixed is None or mix_attacked:
        return images, labels
    return ctx.unmixed


# ----------------------------------------------------------------------------- dual norms

# Clean and adversarial images take two forwards (main, then aux norms) and one backward rather than
# one concatenated forward with a split route: splitting and re-joining the batch at every norm layer
# costs ~20% of a step on CPU, for no fewer FLOPs.

def main_and_aux_forward(ctx: StepContext, clean: torch.Tensor, adversarial: torch.Tensor,
                         masks: MatchedMasks | None = None):
    same = masks.same if masks is not None else nullcontext
    with same():
        clean_logits = ctx.model(clean)
    with use_norm(ctx.attack_model, AUX), same():
        adv_logits = ctx.model(adversarial)
    return clean_logits, adv_logits


def per_group_scales(ctx: StepContext, shared: float, main: float, aux: float) -> list:
    """Gradient factors that turn a backward of Σ w·ℓ / shared into each norm set's own average:
    main norms divided by their weighted image count `main`, aux norms by `aux` (train/methods/__init__.py)."""
    scales = [(route_parameters(ctx.attack_model, MAIN), shared / main)]
    if aux > 0:
        scales.append((route_parameters(ctx.attack_model, AUX), shared / aux))
    return scales


# ----------------------------------------------------------------------------- matched dropout masks

class MatchedMasks:
    """Dropout and stochastic-depth masks drawn once per step: every forward inside same() starts the
    random generators of the CPU and the step's device from the step's seed, so it draws the masks
    of every other such forward of the step (the batch's shape is the same), and the run's
    generators are left as they were. The seed is drawn from the run's generator: new masks each
    step. PyramidAT's code does this with one dropout key per step (scenic's dropout_rng)."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.seed = int(torch.randint(0, 2**62, ()))

    @contextmanager
    def same(self):
        cuda = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            torch.random.default_generator.manual_seed(self.seed)
            for device in cuda:
                with torch.cuda.device(device):
                    torch.cuda.manual_seed(self.seed)
            yield

    def around(self, model):
        """model's forward, drawing the step's masks."""
        def forward(x: torch.Tensor) -> torch.Tensor:
            with self.same():
                return model(x)
        return forward
