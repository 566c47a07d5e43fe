"""A packed group's lifecycle: each run checked, built and recorded as alone, trained together.

``hydra/launcher=packed`` (``hydra_plugins/dpl_launchers``) hands :func:`run_group` the runs
of one group, each with its job dir and Hydra config. Each run is what :func:`dpl.run.job.run`
makes of it: a finished run of the sweep is skipped, a stopped one resumes from its own
checkpoint (in its job dir, or the job dir its MLflow run names, for a re-run sweep with a new
sweep dir), and it gets its own Recorder (MLflow run, checkpoint, history, plots, results row).
Only the training is shared (:class:`dpl.pack.lockstep.Lockstep`). A run that fails before
training, or diverges, ends alone; Ctrl-C ends every unfinished run KILLED.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Union

from omegaconf import DictConfig

from dpl.config.validate import validate
from dpl.core.engines import pick_device
from dpl.core.loop import Trainer
from dpl.errors import Diverged, first_line, user_errors
from dpl.pack.lockstep import Lockstep
from dpl.run import checkpoint
from dpl.run.build import build_trainer, load_training_state
from dpl.run.job import (
    DIVERGED_OBJECTIVE,
    check_destinations,
    finished,
    finished_in_sweep,
    launch_dir_of,
    resumed_config,
)
from dpl.run.recorder import Recorder
from dpl.tracking.loggers import make_logger
from dpl.tracking.params import config_hash
from dpl.tracking.run_names import in_multirun

log = logging.getLogger("dpl")
Outcome = Union[dict, BaseException]  # a run's final metrics (as dpl.run.job.run returns them), or its error

# The run a log record is about (its index in the group; None: the group's): each run's dpl.log
# keeps its own lines and the group's, and the console prefixes a run's lines with its name.
current = contextvars.ContextVar("dpl_packed_run", default=None)


@dataclass
class Member:
    """One run of a packed group: its config (without ``hydra``), job dir, name in the log, and
    its Hydra config (set as Hydra's while the group acts for the run, e.g. names its MLflow run)."""

    cfg: DictConfig
    out_dir: Path
    name: str
    hydra_cfg: Optional[DictConfig] = None
    trainer: Optional[Trainer] = None
    recorder: Optional[Recorder] = None
    outcome: Optional[Outcome] = None


@contextlib.contextmanager
def acting_for(members: list[Member], i: Optional[int]) -> Iterator[None]:
    """Log records and Hydra's config are run ``i``'s inside (the group's for None)."""
    token = current.set(i)
    restore = None
    if i is not None and members[i].hydra_cfg is not None:
        from hydra.core.hydra_config import HydraConfig

        restore = HydraConfig.instance().cfg
        HydraConfig.instance().set_config(members[i].hydra_cfg)
    try:
        yield
    finally:
        current.reset(token)
        if restore is not None:
            from hydra.core.hydra_config import HydraConfig

            HydraConfig.instance().cfg = restore


def resumable(job: Path) -> bool:
    """A job dir that a stopped run left something to resume in (a checkpoint, or its run file)."""
    return (job / checkpoint.FILENAME).is_file() or (job / checkpoint.RUN_FILE).is_file()


def stopped_job(m: Member) -> Optional[Path]:
    """Where run ``m`` was stopped before, if it was: its own job dir (a re-run with the same sweep dir)
    or that of this sweep's KILLED MLflow run of the same config (a re-run with a new one)."""
    if (m.out_dir / checkpoint.FILENAME).is_file():
        return m.out_dir
    if not (m.cfg.sweep or in_multirun()):
        return None
    return make_logger(m.cfg.logger).find_unfinished_job(str(m.cfg.sweep) if m.cfg.sweep else None,
                                                         config_hash(m.cfg), resumable)


def prepare(m: Member, data_cache: Optional[dict] = None) -> None:
    """Run ``m`` as :func:`dpl.run.job.run` starts one: checked, skipped if done, built, resumed, recorded."""
    validate(m.cfg)
    ckpt = None
    where = stopped_job(m)
    if where is not None:
        ckpt, m.out_dir = checkpoint.load_resumable(where)
        m.cfg = resumed_config(m.cfg, ckpt, m.out_dir)
        if "state" in ckpt and finished(ckpt, m.cfg, m.out_dir):
            m.outcome = {"best_val_acc": ckpt["state"]["best_val_acc"], "already_finished": True}
            return
        log.info("resuming %s from %s", m.name, m.out_dir)
    else:
        done = finished_in_sweep(m.cfg)
        if done is not None:
            m.outcome = done
            return
    check_destinations(m.cfg, m.out_dir)
    m.trainer = build_trainer(m.cfg, pick_device(m.cfg.device), data_cache=data_cache)
    if ckpt is not None and "state" in ckpt:
        load_training_state(m.trainer, ckpt, m.out_dir)
    m.recorder = Recorder(m.cfg, m.out_dir, resume_run_id=ckpt.get("run_id") if ckpt else None,
                          progress=False, origin=launch_dir_of(ckpt, m.out_dir) if ckpt else None)
    m.recorder.attach(m.trainer)
    m.recorder.save(m.trainer)


def run_group(members: list[Member], fuse: bool = True) -> list[Outcome]:
    """Train the runs of one packed group; each one's outcome, in order."""
    data_cache: dict = {}  # the group's runs read their dataset once
    for i, m in enumerate(members):
        with acting_for(members, i):
            try:
                prepare(m, data_cache)
            except user_errors() as e:  # this run's to fix: the others go on
                log.error("%s: %s", m.name, first_line(e))
                m.outcome, m.trainer = e, None
    training = [i for i, m in enumerate(members) if m.trainer is not None]
    if training:
        _train(members, training, fuse)
    return [m.outcome for m in members]


def _train(members: list[Member], training: list[int], fuse: bool) -> None:
    from tqdm.auto import tqdm

    for i in training:  # each run's hooks (log lines, checkpoints, MLflow) act for it
        t = members[i].trainer
        t.on_epoch = [_for(members, i, hook) for hook in t.on_epoch]
    trainers = [members[i].trainer for i in training]

    def diverged(j: int, e: Diverged) -> None:
        m = members[training[j]]
        with acting_for(members, training[j]):
            log.error("diverged: %s", e)
            m.recorder.fail(m.trainer, f"diverged: {e}")
        m.outcome = {"best_val_acc": DIVERGED_OBJECTIVE, "diverged": True, "error": str(e)}

    left = sum(t.total_steps - t.state.global_step for t in trainers)
    show = any(members[i].cfg.progress for i in training)
    with tqdm(total=left, desc=f"packed x{len(trainers)}", unit="step", disable=not show, dynamic_ncols=True,
              mininterval=0.5) as bar:
        group = Lockstep(trainers, fuse=fuse, on_diverged=diverged, on_step=bar.update)
        try:
            group.fit()
        except BaseException as e:
            status = "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED"
            reason = _interrupted(e) if status == "KILLED" else f"{type(e).__name__}: {first_line(e)}"
            for i in training:
                m = members[i]
                if m.outcome is None:
                    with acting_for(members, i):
                        m.recorder.fail(m.trainer, reason, status=status)
                    m.outcome = e
            if status == "KILLED":
                raise
            log.error("the packed group failed: %s", reason)
            return
    for i in training:
        m = members[i]
        if m.outcome is not None:  # diverged
            continue
        with acting_for(members, i):
            final = m.trainer.final_metrics()
            m.recorder.finish(m.trainer, final)
        m.outcome = final


def _interrupted(e: BaseException) -> str:
    from dpl.run.interrupt import signal_name

    return f"interrupted by {signal_name(e)}"


def _for(members: list[Member], i: int, hook):
    def hook_for_run(trainer, record):
        with acting_for(members, i):
            hook(trainer, record)
    return hook_for_run


def objective(outcome: Outcome) -> Any:
    """What ``python -m dpl`` returns to a sweeper for a run's outcome (see dpl.__main__.main)."""
    if isinstance(outcome, BaseException):
        raise outcome
    if outcome.get("diverged"):
        return "diverged"
    return float(outcome.get("best_val_acc", math.nan))
