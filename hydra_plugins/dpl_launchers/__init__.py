"""``hydra/launcher=packed``: a multirun's jobs packed into groups, each group trained in one process.

Hydra instantiates launchers only from the ``hydra_plugins`` namespace, hence this package. The
launcher receives the sweeper's batch of jobs, composes each job's config as Hydra's basic
launcher does, groups the jobs that differ only in packable keys (:mod:`dpl.pack.groups`, at
most ``max_pack`` per group), says in one log line how it grouped them, and trains each group
together (:mod:`dpl.pack.job`). Every packed run is still its own job: its job dir under the
sweep dir (``.hydra/`` saved as Hydra saves it), its ``dpl.log``, checkpoint, history, plots,
MLflow run and results row. A group of one runs exactly as under the basic launcher.
"""


import copy
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus, _save_config, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict, read_write

log = logging.getLogger("dpl")


class PackedLauncher(Launcher):
    def __init__(self, max_pack: int = 8, fuse: bool = True) -> None:
        if max_pack < 1:
            from dpl.errors import ConfigError

            raise ConfigError(f"hydra.launcher.max_pack={max_pack} is invalid: allowed >= 1")
        self.max_pack, self.fuse = max_pack, fuse
        self.config: Optional[DictConfig] = None
        self.task_function: Optional[TaskFunction] = None
        self.hydra_context: Optional[HydraContext] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from dpl.pack.groups import differing_keys, group_jobs
        from dpl.tracking.params import flatten_config

        setup_globals()
        assert self.config is not None and self.hydra_context is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        configs = []
        for n, overrides in enumerate(job_overrides):
            config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(config):
                config.hydra.job.id = config.hydra.job.num = initial_job_idx + n
            configs.append(config)
        flats = [flatten_config(c) for c in configs]
        groups = group_jobs(flats, self.max_pack)
        sizes = [len(g) for g in groups]
        varied = sorted({k for g in groups if len(g) > 1 for k in differing_keys([flats[i] for i in g])})
        log.info("packed launcher: %d jobs in %d groups (sizes %s; max_pack=%d)%s", len(configs), len(groups),
                 " ".join(map(str, sizes)), self.max_pack,
                 f"; packed runs differ in {', '.join(varied)}" if varied else "")
        returns: List[Optional[JobReturn]] = [None] * len(configs)
        for group in groups:
            for i in group:
                log.info("\t#%d : %s", initial_job_idx + i, " ".join(filter_overrides(job_overrides[i])))
            if len(group) == 1:  # an ordinary run, as the basic launcher runs it
                returns[group[0]] = run_job(hydra_context=self.hydra_context, task_function=self.task_function,
                                            config=configs[group[0]], job_dir_key="hydra.sweep.dir",
                                            job_subdir_key="hydra.sweep.subdir")
            else:
                for i, ret in zip(group, self._run_group([configs[i] for i in group])):
                    returns[i] = ret
            configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        for config, ret in zip(configs, returns):
            if _recorded_nothing(ret):
                remove_unused_job_dir(Path(str(config.hydra.sweep.dir), str(config.hydra.sweep.subdir)))
        _exit_on_user_errors(returns)
        return returns  # type: ignore[return-value]

    def _run_group(self, configs: List[DictConfig]) -> List[JobReturn]:
        from dpl.pack.job import Member, objective, run_group

        callbacks = self.hydra_context.callbacks
        saved_hydra = HydraConfig.instance().cfg
        members, returns = [], []
        for config in configs:
            ret, task_cfg = _job_dir(config)
            HydraConfig.instance().set_config(config)
            callbacks.on_job_start(config=config, task_function=self.task_function)
            members.append(Member(task_cfg, Path(config.hydra.runtime.output_dir), f"#{config.hydra.job.num}",
                                  hydra_cfg=config))
            returns.append(ret)
        handlers = _per_run_logs(configs)
        try:
            HydraConfig.instance().set_config(configs[0])  # the group's own lines: the first run's job
            outcomes = run_group(members, fuse=self.fuse)
        finally:
            _close(handlers)
            HydraConfig.instance().cfg = saved_hydra
        for config, ret, outcome in zip(configs, returns, outcomes):
            try:
                ret.return_value = objective(outcome)
                ret.status = JobStatus.COMPLETED
            except Exception as e:  # noqa: BLE001 - the run's error is its job's return, as run_job makes it
                ret.return_value = e
                ret.status = JobStatus.FAILED
            ret.task_name = "dpl"
            callbacks.on_job_end(config=config, job_return=ret)
        return returns


def _job_dir(config: DictConfig) -> Tuple[JobReturn, DictConfig]:
    """Job ``config``'s dir made and its ``.hydra/`` saved, as Hydra's run_job does before a task runs."""
    HydraConfig.instance().set_config(config)
    out = os.path.join(str(config.hydra.sweep.dir), str(config.hydra.sweep.subdir))
    with read_write(config.hydra.runtime), open_dict(config.hydra.runtime):
        config.hydra.runtime.output_dir = os.path.abspath(out)
    HydraConfig.instance().set_config(config)
    task_cfg = copy.deepcopy(config)
    with read_write(task_cfg), open_dict(task_cfg):
        del task_cfg["hydra"]
    Path(out).mkdir(parents=True, exist_ok=True)
    if config.hydra.output_subdir is not None:
        where = Path(config.hydra.runtime.output_dir) / str(config.hydra.output_subdir)
        _save_config(task_cfg, "config.yaml", where)
        _save_config(HydraConfig.instance().cfg, "hydra.yaml", where)
        _save_config(config.hydra.overrides.task, "overrides.yaml", where)
    ret = JobReturn(overrides=list(config.hydra.overrides.task), cfg=task_cfg,
                    hydra_cfg=copy.deepcopy(HydraConfig.instance().cfg), working_dir=os.getcwd())
    return ret, task_cfg


def _per_run_logs(configs: List[DictConfig]) -> List[logging.Handler]:
    """Each run's ``<job dir>/dpl.log``: its own lines and the group's; the console names the run."""
    from dpl.pack.job import current

    configure_log(configs[0].hydra.job_logging, configs[0].hydra.verbose)
    root = logging.getLogger()
    template = next((h for h in root.handlers if isinstance(h, logging.FileHandler)), None)
    fmt = template.formatter if template is not None else logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    for h in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
        root.removeHandler(h)
        h.close()
    names = [f"#{c.hydra.job.num}" for c in configs]
    for h in root.handlers:  # the console
        h.setFormatter(_RunPrefix(h.formatter or logging.Formatter("%(message)s"), names, current))
    added = []
    for i, config in enumerate(configs):
        handler = logging.FileHandler(Path(config.hydra.runtime.output_dir) / f"{config.hydra.job.name}.log")
        handler.setFormatter(fmt)
        handler.addFilter(lambda record, i=i: current.get() in (None, i))
        root.addHandler(handler)
        added.append(handler)
    return added


class _RunPrefix(logging.Formatter):
    def __init__(self, inner: logging.Formatter, names: List[str], current) -> None:
        super().__init__()
        self.inner, self.names, self.current = inner, names, current

    def format(self, record: logging.LogRecord) -> str:
        i = self.current.get()
        line = self.inner.format(record)
        return line if i is None else f"[{self.names[i]}] {line}"


def _close(handlers: List[logging.Handler]) -> None:
    root = logging.getLogger()
    for h in handlers:
        root.removeHandler(h)
        h.close()


def _recorded_nothing(ret: Optional[JobReturn]) -> bool:
    """A job that trained nothing by design: skipped (its run finished before) or refused in one line."""
    from dpl.errors import user_errors

    if ret is None:
        return False
    if ret.status == JobStatus.FAILED:
        return isinstance(ret._return_value, user_errors())
    return ret.status == JobStatus.COMPLETED


def remove_unused_job_dir(job: Path) -> None:
    """A job dir holding only what the launcher made for it (``.hydra/`` and ``dpl.log``: a run skipped as
    finished, or refused) is removed; one with anything a run writes (``run.json`` first) stays."""
    import shutil

    if not job.is_dir() or any(p.name not in (".hydra", "dpl.log") for p in job.iterdir()):
        return
    shutil.rmtree(job, ignore_errors=True)


def _exit_on_user_errors(returns: Sequence[Optional[JobReturn]]) -> None:
    """A run refused for the user's reason (a bad value, an unreadable checkpoint) ends the sweep in one
    line per run and exit status 2 after the batch, as ``python -m dpl`` does for one job."""
    from dpl.errors import user_errors

    refused = [r for r in returns if r is not None and r.status == JobStatus.FAILED
               and isinstance(r._return_value, user_errors())]
    for r in refused:
        print(f"error: job {' '.join(r.overrides)}: {r._return_value}", file=sys.stderr)
    if refused:
        sys.exit(2)


@dataclass
class PackedLauncherConf:
    """``hydra/launcher=packed``: ``max_pack`` bounds a group (memory: R runs' data, workers and
    optimizer state at once); ``fuse=false`` steps the runs of a group one after another in their
    process instead of as one fused step (the same numbers with engine.simulate=loop, where nothing fuses)."""

    _target_: str = "hydra_plugins.dpl_launchers.PackedLauncher"
    max_pack: int = 8
    fuse: bool = True


ConfigStore.instance().store(group="hydra/launcher", name="packed", node=PackedLauncherConf, provider="dpl")
