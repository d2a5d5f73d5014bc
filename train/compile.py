"""compile=true: torch.compile of the model, shared by the PGD attack and the training forward.

The model is compiled in place (nn.Module.compile), so every caller — Accelerate's DDP wrapper,
the unwrapped model the attack uses, evaluation — runs the same compiled forward (and its compiled
backward), and state_dict keys stay those of the eager model (checkpoints and exports unchanged).

Dynamo guards on what changes between calls and compiles each combination once: training
(main route; aux route with AdvProp), the attack (weights frozen: no weight-gradient kernels;
BN statistics untouched), evaluation (eval mode, no grad; its last, shorter batch). A run has a
handful of such graphs, all compiled in its first steps (the warm-up window of the first epoch,
which steady-state throughput leaves out); the cache limit is raised so none falls back to eager.
Where inductor cannot run (no C++ compiler on a CPU machine, no Triton for the GPU), the model
stays eager with one warning.
"""
from __future__ import annotations

import sys

import torch
from torch import nn

GRAPHS_PER_MODEL = 32  # comfortably above the combinations a run meets (about 8)


def inductor_works(device: torch.device) -> str:
    """'' if inductor compiles and runs a tiny function on device, else why not (one line)."""
    try:
        torch.compile(lambda x: torch.relu(x) * 2 + 1, backend="inductor", fullgraph=True)(torch.ones(8, device=device))
    except Exception as error:  # a missing compiler shows up as one of many error types
        return f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"[:300]
    return ""


def compile_model(model: nn.Module, device: torch.device) -> bool:
    """Compile model in place; False (and one warning) where inductor cannot run here."""
    problem = inductor_works(device)
    if problem:
        print(f"warning: compile=true: torch.compile (inductor) cannot run here ({problem}); training eagerly",
              file=sys.stderr, flush=True)
        return False
    config = torch._dynamo.config
    limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, limit, max(getattr(config, limit), GRAPHS_PER_MODEL))
    model.compile(backend="inductor")
    return True


def compiled_graphs() -> int:
    """Graphs torch.compile has made in this process so far (dynamo's own counter)."""
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])
