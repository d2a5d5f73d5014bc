"""Everything a run reports: metrics.jsonl (always), W&B through Accelerate's trackers (offline
unless a W&B login exists) with its metrics defined for the dashboard, and clean | adversarial |
perturbation image panels (PNG in the run directory and W&B). Only the main process writes; the
W&B run id is kept in the run directory so a resumed run logs into the same W&B run.

A resumed run drops the lines of metrics.jsonl written after its checkpoint (the steps it redoes),
so every step has one line. Online W&B whose server does not answer within REACH_TIMEOUT_S (no
network), or that refuses the run, logs offline instead, after one warning line."""
from __future__ import annotations

import functools
import json
import netrc
import os
import socket
import sys
import threading
import urllib.parse
import uuid
from pathlib import Path

import torch
from torchvision.utils import make_grid, save_image

REACH_TIMEOUT_S = 5.0  # seconds to wait for the W&B server before logging offline


def requested_wandb_mode() -> str:
    """WANDB_MODE, else online where a W&B login exists, else offline."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        return "online" if netrc.netrc().authenticators("api.wandb.ai") else "offline"
    except (FileNotFoundError, netrc.NetrcParseError):
        return "offline"


def wandb_project_problem(project: str) -> str | None:
    """Why W&B would refuse `project` as a project name (its own rule: wandb's Settings), or None.
    Checked with the other settings, before the run writes anything (W&B checks only at init)."""
    if not project.strip():
        return "must name a W&B project (it is empty)"
    from wandb.errors import UsageError
    from wandb.sdk.wandb_settings import Settings
    try:
        Settings.validate_project(project, None)
    except UsageError as error:  # "Invalid project name 'a/b': cannot contain characters …"
        return f"is not a W&B project name: {str(error).split(': ', 1)[-1]}"
    return None


def wandb_mode() -> str:
    """The requested mode, but offline (after one warning) where online's server cannot be reached."""
    mode = requested_wandb_mode()
    return reachable_or_offline() if mode == "online" else mode


@functools.cache  # one probe and one warning per process
def reachable_or_offline() -> str:
    server = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    problem = unreachable(server, REACH_TIMEOUT_S)
    if problem is None:
        return "online"
    go_offline(f"the W&B server {server} cannot be reached ({problem})")
    return "offline"


def go_offline(reason: str) -> None:
    os.environ["WANDB_MODE"] = "offline"  # for this process's later W&B calls too
    print(f"warning: {reason}: logging to W&B offline instead (upload later with `wandb sync`)",
          file=sys.stderr, flush=True)


def unreachable(url: str, timeout: float) -> str | None:
    """Why a TCP connection to url's host cannot be made within timeout seconds (name lookup
    included, which a socket timeout does not bound), or None."""
    parsed = urllib.parse.urlparse(url)
    address = (parsed.hostname or "", parsed.port or (443 if parsed.scheme == "https" else 80))
    outcome: list[str | None] = []

    def connect() -> None:
        try:
            socket.create_connection(address, timeout=timeout).close()
            outcome.append(None)
        except OSError as error:
            outcome.append(error.strerror or str(error) or type(error).__name__)

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout)
    return outcome[0] if outcome else f"no answer in {timeout:g} s"


def keep_metrics_lines(path: Path, keep: int) -> int:
    """Drop the lines after the first `keep` of metrics.jsonl (keep < 0: keep all), atomically;
    returns how many lines it has."""
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines(keepends=True)
    if 0 <= keep < len(lines):
        temporary = path.with_name(f".{path.name}.tmp")
        temporary.write_text("".join(lines[:keep]))
        os.replace(temporary, path)
        print(f"{path.name}: dropped its last {len(lines) - keep} lines, written after the checkpoint this run "
              f"resumes from (their steps are redone)")
        return keep
    return len(lines)


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
    def __init__(self, accelerator, cfg, run_dir: Path, config_dict: dict, keep_lines: int = -1):
        """keep_lines: of metrics.jsonl, as many as the checkpoint being resumed had (-1: all)."""
        self.accelerator, self.run_dir = accelerator, run_dir
        self.main = accelerator.is_main_process
        self.use_wandb = cfg.tracker == "wandb"
        self.lines = keep_metrics_lines(run_dir / "metrics.jsonl", keep_lines) if self.main else 0
        self.metrics_file = open(run_dir / "metrics.jsonl", "a") if self.main else None
        if self.use_wandb:
            os.environ.setdefault("WANDB_SILENT", "true")  # our own lines say where the run is
            self._init_wandb(cfg, config_dict)

    def _init_wandb(self, cfg, config_dict: dict) -> None:
        import wandb
        from wandb.errors import Error as WandbError

        settings = {"id": self._wandb_id(), "resume": "allow", "name": cfg.name, "dir": str(self.run_dir),
                    "group": cfg.wandb_group or None}
        mode = wandb_mode() if self.main else "offline"
        try:
            self.accelerator.init_trackers(cfg.wandb_project, config=config_dict,
                                           init_kwargs={"wandb": {**settings, "mode": mode}})
        except WandbError as error:  # reachable, but refused (a bad API key, an unknown entity)
            if mode != "online":
                raise
            go_offline(f"W&B refused the online run ({type(error).__name__}: {str(error).splitlines()[0]})")
            self.accelerator.trackers.clear()  # the tracker that failed to start
            wandb.teardown()  # W&B's service still holds the failed run's id
            self.accelerator.init_trackers(cfg.wandb_project, config=config_dict,
                                           init_kwargs={"wandb": {**settings, "mode": "offline"}})
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
            self.lines += 1
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
