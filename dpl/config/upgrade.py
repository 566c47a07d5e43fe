"""Configs written before ``method.outer``: their keys mapped onto the node.

Until the outer optimizer of the local methods became one config node, SlowMo had
``method.beta`` (slow momentum) and ``method.alpha`` (slow lr), DiLoCo ``method.outer_lr``,
``method.outer_momentum`` and ``method.nesterov``, and LocalSGD and post_local none (their
outer step was SGD with lr 1). A checkpoint's saved config and the MLflow params of the runs
of then still hold those keys; :func:`upgrade` maps both, so that a resumed job keeps its
outer step and the report groups old runs with new ones of the same config.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf

from dpl.config.schema import SCHEMAS

# old key -> new key; the command line's old keys fail with this (dpl.config.validate.check_key)
RENAMED = {"method.beta": "method.outer.momentum", "method.alpha": "method.outer.lr",
           "method.outer_lr": "method.outer.lr", "method.outer_momentum": "method.outer.momentum",
           "method.nesterov": "method.outer.nesterov"}


def upgrade(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` with the keys of before ``method.outer`` moved under it; other keys unchanged.

    ``config`` is nested (a checkpoint's saved config, ``{"method": {"beta": 0.6, ...}}``: the
    keys the old config lacks come from the option's schema, as for any resumed config) or flat
    (MLflow params, ``{"method.beta": "0.6"}``). Flat params of a local method from before the
    node get every method key they lack from the option's schema (its preset), as ``str()`` like
    :func:`dpl.tracking.flatten_config`, so that an old run carries the params a new run of the
    same config logs.
    """
    config = OmegaConf.to_container(config) if isinstance(config, DictConfig) else dict(config)
    if isinstance(config.get("method"), Mapping):  # nested
        method = dict(config["method"])
        own = _keys_of(method.get("name"))
        old = {RENAMED[f"method.{k}"].rpartition(".")[2]: method.pop(k) for k in list(method)
               if f"method.{k}" in RENAMED and k not in own}
        if old:
            method["outer"] = {**(method.get("outer") or {}), **old}
        return {**config, "method": method}
    own = {f"method.{k}" for k in _keys_of(config.get("method.name"))}
    flat = {(k if k in own else RENAMED.get(k, k)): v for k, v in config.items()}
    schema = SCHEMAS["method"].get(flat.get("method.name"))
    before_the_node = not any(k.startswith("method.outer.") for k in config)
    if schema is not None and before_the_node and "outer" in {f.name for f in dataclasses.fields(schema)}:
        for key, value in dataclasses.asdict(schema()).items():
            items = value.items() if isinstance(value, dict) else [(None, value)]
            for sub, v in items:
                flat.setdefault(f"method.{key}" + (f".{sub}" if sub else ""), str(v))
    return flat


def _keys_of(method: Any) -> set[str]:
    """The keys of ``method=<method>`` today (streaming DiLoCo's ``alpha`` is not SlowMo's old one)."""
    schema = SCHEMAS["method"].get(str(method))
    return {f.name for f in dataclasses.fields(schema)} if schema is not None else set()
