"""What may change when a run is continued, and the refusal when something else did.

A checkpoint continues one run: the same model, method, attack, data, batch, optimizer and
schedule. Resuming it under other values would mix two experiments in one folder (and, for a
different model, fail to load and be mistaken for damage), so run.py refuses with one line naming
the keys that differ. These keys may change on resume, because they change how the run is
watched, stored, evaluated or fed, not what it learns:

  epochs              extend (or shorten) the run; the LR schedule follows the new length
  name, output_dir, resume
  tracker, wandb_project, wandb_group, wandb_log_checkpoints, log_every, image_log_every
  keep_checkpoints, checkpoint_every_steps, on_nonfinite, collective_timeout_s
  eval_aux_norm, eval_robust, eval_attack
  compile, channels_last, loader, data.root, data.train_dir, data.val_dir, data.workers,
  data.train_shards, data.val_shards, and what each loader backend's record names
  (data.dali.*, data.ffcv.*: pipelines/backends/)
                                 (where the data lives and how fast it is read; the classes
                                  must still be the checkpoint's)
"""
from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from common.errors import UserInputError
from pipelines.backends import BACKENDS
from train.attacks import ATTACKS
from train.config import onto_schema, with_current_names

MAY_CHANGE = (
    "epochs", "name", "output_dir", "resume",
    "tracker", "wandb_project", "wandb_group", "wandb_log_checkpoints", "log_every", "image_log_every",
    "keep_checkpoints", "checkpoint_every_steps", "on_nonfinite", "collective_timeout_s",
    "eval_aux_norm", "eval_robust", "eval_attack",
    "compile", "channels_last", "loader", "data.root", "data.train_dir", "data.val_dir", "data.workers",
    "data.train_shards", "data.val_shards",
)


class ResumeMismatch(UserInputError):
    """The run's checkpoint (or folder) was made with settings the current command changes."""


def flatten(node, prefix: str = "") -> dict[str, object]:
    """{"attack.eps": 4.0, …} for a config (None and leaves are values)."""
    if not isinstance(node, dict):
        return {prefix: node}
    flat = {}
    for key, value in node.items():
        flat.update(flatten(value, f"{prefix}{key}" if not prefix else f"{prefix}.{key}"))
    return flat


def may_change(key: str) -> bool:
    free_keys = MAY_CHANGE + tuple(key for backend in BACKENDS.values() for key in backend.may_change)
    return any(key == free or key.startswith(free + ".") for free in free_keys)


def changed_keys(saved: DictConfig | dict, current: DictConfig) -> list[tuple[str, object, object]]:
    """(key, saved value, current value) for every key that differs and may not change. A key newer
    than the saved run counts as its schema default (of the saved attack's kind: a new key's default
    keeps the old behaviour); a renamed key counts under its new name (train/config.py RENAMED_KEYS).
    Another attack kind is one difference, attack.kind, not each of the two nodes' keys."""
    saved = with_current_names(saved)
    attack = saved.get("attack")
    kind = attack.get("kind", "pgd") if isinstance(attack, DictConfig) else "pgd"
    defaults = flatten(OmegaConf.to_container(onto_schema({"attack": {"kind": kind if kind in ATTACKS else "pgd"}}),
                                              resolve=True))
    old = {**defaults, **flatten(OmegaConf.to_container(saved, resolve=True))}
    new = flatten(OmegaConf.to_container(current, resolve=True))
    changed = [(key, old.get(key), new.get(key)) for key in sorted(old.keys() | new.keys())
               if old.get(key) != new.get(key) and not may_change(key)]
    if old.get("attack.kind") != new.get("attack.kind"):
        changed = [c for c in changed if not c[0].startswith("attack.") or c[0] == "attack.kind"]
    return changed


def class_difference(first: list[str], second: list[str], names: tuple[str, str]) -> str:
    """Which classes differ between two class lists, named: `names` says whose each list is."""
    def shown(classes: list[str]) -> str:
        more = f" and {len(classes) - 5} more" if len(classes) > 5 else ""
        return ", ".join(map(repr, classes[:5])) + more

    only = [(name, sorted(set(a) - set(b))) for name, a, b in ((names[0], first, second), (names[1], second, first))]
    parts = [f"only in {name}: {shown(classes)}" for name, classes in only if classes]
    if not parts:  # the same names in another order (or repeated): the labels would mean other classes
        index = next((i for i, (a, b) in enumerate(zip(first, second)) if a != b), min(len(first), len(second)))
        at = [classes[index] if index < len(classes) else None for classes in (first, second)]
        parts = [f"the same names in another order (class {index}: {at[0]!r} vs {at[1]!r})"]
    return f"{len(first)} vs {len(second)} classes, {'; '.join(parts)}"


def check_same_run(saved: DictConfig | dict, current: DictConfig, *, where: str,
                   saved_classes: list[str] | None = None, classes: list[str] | None = None,
                   saved_processes: int = 0, processes: int = 0) -> None:
    """Raise ResumeMismatch naming what differs between `where` (a checkpoint or run folder) and
    the current command, and how to proceed."""
    differences = [f"{key} ({old!r} → {new!r})" for key, old, new in changed_keys(saved, current)]
    if saved_classes is not None and classes is not None and list(saved_classes) != list(classes):
        differences.append(f"classes ({class_difference(saved_classes, classes, ('the checkpoint', 'the data now'))})")
    if saved_processes and saved_processes != processes:
        differences.append(f"processes ({saved_processes} → {processes}: the global batch and the shards change)")
    if differences:
        raise ResumeMismatch(
            f"{where} was made with other settings: {', '.join(differences)}. To continue it, rerun with its "
            f"values; to start a new run, give a new output_dir. Only epochs and the logging, checkpointing, "
            f"evaluation and data-location settings may change on resume (docs/runs.md: resume)")
