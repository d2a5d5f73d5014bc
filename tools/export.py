#!/usr/bin/env python
"""Export a training checkpoint as a model folder in timm's Hub layout, and push it to the Hugging Face Hub.

    python tools/export.py runs/demo runs/demo_model                        # the run's best checkpoint
    python tools/export.py runs/demo/checkpoints/epoch_0004 epoch4_model    # a given checkpoint
    python tools/export.py runs/demo --push-to-hub USER/NAME [--private]    # uploaded (OUT optional)

OUT gets config.json (architecture, classes, and the preprocessing the run validated with),
model.safetensors (main norms, plain timm architecture) and README.md (the model card); train/run.py
writes the same at the end of every run (<output_dir>/final_model/). Load it with timm alone:

    model = timm.create_model("local-dir:runs/demo_model", pretrained=True)   # or "hf-hub:USER/NAME"
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))

--eval-report adds tools/evaluate.py's numbers (its --json: AutoAttack, mCE, …) to the card.
OUT is never written inside the checkpoint (or any checkpoint folder), nor over a folder that is not
an export; an existing export is replaced only with --overwrite; a missing parent folder is made. All
of it is checked before the checkpoint is loaded (tools/output_guard.py: a folder on /proc, behind a
symlink loop or under a file is refused). --push-to-hub needs a Hugging Face
token (`hf auth login` or HF_TOKEN) and uploads the folder as one commit. Exit 2 with one line when
it cannot export or upload (nothing written, nothing uploaded), 3 when the checkpoint's weights hold
a NaN or an infinity (nothing is written).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from common.errors import UserInputError
from common.exit_status import run_entry_point
from models.hub import hub_error
from tools.output_guard import check_export_folder
from train.model_export import checkpoint_results, export_model
from train.model_loading import checkpoint_folder, load_checkpoint_model
from train.run_state import read_state


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path,
                        help="a run folder (its checkpoints/best, else last) or a checkpoint folder")
    parser.add_argument("out", type=Path, nargs="?", help="the folder to write (optional with --push-to-hub)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it is an export already")
    parser.add_argument("--eval-report", type=Path, action="append", default=[], metavar="JSON",
                        help="a tools/evaluate.py --json report of these weights, for the card (repeatable)")
    parser.add_argument("--push-to-hub", metavar="USER/NAME", help="upload the folder to this Hub repository")
    parser.add_argument("--private", action="store_true", help="with --push-to-hub: create the repository private")
    args = parser.parse_intermixed_args(argv)  # OUT may follow the options
    if args.out is None and not args.push_to_hub:
        parser.error("give OUT (the folder to write), --push-to-hub USER/NAME, or both")
    if args.private and not args.push_to_hub:
        parser.error("--private goes with --push-to-hub")
    return args


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    if not args.checkpoint.is_dir():
        raise UserInputError(f"{args.checkpoint} is a file, not a folder: give a run or checkpoint folder"
                             if args.checkpoint.exists() else f"{args.checkpoint} does not exist")
    folder = checkpoint_folder(args.checkpoint)
    if args.out is not None:
        check_export_folder(args.out, inputs=[folder], overwrite=args.overwrite)
    if args.push_to_hub:
        check_hub_upload(args.push_to_hub)
    evaluations = [read_eval_report(path) for path in args.eval_report]
    model, cfg, classes = load_checkpoint_model(folder)
    run_dir = folder.parent.parent if folder.parent.name == "checkpoints" else None
    results = checkpoint_results(run_dir, read_state(folder))
    load_name = f"hf-hub:{args.push_to_hub}" if args.push_to_hub else ""
    with tempfile.TemporaryDirectory() as scratch:
        out = args.out or Path(scratch) / "model"
        export_model(model.net, out, cfg, classes, results, evaluations=evaluations, load_name=load_name)
        if args.out is not None:
            print(f"wrote {out} from {folder}: {cfg.model}, {len(classes)} classes, normalization={cfg.normalization}")
        if args.push_to_hub:
            push(out, args.push_to_hub, private=args.private)


def read_eval_report(path: Path) -> dict:
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise UserInputError(f"--eval-report {path}: {type(error).__name__}: {error}") from None
    if not isinstance(report, dict) or "model" not in report:
        raise UserInputError(f"--eval-report {path} is not a report of tools/evaluate.py --json")
    return report


def check_hub_upload(repo_id: str) -> None:
    """Before any work: a repository name of the form USER/NAME, and a token to upload with."""
    from huggingface_hub import get_token

    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise UserInputError(f"--push-to-hub {repo_id}: give USER/NAME (or ORGANIZATION/NAME)")
    if get_token() is None:
        raise UserInputError(f"--push-to-hub {repo_id}: no Hugging Face token (log in with `hf auth login`, or set "
                             f"HF_TOKEN); nothing was exported or uploaded")


def push(folder: Path, repo_id: str, *, private: bool) -> None:
    """Upload the folder's files as one commit: the repository gets all of them or none."""
    from huggingface_hub import HfApi
    from timm import __version__ as timm_version

    files = sorted(p for p in folder.iterdir() if p.is_file())
    size = sum(p.stat().st_size for p in files) / 1e6
    print(f"uploading {', '.join(p.name for p in files)} ({size:.1f} MB) to https://huggingface.co/{repo_id} "
          f"({'private' if private else 'public unless it exists already'})", flush=True)
    api, created = HfApi(library_name="timm", library_version=timm_version), False
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        created = True
        commit = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message="Add model (AdvProp trainer)")
    except Exception as error:  # offline, no such user, no write access: huggingface_hub's errors
        made = f" (the repository {repo_id} exists, without this model)" if created else ""
        raise UserInputError(f"cannot upload to the Hugging Face Hub: {hub_error(error)}; nothing was "
                             f"uploaded{made}") from None
    print(f"uploaded: {commit.commit_url}")


if __name__ == "__main__":
    sys.exit(run_entry_point(main, sys.argv[1:]))
