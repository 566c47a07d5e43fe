"""Every config group's registry in one place: group name -> {YAML option name: builder}.

One config group = one folder in ``conf/`` = one registry in code, keyed by the same
names (tests/test_config.py checks they agree).
"""

from __future__ import annotations

from typing import Mapping, TypeVar

from omegaconf import DictConfig

from dpl.config import ConfigError

T = TypeVar("T")


def lookup(registry: Mapping[str, T], key: str, name: str) -> T:
    """``registry[name]``, or a one-line KeyError naming ``key`` and the allowed names."""
    if name not in registry:
        raise KeyError(f"{key}={name!r} is unknown: allowed {', '.join(sorted(registry))}")
    return registry[name]


def registries() -> dict[str, dict]:
    from dpl.data import DATASETS
    from dpl.dynamic_h import STRATEGIES
    from dpl.engine import ENGINES
    from dpl.methods import METHODS
    from dpl.models import MODELS
    from dpl.optim import OPTIMIZERS
    from dpl.schedules import SCHEDULERS
    from dpl.study import ABLATIONS
    from dpl.tracking import LOGGERS

    return {"dataset": DATASETS, "model": MODELS, "optimizer": OPTIMIZERS, "scheduler": SCHEDULERS,
            "method": METHODS, "dynamic_h": STRATEGIES, "engine": ENGINES, "logger": LOGGERS,
            "ablation": ABLATIONS}


def check_choices(cfg: DictConfig) -> None:
    """Each group's ``name`` must be a key of its registry."""
    for group, registry in registries().items():
        node = cfg[group]
        name = node.name if isinstance(node, DictConfig) else node  # ablation: a plain key
        if name not in registry:
            raise ConfigError(f"{group}.name={name!r} is invalid: allowed one of {', '.join(sorted(registry))}")
