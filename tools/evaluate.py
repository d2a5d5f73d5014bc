#!/usr/bin/env python
r"""Robustness report for a trained model: clean, PGD, AutoAttack, APGD, ImageNet-C, -A, -R and
Stylized-ImageNet.

    python tools/evaluate.py runs/demo --data data/digits/val --attack pgd eps=4 steps=5 \
        --attack autoattack eps=4 --corrupt --json runs/demo/eval.json --wandb-run
    python tools/evaluate.py b0_ap.pth --model tf_efficientnet_b0.ap_in1k --data imagenet/val \
        --imagenet-c imagenet-c --imagenet-a imagenet-a --imagenet-r imagenet-r --stylized sin/val

CHECKPOINT: a run folder (its checkpoints/best, else last), a checkpoint folder, a model export
folder (timm's Hub layout: tools/export.py, a run's final_model/) or `hf-hub:USER/NAME` (the same
on the Hugging Face Hub: the only download), a single-file export of older runs (.safetensors), or
a plain timm state dict (.safetensors/.pth) with --model NAME. Images go through the training run's
val transform (resize the shorter side, center crop; an export's: its config.json's). Sizes of
--attack are pixel units (/255) like the training config.
A set that cannot be evaluated is reported as FAILED with the reason, the others still run and are
reported and written, and the exit status is 1 (2: the model or an option is unusable). Attacks
are untargeted, on the eval-mode model through its main norms (--norm aux: the auxiliary ones;
--bn is its old name, still accepted).
Runs under
`accelerate launch` too (each process evaluates its shard; numbers are summed).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from common.errors import UserInputError
from common.exit_status import run_entry_point
from models.dual_norm import dual_norm_layers
from models.hub import is_hub_name
from tools.output_guard import check_output_file, check_output_folder
from tools.robustness import imagenet_c, report as reporting, sets
from tools.robustness.folders import data_classes
from tools.robustness.load import load_any
from train.attacks import ATTACK_PRESETS, ATTACKS, attack_checks, build_attack, describe, node_type
from train.config import attack_setting
from train.interpolations import refuse_resolvers, resolve_or_refuse
from train.model_artifacts import evaluated_artifact
from train.tracking import wandb_mode, wandb_project_problem


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path,
                        help="run/checkpoint folder, export folder, hf-hub:USER/NAME, exported .safetensors, or "
                             "timm state dict")
    parser.add_argument("--data", required=True, type=Path,
                        help="val ImageFolder (clean and robust accuracy), or WebDataset shards: a folder with "
                             "_info.json (its val/validation split) or a .tar brace pattern")
    parser.add_argument("--model", help="timm architecture of a plain state dict (e.g. tf_efficientnet_b0.ap_in1k)")
    parser.add_argument("--attack", nargs="+", action="append", metavar="NAME KEY=VALUE",
                        help="robust top-1 under an untargeted attack (sizes in pixel units), repeatable: "
                             "`pgd eps=4 steps=5` (keys: eps, step_size, steps, random_start, start_rule, "
                             "reach_eps) or a preset pgd1|pgd3|pgd4|pgd5|fgsm; `pyramid` (PyramidAT's attack, "
                             "its published values; keys eps, step_size, steps, levels='[32,16,1]', "
                             "multipliers='[20,10,1]', start=zero|uniform|normal); `autoattack eps=4` (the "
                             "standard version: APGD-CE, APGD-T, FAB-T, Square; keys eps, seed); `apgd eps=4` "
                             "(keys eps, steps, restarts, loss=ce|dlr, seed)")
    parser.add_argument("--imagenet-c", type=Path, help="ImageNet-C root: <corruption>/<1-5>/<wnid>/")
    parser.add_argument("--corrupt", action="store_true", help="synthesise ImageNet-C corruptions from --data")
    parser.add_argument("--corruptions", default=",".join(imagenet_c.CORRUPTIONS),
                        help="with --corrupt: comma-separated names")
    parser.add_argument("--severities", default="1,2,3,4,5", help="with --corrupt: comma-separated, 1-5")
    parser.add_argument("--imagenet-a", type=Path, help="ImageNet-A root (<wnid>/ folders, 200 classes)")
    parser.add_argument("--imagenet-r", type=Path, help="ImageNet-R root (<wnid>/ folders, 200 classes)")
    parser.add_argument("--stylized", type=Path, help="Stylized-ImageNet val ImageFolder")
    parser.add_argument("--norm", choices=NORMS, default="main", help="norms of a dual-norm checkpoint")
    parser.add_argument("--bn", choices=NORMS, dest="norm", action=OldName, help=argparse.SUPPRESS)
    parser.add_argument("--image-size", type=int, help="val crop size (default: the run's or timm's)")
    parser.add_argument("--crop-ratio", type=float, help="val crop ratio (default: the run's or timm's)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2, help="decode workers per process")
    parser.add_argument("--limit", type=int, default=0, help="about N images per set: a quick look only")
    parser.add_argument("--seed", type=int, default=0, help="PGD random start and synthesised corruptions")
    parser.add_argument("--json", type=Path, help="write every number to this JSON file (atomically)")
    parser.add_argument("--wandb-run", nargs="?", const="", metavar="RUN_ID",
                        help="log to W&B: into RUN_ID, by default the training run of the checkpoint "
                             "(its wandb_id.txt), else a new run; offline without a login")
    parser.add_argument("--wandb-project", default="advprop")
    return parser.parse_args(argv)


NORMS = ("main", "aux")


class OldName(argparse._StoreAction):
    """An option's name from before a rename (--bn → --norm): still works, and says the new name."""

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"note: {option_string} is now called --{self.dest} (the old name still works)", file=sys.stderr)
        super().__call__(parser, namespace, values, option_string)


def parse_attack(tokens: list[str]) -> dict:
    """`NAME KEY=VALUE…` (NAME an attack kind of train/attacks/ or a preset, `pgd5 eps=2`) →
    {attack: the attack, key, name: for the report}."""
    name, *pairs = tokens
    if name not in ATTACK_PRESETS:
        raise UserInputError(f"--attack {name}: use one of {tuple(ATTACKS)} KEY=VALUE… or a preset "
                             f"{tuple(p for p in ATTACK_PRESETS if p not in ATTACKS)}")
    preset = attack_setting("eval_attack", name)
    try:
        given = OmegaConf.from_dotlist(pairs)
        refuse_resolvers(given, f"--attack {' '.join(tokens)}")  # the report and W&B would hold what it reads
        node = OmegaConf.merge(OmegaConf.structured(node_type(ATTACKS[preset["kind"]])), preset, given)
        resolve_or_refuse(node, f"--attack {' '.join(tokens)}")
    except (OmegaConfBaseException, ValueError) as error:
        raise UserInputError(f"--attack {' '.join(tokens)}: {error} (robust accuracy is measured under "
                             f"untargeted attacks, on the model's eval-mode BN statistics)".replace("\n", "; ")) from None
    problems = [f"{key} {problem}" for ok, key, problem in attack_checks(node, name, needed="to attack at all")
                if not ok]
    if problems:
        raise UserInputError(f"--attack {' '.join(tokens)}: {'; '.join(problems)}")
    key, title = describe(node)
    return {"attack": build_attack(node), "key": key, "name": title}


def model_classes(classes: list[str] | None, model, data: Path) -> list[str]:
    """The class name of each output: from the weights, else the val folder's when the count fits."""
    outputs = model.net.get_classifier().weight.shape[0]
    source = "its weights" if classes else f"the class folders of {data}"
    classes = classes or data_classes(data)
    if len(classes) != outputs:
        raise UserInputError(f"the model has {outputs} outputs but {source} name {len(classes)} classes")
    return classes


def evaluate_all(args, ctx: sets.EvalContext, attacks: list, report: dict) -> None:
    """Every requested set in turn; a failing set is recorded in report["errors"] and the rest go on."""
    def attempt(name: str, evaluation):
        try:
            report[name] = evaluation()
        except (UserInputError, OSError) as error:  # OSError: a missing folder or an unreadable image
            report["errors"][name] = str(error) if isinstance(error, UserInputError) else f"{type(error).__name__}: {error}"
            ctx.accelerator.print(f"error: {name}: {report['errors'][name]}", file=sys.stderr)

    attempt("clean", lambda: sets.clean(ctx, args.data))
    if attacks:
        attempt("robust", lambda: [sets.robust(ctx, args.data, attack) for attack in attacks])
    if args.imagenet_c:
        clean_error = 100 - report["clean"]["top1"] if "clean" in report else None
        attempt("imagenet_c", lambda: sets.imagenet_c_folder(ctx, args.imagenet_c, clean_error))
    if args.corrupt:
        attempt("corrupted", lambda: sets.synthesized_corruptions(ctx, args.data, *corruption_grid(args)))
    for name, folder in (("imagenet_a", args.imagenet_a), ("imagenet_r", args.imagenet_r)):
        if folder:
            attempt(name, lambda folder=folder: sets.imagenet_subset(ctx, folder))
    if args.stylized:
        attempt("stylized", lambda: sets.clean(ctx, args.stylized))


def corruption_grid(args) -> tuple[list[str], list[int]]:
    corruptions = [c for c in args.corruptions.split(",") if c]
    unknown = set(corruptions) - set(imagenet_c.CORRUPTIONS + imagenet_c.EXTRA_CORRUPTIONS)
    severities = [int(s) for s in args.severities.split(",") if s.strip().isdigit()]
    if unknown or not corruptions or not set(severities) <= set(imagenet_c.SEVERITIES) or not severities:
        raise UserInputError(f"--corruptions {args.corruptions} --severities {args.severities}: corruptions "
                             f"are ImageNet-C names ({', '.join(imagenet_c.CORRUPTIONS)}), severities 1-5")
    return corruptions, severities


def run_dir_of(checkpoint: Path) -> Path | None:
    """The training run folder of a checkpoint (it holds wandb_id.txt), if any."""
    if is_hub_name(str(checkpoint)):
        return None
    folder = checkpoint.resolve()
    return next((f for f in (folder, *folder.parents[:3]) if (f / "wandb_id.txt").is_file()), None)


def check_outputs(args) -> None:
    """--json and W&B's folder can be written, and W&B takes the project name (tools/output_guard.py)."""
    read = [args.data, args.imagenet_c, args.imagenet_a, args.imagenet_r, args.stylized]
    read += [args.checkpoint] if args.checkpoint.is_file() else []  # a run folder may hold the report
    if args.json:
        check_output_file(args.json, inputs=[p for p in read if p], overwrite=True, example="eval.json")
    if args.wandb_run is not None:
        problem = wandb_project_problem(args.wandb_project)
        if problem:
            raise UserInputError(f"--wandb-project {args.wandb_project!r} {problem}")
        check_output_folder((run_dir_of(args.checkpoint) or Path(".")) / "wandb")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_outputs(args)  # before the evaluation: a report that cannot be written is not run
    attacks = [parse_attack(tokens) for tokens in args.attack or []]
    model, cfg, classes = load_any(args.checkpoint, model_name=args.model)
    classes = model_classes(classes, model, args.data)
    if args.norm == "aux" and not dual_norm_layers(model):
        raise UserInputError(f"--norm aux: {args.checkpoint} has no auxiliary norms (a dual-norm method's "
                             f"checkpoint folder has them; exports keep the main norms only)")
    overrides = {"image_size": args.image_size, "val_image_size": args.image_size, "crop_ratio": args.crop_ratio}
    cfg = OmegaConf.merge(cfg, {"data": {k: v for k, v in overrides.items() if v is not None}})
    accelerator = Accelerator()
    set_seed(args.seed, device_specific=True)
    ctx = sets.EvalContext(model.to(accelerator.device, memory_format=torch.channels_last), cfg, classes,
                           accelerator, route=args.norm, batch_size=args.batch_size, workers=args.workers,
                           limit=args.limit, seed=args.seed)
    report = {"model": {"path": str(args.checkpoint), "name": cfg.model, "norm": args.norm, "classes": len(classes),
                        "image_size": cfg.data.val_image_size or cfg.data.image_size,
                        "crop_ratio": cfg.data.crop_ratio, "limit": args.limit}, "errors": {}}
    evaluate_all(args, ctx, attacks, report)
    if accelerator.is_main_process:
        print("\n" + reporting.format_table(report))
        if args.json:
            reporting.write_json(report, args.json)
            print(f"\nwrote {args.json}")
        if args.wandb_run is not None:
            run_dir = run_dir_of(args.checkpoint)
            run_id = args.wandb_run or ((run_dir / "wandb_id.txt").read_text().strip() if run_dir else None)
            artifact = evaluated_artifact(args.checkpoint, run_dir)
            logged = reporting.log_wandb(report, project=args.wandb_project, run_id=run_id,
                                         run_dir=run_dir or Path("."), mode=wandb_mode(), artifact=artifact)
            print(f"logged to W&B run {logged} ({wandb_mode()})" + (f"; the model artifact: {artifact}" if artifact else ""))
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(run_entry_point(main, sys.argv[1:]))
