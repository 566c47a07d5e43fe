"""Engines: how the K workers run. ``simulated`` holds them in one process,
``distributed`` runs one process per worker on torch.distributed.

The registry is keyed by the YAML names in ``conf/engine/``.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig
from torch import nn

from dpl.comm import StackedComm
from dpl.core.ddp import build_distributed
from dpl.core.workers import StackedWorkers
from dpl.errors import ConfigError
from dpl.registry import lookup


def pick_device(name: str) -> torch.device:
    """``device=auto|cpu|cuda`` as a torch device (auto: CUDA when one is visible)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' is invalid: no CUDA device is visible (allowed auto, cpu)")
    return torch.device(name)


def simulation_mode(requested: str, device: torch.device) -> str:
    """``auto``: vmap on CUDA (one batched kernel per layer), the loop on CPU, where a
    vmap'd LeNet-5 measured slower than K separate forwards (see ``python -m dpl.bench``).
    Both modes handle model buffers (BatchNorm statistics) and give the same numbers."""
    if requested != "auto":
        return requested
    return "vmap" if device.type == "cuda" else "loop"


def build_simulated(cfg: DictConfig, model: nn.Module, device: torch.device, comm=None,
                    synchronous: bool = False) -> StackedWorkers:
    mode = simulation_mode(cfg.engine.simulate, device)
    return StackedWorkers(model, cfg.K, comm or StackedComm(cfg.K), mode)


ENGINES = {"simulated": build_simulated, "distributed": build_distributed}


def build_workers(cfg: DictConfig, model: nn.Module, device: torch.device, comm=None,
                  synchronous: bool = False) -> StackedWorkers:
    """The K workers of ``model``; ``synchronous``: the method averages gradients at every step.

    From here on K is the workers' (``workers.K``, their communicator's world): the simulation builds
    its communicator from ``cfg.K``, and a process group's world size is checked against ``cfg.K``
    once, where a rank joins it (:func:`dpl.launch.ranks.run_rank`).
    """
    return lookup(ENGINES, "engine", cfg.engine.name)(cfg, model, device, comm, synchronous)
