"""Everything a run reports: metrics.jsonl (always), W&B through Accelerate's trackers (offline
unless a W&B login exists) with its metrics defined for the dashboard, and clean | adversarial |
perturbation image panels (PNG in the run directory and W&B). Only the main process writes; the
W&B run id is kept in the run directory so a resumed run logs into the same W&B run."""
from __future__ import annotations

import json
import netrc
import os
import uuid
from pathlib import Path

import torch
from torchvision.utils import make_grid, save_image


def wandb_mode() -> str:
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        return "online" if netrc.netrc().authenticators("api.wandb.ai") else "offline"
    except (FileNotFoundError, netrc.NetrcParseError):
        return "offline"


PANEL_PADDING = 1  # black pixels around and between a panel's images


def perturbation_panel(clean: torch.Tensor, adversarial: torch.Tensor, count: int = 8) -> torch.Tensor:
    """Rows: clean, adversarial, perturbation stretched to [0, 1] (grey = no change)."""
    clean, adversarial = clean[:count].float().cpu(), adversarial[:count].float().cpu()
    delta = adversarial - clean
    scale = delta.abs().amax().clamp_min(1e-12)
    return make_grid(torch.cat([clean, adversarial, delta / (2 * scale) + 0.5]), nrow=len(clean),
                     padding=PANEL_PADDING)


STEP = "optimizer_step"
# W&B summaries: the best value of a run, not its last (W&B's default)
BEST_IS_MAX = [f"{prefix}/{name}" for prefix in ("val", "val_ema", "val_aux") for name in ("top1", "top5")]
BEST_IS_MIN = ["val/loss", "val_ema/loss", "val_aux/loss", "train/loss/clean", "train/loss/adv", "train/loss/attack"]


def define_dashboard(run) -> None:
    """Charts that read at a glance: training curves against the optimizer step, evaluations
    against the epoch, speed in one section (perf/), summaries that keep the best value."""
    run.define_metric(STEP)
    run.define_metric("epoch")
    for prefix in ("train/*", "perf/*", "panel/*"):
        run.define_metric(prefix, step_metric=STEP)
    for prefix in ("val/*", "val_ema/*", "val_aux/*", "final/*", "compile/*"):
        run.define_metric(prefix, step_metric="epoch")
    for name in BEST_IS_MAX + ["final/clean_top1", "final/robust_top1"]:
        run.define_metric(name, step_metric="epoch" if not name.startswith("train") else STEP, summary="max")
    for name in BEST_IS_MIN:
        run.define_metric(name, step_metric=STEP if name.startswith("train") else "epoch", summary="min")


class RunLog:
    def __init__(self, accelerator, cfg, run_dir: Path, config_dict: dict):
        self.accelerator, self.run_dir = accelerator, run_dir
        self.main = accelerator.is_main_process
        self.use_wandb = cfg.tracker == "wandb"
        self.metrics_file = open(run_dir / "metrics.jsonl", "a") if self.main else None
        if self.use_wandb:
            os.environ.setdefault("WANDB_SILENT", "true")  # our own lines say where the run is
            accelerator.init_trackers(cfg.wandb_project, config=config_dict, init_kwargs={"wandb": {
                "id": self._wandb_id(), "resume": "allow", "mode": wandb_mode(), "name": cfg.name,
                "dir": str(run_dir), "group": cfg.wandb_group or None}})
            if self.main:
                define_dashboard(self.wandb_run)

    @property
    def wandb_run(self):
        """The wandb Run (main process, tracker=wandb), else None."""
        return self.accelerator.get_tracker("wandb", unwrap=True) if self.use_wandb and self.main else None

    def _wandb_id(self) -> str:
        id_file = self.run_dir / "wandb_id.txt"
        if self.main and not id_file.exists():
            id_file.write_text(uuid.uuid4().hex[:12])
        self.accelerator.wait_for_everyone()
        return id_file.read_text().strip()

    def log(self, metrics: dict, step: int) -> None:
        metrics = {k: (v.item() if torch.is_tensor(v) else v) for k, v in metrics.items()}
        if self.main:
            self.metrics_file.write(json.dumps({"step": step, **metrics}) + "\n")
            self.metrics_file.flush()
        if self.use_wandb:  # the step as a metric too: train/* and perf/* are charted against it
            self.accelerator.log({**metrics, STEP: step}, step=step)

    def log_panel(self, clean: torch.Tensor, adversarial: torch.Tensor, step: int) -> None:
        if not self.main:
            return
        panel = perturbation_panel(clean, adversarial)
        (self.run_dir / "panels").mkdir(exist_ok=True)
        save_image(panel, self.run_dir / "panels" / f"step_{step:08d}.png")
        if self.use_wandb:
            import wandb
            caption = "rows: clean | adversarial | perturbation (stretched)"
            self.accelerator.log({"panel/adversarial": wandb.Image(panel, caption=caption)}, step=step)

    def close(self) -> None:
        if self.metrics_file:
            self.metrics_file.close()
        if self.use_wandb:
            run = self.accelerator.get_tracker("wandb", unwrap=True)
            where = getattr(run, "dir", self.run_dir)
            self.accelerator.end_training()
            if self.main:
                print(f"W&B run ({wandb_mode()}): {where}" + ("  — upload later with `wandb sync "
                      f"{Path(where).parent}`" if wandb_mode() == "offline" else ""))
