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


def simulation_mode(requested: str, device: torch.device) -> str:
    """``auto``: vmap on CUDA (one batched kernel per layer), the loop on CPU, where a
    vmap'd LeNet-5 measured slower than K separate forwards (see ``python -m dpl.bench``).
    Both modes handle model buffers (BatchNorm statistics) and give the same numbers."""
    if requested != "auto":
        return requested
    return "vmap" if device.type == "cuda" else "loop"


def build_simulated(cfg: DictConfig, model: nn.Module, device: torch.device, comm=None) -> StackedWorkers:
    mode = simulation_mode(cfg.engine.simulate, device)
    return StackedWorkers(model, cfg.K, comm or LocalComm(cfg.K), mode)


ENGINES = {"simulated": build_simulated, "distributed": build_distributed}


def build_workers(cfg: DictConfig, model: nn.Module, device: torch.device, comm=None) -> StackedWorkers:
    return lookup(ENGINES, "engine", cfg.engine.name)(cfg, model, device, comm)
