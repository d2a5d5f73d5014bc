"""One function per kind of evaluation set; each returns a dict of numbers (percent) for the report.

All of them go through train/loop.py's evaluate() (top-1/top-5, every image counted once across
processes, optional attack) and the torchvision val loader of the model's config, so the numbers mean
what the training run's val numbers mean.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from omegaconf import OmegaConf

from torch import nn
from tqdm.auto import tqdm

from tools.robustness import imagenet_c
from tools.robustness.folders import (LimitedLoader, RelabeledLoader, SubsetLogits, folder_loader,
                                      imagenet_subset_indices)
from tools.robustness.synthetic import CorruptedLoader
from train.loop import evaluate


@dataclass
class EvalContext:
    model: nn.Module  # Normalized, on the device, eval mode
    cfg: object  # the model's run config: its val resize/crop
    classes: list[str]  # the model's class name per output
    accelerator: object
    route: str = "main"  # which norms of a dual-norm model
    batch_size: int = 64
    workers: int = 2
    limit: int = 0  # > 0: about this many images per set (a quick look, not a result)
    seed: int = 0

    def loader(self, folder: Path, *, relabel: bool = True):
        """The folder's val loader, labels in the model's class space (relabel), limited if asked."""
        loader = folder_loader(folder, self.cfg, self.accelerator, batch_size=self.batch_size, workers=self.workers)
        if relabel and loader.classes != self.classes:
            loader = RelabeledLoader(loader, self.classes, folder)
        return LimitedLoader(loader, self.limit, self.batch_size) if self.limit > 0 else loader

    def run(self, loader, desc: str, *, model: nn.Module | None = None, attack=None) -> dict:
        return evaluate(model or self.model, loader, self.accelerator, route=self.route, attack=attack, desc=desc)


def clean(ctx: EvalContext, folder: Path) -> dict:
    """Top-1/top-5 on an ImageFolder (the val set, Stylized-ImageNet)."""
    return ctx.run(ctx.loader(folder), f"clean {folder.name}")


def robust(ctx: EvalContext, folder: Path, attack: dict) -> dict:
    """Top-1 under an untargeted attack; attack: {attack: an attack of train/attacks/, name, key}."""
    result = ctx.run(ctx.loader(folder), attack["name"], attack=attack["attack"])
    return {"attack": attack["name"], "key": attack["key"], **result}


def imagenet_c_folder(ctx: EvalContext, root: Path, clean_error: float | None) -> dict:
    """An ImageNet-C folder: per-severity errors, CE, mCE, relative mCE.

    Its images are already 224 px center crops of ImageNet val, which the authors only center-crop:
    crop ratio 1 (resize the shorter side to the model's size, center crop) does that, where the
    val ratio (e.g. 224/256) would zoom into them."""
    layout = imagenet_c.read_layout(root)  # the whole layout is checked before any work
    ctx = replace(ctx, cfg=OmegaConf.merge(ctx.cfg, {"data": {"crop_ratio": 1.0}}))
    errors = {}
    pairs = [(c, s) for c, severities in layout.items() for s in severities]
    for corruption, severity in tqdm(pairs, desc="ImageNet-C", disable=not ctx.accelerator.is_local_main_process):
        result = ctx.run(ctx.loader(layout[corruption][severity]), f"{corruption} {severity}")
        errors.setdefault(corruption, {})[severity] = 100 - result["top1"]
    return imagenet_c.summarize(errors, clean_error, normalize=True)


def synthesized_corruptions(ctx: EvalContext, folder: Path, corruptions=imagenet_c.CORRUPTIONS,
                            severities=imagenet_c.SEVERITIES) -> dict:
    """ImageNet-C corruptions made on the fly from a val folder: un-normalised mean errors (AlexNet's
    numbers belong to ImageNet-C's images, so no CE/mCE in the published sense)."""
    base = ctx.loader(folder)
    errors = {}
    pairs = [(c, s) for c in corruptions for s in severities]
    for corruption, severity in tqdm(pairs, desc=f"corrupted {folder.name}",
                                     disable=not ctx.accelerator.is_local_main_process):
        loader = CorruptedLoader(base, corruption, severity, seed=ctx.seed, rank=ctx.accelerator.process_index)
        errors.setdefault(corruption, {})[severity] = 100 - ctx.run(loader, f"{corruption} {severity}")["top1"]
    return {**imagenet_c.summarize(errors, None, normalize=False), "source": str(folder)}


def imagenet_subset(ctx: EvalContext, folder: Path) -> dict:
    """ImageNet-A / ImageNet-R: WordNet-id folders → ImageNet-1k indices; the prediction is the
    argmax over the subset's logits only (Hendrycks et al.'s evaluation)."""
    loader = ctx.loader(folder, relabel=False)  # labels stay the folder's: indices into the subset
    indices = imagenet_subset_indices(loader.classes, ctx.classes, folder)
    subset = SubsetLogits(ctx.model, indices).to(ctx.accelerator.device)
    return {**ctx.run(loader, folder.name, model=subset), "classes": len(indices)}
