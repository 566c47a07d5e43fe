"""Engines: how the K workers run. ``simulated`` holds them in one process,
``distributed`` runs one process per worker on torch.distributed.

The registry is keyed by the YAML names in ``conf/engine/``.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig
from torch import nn

from dpl.engine.distributed import build_distributed
from dpl.engine.workers import LocalComm, StackedWorkers
from dpl.registry import lookup


def simulation_mode(requested: str, device: torch.device, model: nn.Module) -> str:
    """``auto``: vmap on CUDA (one batched kernel per layer), the loop on CPU, where a
    vmap'd LeNet-5 measured slower than K separate forwards (see ``python -m dpl.bench``).
    Models with buffers (BatchNorm statistics) need the loop."""
    if requested != "auto":
        return requested
    if device.type == "cuda" and not any(True for _ in model.buffers()):
        return "vmap"
    return "loop"


def build_simulated(cfg: DictConfig, model: nn.Module, device: torch.device, comm=None) -> StackedWorkers:
    mode = simulation_mode(cfg.engine.simulate, device, model)
    return StackedWorkers(model, cfg.K, comm or LocalComm(cfg.K), mode)


ENGINES = {"simulated": build_simulated, "distributed": build_distributed}


def build_workers(cfg: DictConfig, model: nn.Module, device: torch.device, comm=None) -> StackedWorkers:
    return lookup(ENGINES, "engine", cfg.engine.name)(cfg, model, device, comm)
