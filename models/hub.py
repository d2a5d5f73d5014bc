"""timm's Hub names for a model: `local-dir:FOLDER` (a folder with config.json and model.safetensors,
as models/export.py writes and timm's save_for_hf does) and `hf-hub:USER/NAME` (the same on the
Hugging Face Hub). timm reads both: `timm.create_model("local-dir:FOLDER", pretrained=True)`.

Here: telling such a name from a timm architecture, reading what its config.json says (architecture,
classes, preprocessing) and building the net with its weights, every failure one UserInputError.
"""
from __future__ import annotations

from pathlib import Path

import timm
from timm.models import load_model_config_from_hf
from timm.models._hub import load_model_config_from_path  # what create_model("local-dir:…") reads (not exported)

from common.errors import UserInputError

LOCAL_DIR, HF_HUB = "local-dir:", "hf-hub:"
CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"


def is_hub_name(name: str) -> bool:
    return str(name).startswith((LOCAL_DIR, HF_HUB))


def is_export_folder(path: Path) -> bool:
    """A folder in timm's Hub layout (not a checkpoint folder, which has config.yaml)."""
    path = Path(path)
    return (path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file()


def hub_name_problem(name: str) -> str | None:
    """What is wrong with a local-dir:/hf-hub: name before anything is read (None: nothing)."""
    if name.startswith(LOCAL_DIR):
        folder = Path(name[len(LOCAL_DIR):]).expanduser()
        if not folder.is_dir():
            return f"names {folder}, which is {'a file' if folder.exists() else 'not there'}: give a model folder " \
                   f"(config.json and model.safetensors, e.g. an export of tools/export.py)"
        if not (folder / CONFIG_FILE).is_file():
            return f"names {folder}, which has no {CONFIG_FILE}: not a model in timm's Hub layout"
        return None
    repo = name[len(HF_HUB):]
    if repo.count("/") != 1 or not all(repo.split("/")):
        return "must be hf-hub:USER/NAME (a model repository of the Hugging Face Hub)"
    return None


def absolute(name: str) -> str:
    """local-dir:RELATIVE → local-dir:/ABSOLUTE (a run's config must not depend on where it started)."""
    if name.startswith(LOCAL_DIR):
        return LOCAL_DIR + str(Path(name[len(LOCAL_DIR):]).expanduser().resolve())
    return name


def read_hub_config(name: str) -> tuple[dict, str, dict]:
    """(pretrained_cfg, architecture, model_args) as timm reads them from the name's config.json
    (hf-hub: downloaded, or from the local cache)."""
    problem = hub_name_problem(name)
    if problem:
        raise UserInputError(f"{name} {problem}")
    try:
        if name.startswith(LOCAL_DIR):
            return load_model_config_from_path(name[len(LOCAL_DIR):])
        return load_model_config_from_hf(name[len(HF_HUB):])
    except Exception as error:  # bad JSON, no architecture, offline, no such repository, no access
        raise UserInputError(f"cannot read the config.json of {name}: {hub_error(error)}") from None


def create_hub_net(name: str, **kwargs):
    """timm.create_model(name, pretrained=True, **kwargs): the architecture its config.json names,
    with its weights (a num_classes other than its own gets a fresh head)."""
    pretrained_cfg, architecture, _ = read_hub_config(name)
    if not timm.is_model(architecture):
        raise UserInputError(f"{name} is a {architecture}, which this timm ({timm.__version__}) does not have")
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except Exception as error:  # weights that do not fit its architecture, a truncated file, offline
        raise UserInputError(f"cannot load the weights of {name}: {hub_error(error)}") from None


def hub_error(error: Exception) -> str:
    """One line for a huggingface_hub/timm error (their messages run over several lines)."""
    text = " ".join(str(error).split()).rstrip(".")
    return f"{type(error).__name__}: {text[:400]}"
