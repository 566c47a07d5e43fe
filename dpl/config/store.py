"""Hydra's ConfigStore from the registries: every option's schema, stored where its YAML names it.

Each registered option's schema is stored as ``schema/<group>/<option>``, which the option's YAML in
``conf/<group>/`` names first in its defaults (``- /schema/optimizer/lars@_here_``), so a YAML or an
override with a key its option does not have fails composition. An option registered without a YAML
(an extension's, docs: extending) is stored as ``<group>/<option>`` with its schema's defaults, so
``<group>=<option>`` composes all the same. The top-level schema (:class:`dpl.config.root.Config`) is
``dpl_schema``, the first entry of ``conf/config.yaml``'s defaults.

:data:`REGISTRATIONS` are the modules that register dpl's own options; a module outside dpl registers
its options when it is imported, which :func:`dpl.plugins.load` does for the modules a user names. None
of this imports torch.
"""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from dpl.config.root import NODES, Config
from dpl.errors import ConfigError
from dpl.registry import REGISTRIES, Registry

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
# the modules whose import registers dpl's own options (the registries of the config groups)
REGISTRATIONS = ("dpl.components.data", "dpl.components.models", "dpl.components.optim", "dpl.core.schedules",
                 "dpl.core.methods", "dpl.core.dynamic_h", "dpl.core.engines", "dpl.tracking.loggers",
                 "dpl.comm.codecs", "dpl.config.study")
# the config groups: each a folder of conf/, a registry, and a node (ablation: a key) of the top-level config
GROUPS = ("dataset", "model", "optimizer", "scheduler", "method", "dynamic_h", "engine", "logger", "compression",
          "ablation")


def registries() -> dict[str, Registry]:
    """Every config group's registry, by group, with the options registered so far (dpl's own and those of
    the plugins loaded)."""
    for module in REGISTRATIONS:
        importlib.import_module(module)
    return {group: REGISTRIES[group] for group in GROUPS}


def schemas() -> dict[str, dict[str, type]]:
    """group -> option -> its schema, for the groups whose options have one (every group but ablation)."""
    return {group: {name: option.schema for name, option in registry.items()}
            for group, registry in registries().items() if group != "ablation"}


def register_configs() -> None:
    """Store the top-level schema and every registered option's schema (see the module doc), and the
    resolvers ``conf/config.yaml`` uses."""
    from dpl import plugins

    plugins.load()
    store = ConfigStore.instance()
    store.store(name="dpl_schema", node=Config)
    # conf/config.yaml's hydra.run.dir and hydra.output_subdir: a resumed or tested job writes into its own dir
    OmegaConf.register_new_resolver("dpl.job_dir", continued_job_dir, replace=True)
    OmegaConf.register_new_resolver("dpl.output_subdir",
                                    lambda resume, test_only, ckpt: None if continued_job(resume, test_only, ckpt)
                                    else ".hydra", replace=True)
    for group, options in schemas().items():
        for name, schema in options.items():
            store.store(group=f"schema/{group}", name=name, node=schema)
            if not (CONF_DIR / group / f"{name}.yaml").is_file():  # an option with its schema's values only
                store.store(group=group, name=name, node=schema(name=name))


def default_options() -> dict[str, str]:
    """Each config group's default option, as ``conf/config.yaml``'s defaults list chooses it."""
    defaults = OmegaConf.load(CONF_DIR / "config.yaml").get("defaults", [])
    return {str(k): str(v) for entry in defaults if isinstance(entry, DictConfig)
            for k, v in entry.items() if v is not None}


def option_schema(group: str, option: str) -> type:
    """The schema of ``<group>=<option>``; ConfigError naming the options if there is none."""
    options = schemas()[group]
    if option not in options:
        raise ConfigError(f"{group}={option!r} is invalid: allowed one of {', '.join(sorted(options))}")
    return options[option]


def option_keys(group: str, option: str) -> list[str]:
    """The keys ``<group>=<option>`` has (``name`` first)."""
    return [f.name for f in dataclasses.fields(option_schema(group, option))]


def continued_job(resume: Any, test_only: Any, checkpoint: Any) -> Optional[Path]:
    """The job dir that ``resume=`` (or ``test_only=true checkpoint=``) continues, if it exists: the
    run writes there, not into a new, empty job dir (a missing one is reported by the run, in one line)."""
    target = resume or (checkpoint if str(test_only).lower() == "true" else None)
    if not target or str(target) == "null":
        return None
    path = Path(str(target).strip("'\"")).expanduser().resolve()
    job = path if path.is_dir() else path.parent
    return job if job.is_dir() else None


def continued_job_dir(resume: Any, test_only: Any, checkpoint: Any, new: str) -> str:
    """``hydra.run.dir``: the continued job's dir (:func:`continued_job`), else ``new``."""
    job = continued_job(resume, test_only, checkpoint)
    return str(job) if job is not None else new


def typed(container: Any) -> DictConfig:
    """A plain config (a checkpoint's, a test's dict) as the typed config Hydra would compose: each group's
    node under its option's schema. Keys an option does not have are dropped (checkpoints written before the
    per-option schemas carried every option's keys; :mod:`dpl.config.upgrade` brings older configs up first)."""
    data = OmegaConf.to_container(container) if isinstance(container, DictConfig) else dict(container)
    cfg = OmegaConf.structured(Config)
    for group in schemas():
        node = data.get(group)
        if not isinstance(node, dict) or "name" not in node:
            continue
        cfg[group] = OmegaConf.structured(option_schema(group, node["name"]))
        keys = set(option_keys(group, node["name"]))
        data[group] = {k: v for k, v in node.items() if k in keys}
    return OmegaConf.merge(cfg, data)


def check_options(cfg: DictConfig) -> None:
    """Each group's node must carry its option's schema: ``optimizer.name=lars`` on the command line would
    keep sgdm's keys; the option is chosen with ``optimizer=lars``."""
    for group in schemas():
        node = cfg.get(group)
        if not isinstance(node, DictConfig):
            continue
        schema = option_schema(group, node.name)
        if OmegaConf.get_type(node) is not schema:
            raise ConfigError(f"{group}.name={node.name!r} is invalid: choose the option with {group}={node.name}, "
                              f"which brings its keys")


def to_schema(cfg: DictConfig) -> Config:
    """Instantiate the dataclasses (running every range check); raise ConfigError in one line."""
    try:
        return OmegaConf.to_object(cfg)
    except ConfigError:
        raise
    except Exception as e:  # OmegaConf type errors carry the key in their message
        raise ConfigError(str(e).splitlines()[0]) from None


def node_schema(name: str) -> type:
    """The schema of a top-level node that is not a group (``network``, ``clock``, ``faults``)."""
    return NODES[name]
