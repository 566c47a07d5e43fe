"""Configs of earlier dpl versions as today's: a checkpoint's saved config (:func:`upgrade_config`, which
:func:`dpl.run.checkpoint.upgrade` calls) and the MLflow params of old runs (:func:`upgrade_params`).

Until the outer optimizer of the local methods became one config node, SlowMo had
``method.beta`` (slow momentum) and ``method.alpha`` (slow lr), DiLoCo ``method.outer_lr``,
``method.outer_momentum`` and ``method.nesterov``, and LocalSGD and post_local none (their
outer step was SGD with lr 1). Saved configs and the params of the runs of then still hold those
keys; both are mapped, so that a resumed job keeps its outer step and the report groups old runs
with new ones of the same config.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf

from dpl.comm.clock import MEASURED
from dpl.comm.codecs import CODECS
from dpl.config.store import schemas

_NO_COMPRESSION = next(n for n, o in CODECS.items() if o.facts is not None and o.facts.exact)

# old key -> new key; the command line's old keys fail with this (dpl.config.overrides.check_key)
RENAMED = {"method.beta": "method.outer.momentum", "method.alpha": "method.outer.lr",
           "method.outer_lr": "method.outer.lr", "method.outer_momentum": "method.outer.momentum",
           "method.nesterov": "method.outer.nesterov"}


def upgrade_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A saved (nested) config, ``{"method": {"beta": 0.6, ...}, ...}``, as today's: the method's keys of
    before ``method.outer`` moved under it (the keys the old config lacks come from the option's schema,
    as for any resumed config), and the nodes added since present (``compression``: none, what a run of
    then sent). Today's config is returned as it is (:func:`dpl.run.checkpoint.upgrade` calls this)."""
    config = OmegaConf.to_container(config) if isinstance(config, DictConfig) else dict(config)
    config.setdefault("compression", {"name": _NO_COMPRESSION})
    config.setdefault("sync_at_epoch_end", True)  # before the key, every epoch's end synced the workers
    optimizer = config.get("optimizer")
    if isinstance(optimizer, Mapping) and "decay_params" not in optimizer:  # before decay groups, all decayed
        config["optimizer"] = {**optimizer, "decay_params": "all"}
    clock = config.get("clock")
    if isinstance(clock, Mapping) and "device" not in clock:  # before device profiles, compute was measured
        config["clock"] = {**clock, "device": MEASURED}
    if not isinstance(config.get("method"), Mapping):
        return config
    method = dict(config["method"])
    own = _keys_of(method.get("name"))
    old = {RENAMED[f"method.{k}"].rpartition(".")[2]: method.pop(k) for k in list(method)
           if f"method.{k}" in RENAMED and k not in own}
    if old:
        method["outer"] = {**(method.get("outer") or {}), **old}
    return {**config, "method": method}


def upgrade_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """A run's flat MLflow params, ``{"method.beta": "0.6", ...}``, as today's run of the same config logs
    them: the old keys renamed, and a local method from before the node given every method key it lacks
    from the option's schema (its preset), as ``str()`` like :func:`dpl.tracking.params.flatten_config`,
    so the report groups old runs with new ones of the same config."""
    own = {f"method.{k}" for k in _keys_of(params.get("method.name"))}
    flat = {(k if k in own else RENAMED.get(k, k)): v for k, v in params.items()}
    schema = schemas()["method"].get(flat.get("method.name"))
    before_the_node = not any(k.startswith("method.outer.") for k in params)
    if schema is not None and before_the_node and "outer" in {f.name for f in dataclasses.fields(schema)}:
        for key, value in dataclasses.asdict(schema()).items():
            items = value.items() if isinstance(value, dict) else [(None, value)]
            for sub, v in items:
                flat.setdefault(f"method.{key}" + (f".{sub}" if sub else ""), str(v))
    if "method.name" in flat:  # a run of before the key synced at every epoch's end
        flat.setdefault("sync_at_epoch_end", "True")
    if "optimizer.name" in flat:  # a run of before decay groups decayed every parameter
        flat.setdefault("optimizer.decay_params", "all")
    if "clock.speed" in flat:  # a run of before device profiles measured its compute
        flat.setdefault("clock.device", MEASURED)
    return flat


def _keys_of(method: Any) -> set[str]:
    """The keys of ``method=<method>`` today (streaming DiLoCo's ``alpha`` is not SlowMo's old one)."""
    schema = schemas()["method"].get(str(method))
    return {f.name for f in dataclasses.fields(schema)} if schema is not None else set()
