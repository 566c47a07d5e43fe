"""MLflow run names that tell the runs of one experiment apart.

A name starts with what every run has, ``localsgd-K4-H8-sgdm-s0`` (method, K, H — the dynamic_h
strategy after it, no H for a method without local steps — optimizer, seed), so the UI's
narrow name column always shows K and H. After it come the keys that differ between the runs
of the experiment, in short form:

* a single run: its command-line overrides whose value is not the default one
  (``engine=distributed epochs=3 dataset=synthetic dataset.num_train=2000`` ->
  ``-distributed-epochs3-synthetic-num_train2k``);
* a sweep's job: the keys the sweep varies (the others are the same in every job), then the
  job number, ``#3``.

Both come from Hydra's runtime config, which only the Hydra job's process has: the ranks that
``engine=distributed`` spawns are handed them (:func:`job_naming` in the job's process,
:func:`carry_naming` in each rank), so a distributed run is named from the same overrides as its
simulation.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from omegaconf import DictConfig, OmegaConf

from dpl.core.dynamic_h import STRATEGIES
from dpl.errors import ConfigError

# Keys that change how a job runs or is displayed, not what it computes: they never name a run.
BOOKKEEPING = ("progress", "resume", "test_only", "checkpoint", "checkpoint_every", "results_csv", "device",
               "dataset.root", "dataset.download",
               "engine.timeout_s", "engine.master_addr", "engine.master_port", "engine.spawn", "engine.simulate",
               "engine.compile", "engine.eval_batch_size", "engine.threads")
_NOT_NAMED = (*BOOKKEEPING, "sweep", "logger")  # the sweep: the experiment and a tag already
_NOT_NAMED_PREFIXES = ("logger.", "hydra.")
# Already in the name's first part.
_IN_BASE = ("method", "method.name", "K", "H", "dynamic_h", "dynamic_h.name", "optimizer", "optimizer.name", "seed")
# The keys a sweep varies, as the launching process found them (dpl.tracking.sweep): its jobs see only
# their own values, not which of their overrides were a sweep.
SWEPT_KEYS_ENV = "DPL_SWEPT_KEYS"
# C0 and C1 control characters (newline, CR, tab, NUL, ESC ...) and Unicode's line and paragraph
# separators: a name is written into log lines, CSV rows, MLflow and file names, and a line break in
# one starts a line of its author's choosing there (a results_csv ending in .pth runs lines that
# start with ``import``).
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
# The keys whose values name something: the sweep also names its folder (sweeps/_sweep.yaml puts it in
# hydra.sweep.dir), hydra.job.name the job's log file (<job.name>.log).
NAME_KEYS = ("sweep", "logger.experiment", "logger.run_name", "hydra.job.name")
PATH_NAME_KEYS = ("sweep", "hydra.job.name")


def name_problem(key: str, value: Any) -> str | None:
    """Why ``value`` cannot be the name ``key`` (what it allows instead), or None when it can.

    No control character in any name; a name that becomes a file or folder name (:data:`PATH_NAME_KEYS`)
    is one path component, so it cannot lead out of the folder it is made in."""
    if not isinstance(value, str):
        return None
    if CONTROL.search(value):
        return "allowed a name without control characters (newline, carriage return, tab, NUL, ESC ...)"
    if key in PATH_NAME_KEYS and ("/" in value or value in (".", "..")):
        where = "the sweep's folder, multirun/<sweep>/" if key == "sweep" else "the job's log file, <name>.log"
        return f"allowed a name without / that is not . or .. (it names {where})"
    if key == "hydra.job.name" and not value.strip():  # a log file named .log, hidden
        return "allowed a non-empty name (it names the job's log file, <name>.log)"
    return None


def check_name_keys(cfg: DictConfig, skip: Sequence[str] = ()) -> None:
    """ConfigError in one line for the first name of :data:`NAME_KEYS` in ``cfg`` (but ``skip``) that
    :func:`name_problem` refuses."""
    for key in NAME_KEYS:
        value = OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)
        why = None if key in skip else name_problem(key, value)
        if why is not None:
            raise ConfigError(f"{key}={value!r} is invalid: {why}")


def printable(text: str) -> str:
    """``text`` with each control character (:data:`CONTROL`) replaced by ``?``: for names dpl makes."""
    return CONTROL.sub("?", text)


@dataclass(frozen=True)
class Naming:
    """What names a job's run beside its config: its naming overrides (``key=value``) and job number."""

    overrides: tuple[str, ...]
    job: Optional[int]


_carried: Optional[Naming] = None  # this process's job naming, handed over by the job's own process


def job_naming(cfg: DictConfig) -> Naming:
    """This job's :class:`Naming`: the one carried into this process, else Hydra's (see the module)."""
    if _carried is not None:
        return _carried
    return Naming(tuple(naming_overrides(cfg)), job_num())


def carry_naming(naming: Optional[Naming]) -> None:
    """Name the runs of this process by ``naming`` (:func:`job_naming` of the Hydra job's process), not
    by Hydra: a spawned rank has no Hydra config, and would name its run by the base config alone."""
    global _carried
    _carried = naming


def run_name(cfg: DictConfig, local_steps: bool = True, overrides: Sequence[str] | None = None,
             job: int | None = None) -> str | None:
    """``localsgd-K4-H8-sgdm-s0`` plus ``overrides`` in short form plus ``#<job>`` (see the module).

    ``overrides`` (``key=value`` strings) and ``job`` default to this job's :func:`job_naming`; the
    name is None (MLflow picks one) for a config without a method."""
    get = lambda key, default=None: OmegaConf.select(cfg, key, default=default)  # noqa: E731
    method = get("method.name")
    if method is None:
        return None
    parts = [str(method), f"K{get('K', 1)}"]
    if local_steps:
        parts.append(f"H{get('H', 1)}")
        strategy = get("dynamic_h.name")
        if strategy in STRATEGIES and STRATEGIES[strategy].facts.changes_h:
            parts.append(str(strategy))
    parts += [str(get("optimizer.name", "")), f"s{get('seed', 0)}"]
    naming = job_naming(cfg) if overrides is None or job is None else None
    if overrides is None:
        overrides = naming.overrides
    parts += [short_override(o, cfg) for o in overrides if _names_a_run(_key(o))]
    if job is None:
        job = naming.job
    if job is not None:
        parts.append(f"#{job}")
    # the overrides' values were checked on the command line; a name made from a YAML's may still hold one
    return printable("-".join(p for p in parts if p))


def short_override(override: str, cfg: DictConfig | None = None) -> str:
    """``engine=distributed`` -> ``distributed`` (a config group: its option's name says it),
    ``epochs=3`` -> ``epochs3``, ``dataset.num_train=2000`` -> ``num_train2k``,
    ``compression.error_feedback=true`` -> ``error_feedback=true``, ``method.outer.lr=0.5`` -> ``outer.lr0.5``."""
    key, _, value = override.partition("=")
    key = _key(override)
    value = value.strip("'\"")
    if cfg is not None and isinstance(OmegaConf.select(cfg, key, default=None), DictConfig):
        return value
    # a node's key keeps its node: method.outer.lr -> outer.lr0.5, not lr0.5 (the inner lr's name)
    name = ".".join(key.split(".")[-2:]) if key.count(".") >= 2 else key.rsplit(".", 1)[-1]
    number = _short_number(value)
    return f"{name}{number}" if number is not None else f"{name}={value}"


def _short_number(value: str) -> str | None:
    """``2000`` -> ``2k``, ``45000`` -> ``45k``, ``0.0123456`` -> ``0.0123``; None for a non-number."""
    try:
        x = float(value)
    except ValueError:
        return None
    if x.is_integer() and abs(x) >= 1000 and x % 100 == 0:
        return f"{x / 1000:g}k"
    return f"{x:.3g}"


def _key(override: str) -> str:
    return override.partition("=")[0].lstrip("+~")


def _names_a_run(key: str) -> bool:
    return key not in _NOT_NAMED and key not in _IN_BASE and not key.startswith(_NOT_NAMED_PREFIXES)


def naming_overrides(cfg: DictConfig) -> list[str]:
    """The overrides that tell this job from the others of its experiment: a sweep's job, its
    overrides of the swept keys; any other run, its overrides whose value is not the default."""
    task = _task_overrides()
    if not task:
        return []
    swept = os.environ.get(SWEPT_KEYS_ENV)
    if in_multirun() and swept is not None:
        keys = set(swept.split())
        return [o for o in task if _key(o) in keys]
    defaults = _defaults()
    if defaults is None:
        return task  # not known: every override may matter
    return [o for o in task if _differs(cfg, defaults, _key(o))]


def _differs(cfg: DictConfig, defaults: DictConfig, key: str) -> bool:
    try:
        return _value(cfg, key) != _value(defaults, key)
    except Exception:  # noqa: BLE001 - an interpolation that only resolves in a job: count it as changed
        return True


def _value(cfg: DictConfig, key: str) -> Any:
    node = OmegaConf.select(cfg, key, default=None)
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def _task_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return list(HydraConfig.get().overrides.task)


def _defaults() -> DictConfig | None:
    """The config this job's config file composes to without overrides, or None if it cannot be composed."""
    from hydra import compose
    from hydra.core.hydra_config import HydraConfig

    try:
        return compose(config_name=HydraConfig.get().job.config_name)
    except Exception:  # noqa: BLE001 - a config that needs its overrides to compose: names keep them all
        return None


def swept_keys(sweeper_params: Any, task_overrides: Sequence[str]) -> list[str]:
    """The keys a sweep varies: the sweeper's params, then command-line sweeps (``K=2,4``, ``lr=interval(...)``)."""
    keys = [str(k) for k in (sweeper_params or {})]
    keys += [_key(o) for o in task_overrides if "," in o or "(" in o]
    return list(dict.fromkeys(keys))


# A derived sweep name is one folder name (multirun/<sweep>/) well under the file systems' 255 bytes.
SWEEP_NAME_MAX = 128


def derived_sweep_name(keys: Sequence[str]) -> str:
    """The name of a command-line sweep given no ``sweep=``: ``sweep`` and the keys it varies, in
    command-line order, ``H=1,8 seed=0,1,2`` -> ``sweep-H-seed`` (a group's ``/`` as ``.``, control
    characters as ``?``, at most :data:`SWEEP_NAME_MAX` characters). The same swept keys give the same
    name, so the command run again finds its sweep (its parent run, its finished jobs)."""
    parts = ["sweep", *dict.fromkeys(k.lstrip("+~").replace("/", ".") for k in keys)]
    return printable("-".join(p for p in parts if p))[:SWEEP_NAME_MAX]


def in_multirun() -> bool:
    """This job is one of a Hydra multirun (``-m``, or a sweep config)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def job_num() -> int | None:
    """The Hydra job number inside a multirun, else None."""
    from hydra.core.hydra_config import HydraConfig

    if not in_multirun():
        return None
    hc = HydraConfig.get()
    return int(hc.job.num) if hc.job.get("num") is not None else None
