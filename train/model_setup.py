"""The model a run trains, as the run builds it: dual norms where the method needs them, sync BN,
channels-last, compiled in place, with its optimizer, both prepared by Accelerate.

Its own module so that the run (train/run.py) and the memory estimate (train/memory_check.py) build
the same model without importing each other.
"""
import torch
from timm.layers import convert_sync_batchnorm

from common.errors import UserInputError
from models.factory import create_model
from train.compile import compile_model
from train.methods import method_of
from train.optim import create_optimizer


def build_model(cfg, accelerator, num_classes: int):
    """The model (dual norms for methods that need them), its optimizer, both prepared by Accelerate."""
    model = create_model(cfg, num_classes, dual_norm=method_of(cfg).dual_norm)
    if cfg.sync_bn and accelerator.num_processes > 1:
        if accelerator.device.type != "cuda":
            raise UserInputError("sync_bn=true needs CUDA (torch's SyncBatchNorm has no CPU kernel)")
        model = convert_sync_batchnorm(model)  # timm's: keeps BatchNormAct2d's activation
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.compile:  # in place: the attack and the training forward share the compiled graphs
        compile_model(model, accelerator.device)
    optimizer = create_optimizer(cfg, model, accelerator.num_processes)
    return accelerator.prepare(model, optimizer)
