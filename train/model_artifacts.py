"""The trained model in W&B: main-norm exports logged as artifacts of type `model`.

    model-<W&B run id>        the model as tools/export.py writes it (timm's Hub folder: config.json,
                              model.safetensors, README.md), one version per logged epoch
    model-<W&B run id>-ema    the EMA's, at the end of a run that keeps one

Aliases: `latest` (the end of training), `best` (the best val top-1 so far), `epoch-N`. During
training, wandb_log_checkpoints=best logs the weights each time val top-1 improves, `all` every
epoch, `none` only the end. Only the main-norm weights go up, never the optimizer state. A
downloaded artifact loads with `timm.create_model("local-dir:<its folder>", pretrained=True)`; the
metadata repeats the essentials: timm model name, classes, normalisation, val image size and crop
ratio, method and attack, and the epoch's (or the final) accuracies.

Each logged key (epoch_0003, final_0008, final_ema_0008) is written to <run>/wandb_artifacts.json,
so a resumed run, or a rerun that redoes the final evaluation, never logs the same weights twice
(a run extended to more epochs logs its new end). In offline mode the artifacts are recorded in
the offline run and uploaded by `wandb sync`.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from omegaconf import OmegaConf

from models.export import EXPORT_FORMAT
from models.hub import is_export_folder
from train.model_export import epoch_results, export_model, val_preprocessing
from train.model_loading import checkpoint_folder
from train.run_state import read_state

RECORD = "wandb_artifacts.json"
FINAL_EXPORT, FINAL_EMA_EXPORT = "final_model", "final_ema_model"  # folders in the run folder
# the single-file exports of runs made before the folder (and, before every norm kind was dual, their
# names then): a rerun of such a run replaces them by the folders
OLD_FINAL_EXPORTS = ("final_main_norm.safetensors", "final_ema_main_norm.safetensors", "final_main_bn.safetensors",
                     "final_ema_main_bn.safetensors")


def logged_artifacts(run_dir: Path) -> dict:
    """{key: {"name", "aliases", "files"}} of what this run folder has logged to W&B."""
    try:
        return json.loads((Path(run_dir) / RECORD).read_text())
    except (OSError, ValueError):
        return {}


class ModelArtifacts:
    def __init__(self, run, run_dir: Path, cfg, classes: list[str]):
        """run: the wandb Run, or None (no W&B, or not the main process): then nothing is logged."""
        self.run, self.run_dir, self.cfg, self.classes = run, Path(run_dir), cfg, classes
        self.name = f"model-{run.id}" if run is not None else ""

    def metadata(self, **results) -> dict:
        cfg, preprocessing = self.cfg, val_preprocessing(self.cfg)
        return {"model": cfg.model, "classes": self.classes, "num_classes": len(self.classes),
                "normalization": cfg.normalization, "image_size": preprocessing["input_size"][-1],
                "crop_ratio": cfg.data.crop_ratio, "method": cfg.method,
                "attack": OmegaConf.to_container(cfg.attack, resolve=True), "format": EXPORT_FORMAT,
                "load": 'timm.create_model("local-dir:<the downloaded folder>", pretrained=True); its '
                        'preprocessing: timm.data.resolve_data_config({}, model=model)',
                **results}

    def log(self, key: str, name: str, folder: Path, aliases: list[str], metadata: dict) -> None:
        import wandb

        done = logged_artifacts(self.run_dir)
        if self.run is None or key in done:
            return
        artifact = wandb.Artifact(name, type="model", metadata=metadata)
        artifact.add_dir(str(folder))  # copied into W&B's staging area now
        self.run.log_artifact(artifact, aliases=aliases)
        done[key] = {"name": name, "aliases": aliases, "epoch": metadata["epoch"], "final": key.startswith("final"),
                     "ema": name.endswith("-ema")}
        (self.run_dir / RECORD).write_text(json.dumps(done, indent=1))

    def epoch_end(self, net, epoch: int, metrics: dict, is_best: bool, last: bool) -> None:
        """After an epoch's checkpoint: its weights, if wandb_log_checkpoints asks (the last epoch's
        go up once, as the run's final model)."""
        policy = self.cfg.wandb_log_checkpoints
        if self.run is None or last or policy == "none" or (policy == "best" and not is_best):
            return
        with tempfile.TemporaryDirectory(dir=self.run_dir) as folder:
            export = export_model(net, Path(folder) / "model", self.cfg, self.classes, epoch_results(metrics, epoch))
            self.log(f"epoch_{epoch:04d}", self.name, export, [f"epoch-{epoch}"] + (["best"] if is_best else []),
                     self.metadata(epoch=epoch, val_top1=metrics["val/top1"], val_top5=metrics["val/top5"]))

    def final(self, report: dict, epoch: int, best_is_last: bool) -> None:
        """The end-of-run exports (FINAL_EXPORT, FINAL_EMA_EXPORT)."""
        results = {k: report[k] for k in ("clean_top1", "clean_top5", "robust_top1", "robust_attack") if k in report}
        aliases = ["latest", f"epoch-{epoch}"] + (["best"] if best_is_last else [])
        self.log(f"final_{epoch:04d}", self.name, self.run_dir / FINAL_EXPORT, aliases,
                 self.metadata(epoch=epoch, **results))
        ema = self.run_dir / FINAL_EMA_EXPORT
        if ema.is_dir():
            self.log(f"final_ema_{epoch:04d}", f"{self.name}-ema", ema, ["latest", f"epoch-{epoch}"],
                     self.metadata(epoch=epoch, ema_decay=self.cfg.ema_decay))


def evaluated_artifact(checkpoint: Path, run_dir: Path | None) -> str | None:
    """"model-<id>:epoch-N" of the artifact that holds the weights at `checkpoint` (a run or
    checkpoint folder, or one of the run's final exports), if its run logged one; else None."""
    if run_dir is None:
        return None
    entries = list(logged_artifacts(run_dir).values())
    checkpoint = Path(checkpoint)
    if checkpoint.is_dir() and not is_export_folder(checkpoint):
        state = read_state(checkpoint_folder(checkpoint))
        if state.batch:  # saved mid-epoch: no artifact holds these weights
            return None
        ema, epoch = False, state.epoch
    else:  # a final export (the folder, or a single file of a run made before it): the run's last end
        ema = checkpoint.name.startswith("final_ema")
        epoch = max((e["epoch"] for e in entries if e["final"] and e["ema"] == ema), default=None)
    match = [e for e in entries if e["epoch"] == epoch and e["ema"] == ema]
    return f"{match[0]['name']}:epoch-{epoch}" if match else None
