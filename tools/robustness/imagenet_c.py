"""ImageNet-C (Hendrycks & Dietterich, ICLR 2019): the folder layout and the mCE arithmetic.

Layout: <root>/<corruption>/<severity 1..5>/<class wnid>/<image>.

With E(c, s) the model's top-1 error on corruption c at severity s, E_clean its clean error, and
A(c, s), A_clean AlexNet's:
    CE(c)          = Σ_s E(c, s) / Σ_s A(c, s)
    relative CE(c) = Σ_s (E(c, s) − E_clean) / Σ_s (A(c, s) − A_clean)
    mCE, relative mCE = their means over the 15 corruptions (in percent).
Only AlexNet's mean over the 5 severities enters (Σ_s A = 5 · mean), so a folder holding fewer
severities is normalised by that mean too: a partial folder gives a "partial" mCE, marked as such.
"""
from __future__ import annotations

from pathlib import Path

from common.errors import UserInputError
from pipelines.sources.folder.listing import find_classes

# The 15 corruptions of the benchmark, in the authors' order (noise, blur, weather, digital).
CORRUPTIONS = (
    "gaussian_noise", "shot_noise", "impulse_noise",
    "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "brightness",
    "contrast", "elastic_transform", "pixelate", "jpeg_compression",
)
EXTRA_CORRUPTIONS = ("speckle_noise", "gaussian_blur", "spatter", "saturate")  # held-out set: not in mCE
SEVERITIES = (1, 2, 3, 4, 5)

# AlexNet's top-1 error per corruption, averaged over severities 1-5 (fractions): the table of
# Hendrycks & Dietterich 2019 (github.com/hendrycks/robustness, "Raw AlexNet errors"), as
# AugMix's imagenet.py (google-research/augmix) and mmpretrain normalise with.
ALEXNET_ERROR = dict(zip(CORRUPTIONS, (
    0.886428, 0.894468, 0.922640,
    0.819880, 0.826268, 0.785948, 0.798360,
    0.866816, 0.826572, 0.819324, 0.564592,
    0.853204, 0.646056, 0.717840, 0.606500,
)))
# AlexNet's clean ImageNet val top-1 error: 43.5 % in the paper; 0.43478 = 1 − 56.522 %, torchvision's
# documented top-1 of the AlexNet weights the authors evaluated.
ALEXNET_CLEAN_ERROR = 0.43478


def read_layout(root: str | Path) -> dict[str, dict[int, Path]]:
    """{corruption: {severity: folder}} of the benchmark corruptions present; anything off is an error."""
    root = Path(root)
    if not root.is_dir():
        raise UserInputError(f"ImageNet-C folder {root} does not exist")
    layout = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        if folder.name in EXTRA_CORRUPTIONS:
            continue
        if folder.name not in CORRUPTIONS:
            raise UserInputError(f"ImageNet-C folder {root}: {folder.name}/ is not one of the 15 corruptions "
                                 f"(expected <corruption>/<severity 1-5>/<class>/, e.g. fog/3/n01440764/)")
        severities = sorted(p.name for p in folder.iterdir() if p.is_dir())
        wrong = [s for s in severities if s not in map(str, SEVERITIES)]
        if wrong or not severities:
            raise UserInputError(f"ImageNet-C folder {folder}: needs severity folders 1-5, found {severities}")
        for severity in severities:
            find_classes(folder / severity)  # each must hold class folders
        layout[folder.name] = {int(s): folder / s for s in severities}
    if not layout:
        raise UserInputError(f"ImageNet-C folder {root} holds none of the 15 corruption folders "
                             f"({', '.join(CORRUPTIONS[:3])}, …)")
    return {c: layout[c] for c in CORRUPTIONS if c in layout}  # the authors' order


def summarize(errors: dict[str, dict[int, float]], clean_error: float | None, *, normalize: bool) -> dict:
    """Per-corruption and mean errors from errors[corruption][severity] = top-1 error (%).

    normalize=True (an ImageNet-C folder): AlexNet-normalised CE and mCE and, given the clean error
    (%), relative CE and relative mCE. normalize=False (corruptions synthesised from another data set,
    where AlexNet's errors mean nothing): the plain mean error only.
    """
    mean_error = {c: sum(e.values()) / len(e) for c, e in errors.items()}
    complete = set(errors) == set(CORRUPTIONS) and all(len(e) == len(SEVERITIES) for e in errors.values())
    summary = {"errors": errors, "corruption_error": mean_error, "complete": complete,
               "mean_corruption_error": sum(mean_error.values()) / len(mean_error), "normalized": normalize}
    if not normalize:
        return summary
    ce = {c: mean_error[c] / ALEXNET_ERROR[c] for c in mean_error}  # % / fraction = %
    summary.update(ce=ce, mce=sum(ce.values()) / len(ce))
    if clean_error is not None:
        relative = {c: (mean_error[c] - clean_error) / (ALEXNET_ERROR[c] - ALEXNET_CLEAN_ERROR) for c in mean_error}
        summary.update(relative_ce=relative, relative_mce=sum(relative.values()) / len(relative),
                       clean_error=clean_error)
    return summary
