"""One dpl job's lifecycle: check, build, train (or resume, or only test), record, end.

``python -m dpl`` calls :func:`run`. The parts a job trains with are built by :mod:`dpl.run.build`;
what it records beside the loop is :mod:`dpl.run.recorder`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from dpl import timeline
from dpl.config.store import typed
from dpl.config.validate import check_processes, config_strings, validate
from dpl.core.engines import ENGINES, one_process_engine, pick_device
from dpl.errors import ConfigError, Diverged, first_line
from dpl.io import write_csv
from dpl.run import checkpoint
from dpl.run.build import build_trainer, load_training_state, resolve_path
from dpl.run.preempt import Preempted
from dpl.run.recorder import Recorder
from dpl.tracking.params import config_hash, flatten_config, launch_dir
from dpl.tracking.results import check_results_file, check_writable_dir
from dpl.tracking.run_names import CONTROL, in_multirun
from dpl.tracking.store import end_run_if_running, resolve_tracking_uri
from dpl.tracking.store_process import make_logger

log = logging.getLogger("dpl")

# A diverged run's best_val_acc: no number (python -m dpl hands a sweeper "diverged", a failed trial).
DIVERGED_OBJECTIVE = float("nan")
# Keys a resume may pass that change how the job runs, not what it computes.
RESUME_KEYS = ("resume", "progress", "engine.spawn", "device", "dataset.root", "dataset.download", "test_only",
               "checkpoint", "engine.compile", "engine.eval_batch_size", "engine.memory_format", "engine.threads",
               "results_csv",
               "logger.tracking_uri", "engine.master_addr", "engine.master_port")
# Keys that choose what a run writes to or contacts. A job dir is data that researchers pass around like a
# checkpoint: these come from the command (its value or default), never from the stored config (a planted
# results_csv=<site-packages>/x.pth, a store or rendezvous address of someone else's choosing).
DESTINATION_KEYS = ("results_csv", "logger.tracking_uri", "engine.master_addr", "engine.master_port")


def job_dir() -> Path:
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path.cwd()


def run(cfg: DictConfig, out_dir: Optional[Path] = None, comm=None) -> dict[str, Any]:
    """Train (or resume, or only test) one job; returns the final metrics.

    ``engine=distributed`` starts (or joins) its K processes here, each of which calls
    ``run`` again with its rank's communicator ``comm``; only rank 0 records.
    """
    validate(cfg)
    out_dir = Path(out_dir) if out_dir is not None else job_dir()
    if cfg.test_only:
        return test_only(cfg)
    ckpt = None
    launcher = comm is None  # the process the command started (not a rank it spawned)
    if cfg.resume:
        ckpt, out_dir = checkpoint.load_resumable(resolve_path(cfg.resume))
        cfg = resumed_config(cfg, ckpt, out_dir)
        if "state" not in ckpt:
            log.warning("resume: %s was stopped before its first checkpoint was written; it starts over "
                        "(the same MLflow run)", out_dir)
        elif launcher and finished(ckpt, cfg, out_dir):
            state = ckpt["state"]
            print(f"resume: {out_dir} already finished ({state['epoch']} epochs, best_val_acc="
                  f"{state['best_val_acc']:.4f}); nothing to do (add epochs=<more> to train on)")
            return {"best_val_acc": state["best_val_acc"], "already_finished": True}
    elif launcher:
        done = finished_in_sweep(cfg)
        if done is not None:
            return done
    if launcher:
        check_processes(cfg)
        check_destinations(cfg, out_dir)
    if ENGINES.facts(cfg.engine).processes and comm is None:
        from dpl.launch.ranks import launch

        return launch(cfg, out_dir, run, on_failure=lambda status, reason: salvage(cfg, out_dir, status, reason))
    rank = 0 if comm is None else comm.rank
    trainer = build_trainer(cfg, pick_device(cfg.device) if comm is None else comm.device, rank, comm)
    timeline.mark("built (data, model, method)")
    if ckpt is not None and "state" in ckpt:
        load_training_state(trainer, ckpt, out_dir)
        if rank == 0 and trainer.state.epoch < trainer.epochs:
            log.info("resume: %s from epoch %d, step %d", out_dir, trainer.state.epoch + 1, trainer.state.step)
        elif rank == 0:  # stopped after its last epoch, before its test numbers were recorded
            log.info("resume: %s after its last epoch (%d): testing and recording it", out_dir, trainer.state.epoch)
    # (a resumed config's store is the command's, resolved where the job was launched: resumed_config)
    recorder = Recorder(cfg, out_dir, resume_run_id=ckpt.get("run_id") if ckpt else None, writer=rank == 0,
                        origin=launch_dir_of(ckpt, out_dir) if ckpt else None)
    recorder.attach(trainer)
    timeline.mark("run started (store, checkpoint)")
    if timeline.ENABLED:
        trainer.on_step.append(timeline.once("first step"))
    try:
        recorder.save(trainer)  # at once: from here on the job dir can be resumed and names its run
        trainer.fit()
        timeline.mark("last step")
    except Diverged as e:
        log.error("diverged: %s", e)
        recorder.fail(trainer, f"diverged: {e}")
        return {"best_val_acc": DIVERGED_OBJECTIVE, "diverged": True, "error": str(e)}
    except BaseException as e:
        if comm is not None:  # tell the launcher at once: writing plots below takes a while
            from dpl.launch.faults import report_fault

            report_fault(e, comm.store, rank)
        if isinstance(e, KeyboardInterrupt):
            from dpl.run.interrupt import signal_name

            recorder.fail(trainer, f"interrupted by {signal_name(e)}", status="KILLED")
        elif isinstance(e, Preempted):  # its checkpoint is written; the launcher requeues the job
            log.warning("%s", e)
            recorder.fail(trainer, str(e), status="KILLED")
        elif isinstance(e, SystemExit):  # mid-step: submitit requeueing a job of several tasks (dpl.run.preempt)
            recorder.fail(trainer, f"exited with status {e.code} while training (a scheduler's requeue, or "
                                   f"sys.exit); resumable from its last checkpoint", status="KILLED")
        else:
            recorder.fail(trainer, f"{type(e).__name__}: {first_line(e)}")
        raise
    final = trainer.final_metrics()
    recorder.finish(trainer, final)
    timeline.mark("recorded")
    return final


def check_destinations(cfg: DictConfig, out_dir: Path) -> None:
    """Everything a run writes to, tried before any data is loaded: a run must not train for
    hours and then lose its results to a typo in ``results_csv`` or an unreachable server."""
    check_results_file("results_csv", str(cfg.results_csv), resolve_path(cfg.results_csv))
    check_writable_dir("hydra.run.dir", out_dir)  # the job dir: checkpoints, history, plots, result.csv
    make_logger(cfg.logger).check()


def finished(ckpt: dict[str, Any], cfg: DictConfig, out_dir: Path) -> bool:
    """The checkpoint's training is complete and its row was recorded (``result.csv``)."""
    state = ckpt["state"]
    done = state["global_step"] >= cfg.max_steps if cfg.get("max_steps") else state["epoch"] >= cfg.epochs
    trained = state["step"] == 0 and (done or state["stopped_early"])
    return trained and (out_dir / "result.csv").is_file()


def finished_in_sweep(cfg: DictConfig) -> Optional[dict[str, Any]]:
    """A re-run sweep: the metrics of this job's FINISHED run (same sweep tag, or both of a multirun
    without one, and the same config), or None."""
    if not (cfg.sweep or in_multirun()):
        return None
    found = make_logger(cfg.logger).find_finished_run(str(cfg.sweep) if cfg.sweep else None, config_hash(cfg))
    if found is None:
        return None
    metrics = dict(found.data.metrics)
    what = f"sweep {cfg.sweep}" if cfg.sweep else "multirun"
    print(f"{what}: this job already finished as MLflow run {found.info.run_id}; skipped "
          f"(name the sweep anew, sweep=<name>, to run it again)")
    return {**metrics, "skipped": True}


def salvage(cfg: DictConfig, out_dir: Path, status: str, reason: str) -> None:
    """After a distributed job failed or was stopped: the history and plots up to the last
    finished epoch (from the checkpoint, in case rank 0 died before writing them), and the
    MLflow run ended as ``status`` unless rank 0 ended it already."""
    try:
        ckpt, _ = checkpoint.load_resumable(out_dir)
    except checkpoint.CheckpointError:
        return  # it never got as far as starting its run: nothing was recorded
    rows = ckpt["state"]["history"] if "state" in ckpt else []
    if rows:
        write_csv(out_dir / "history.csv", rows)
        if cfg.logger.plots:
            from dpl.run.plots import plot_history

            plot_history(rows, out_dir / "plots")
    if ckpt.get("run_id") and ckpt.get("tracking_uri"):
        end_run_if_running(ckpt["tracking_uri"], ckpt["run_id"], status, reason)


def resumed_config(cfg: DictConfig, ckpt: dict[str, Any], job: Optional[Path] = None) -> DictConfig:
    """The checkpoint's config, so a resumed run is the same run.

    Only keys in RESUME_KEYS may differ on the command line, and ``epochs`` may be raised to
    train on; any other override is refused in one line naming the keys, instead of being
    silently dropped. The stored config is data from a file: it is checked as the command line is
    (the schemas, then :func:`dpl.config.validate.validate`), it may hold resolved values only, and
    DESTINATION_KEYS come from this command, relative paths resolved in the job's launch dir when the
    job dir ``job`` still lies in it (:func:`launch_dir_of`)."""
    what = f"resume={cfg.resume}" if cfg.resume else f"checkpoint={cfg.checkpoint}"
    saved = _stored_config(ckpt["config"], what)
    overridden = _command_line_keys()
    differing = [k for k in overridden if k not in (*RESUME_KEYS, "epochs") and _differs(cfg, saved, k)]
    if differing:
        raise ConfigError(f"resume={cfg.resume} is invalid with {', '.join(differing)} changed: a resumed job "
                          f"keeps its config (allowed with resume: {', '.join(RESUME_KEYS[1:])}, epochs=<more>)")
    if "epochs" in overridden and cfg.epochs != saved.epochs:
        done = int(ckpt["state"]["epoch"]) if "state" in ckpt else 0
        if cfg.epochs < done:
            raise ConfigError(f"epochs={cfg.epochs} is invalid with resume: allowed >= {done} (the epochs done)")
        log.info("resume: training to epochs=%d (was %d); the lr schedule follows the new length",
                 cfg.epochs, saved.epochs)
        saved.epochs = cfg.epochs
    origin = launch_dir_of(ckpt, job)
    for key in ("dataset.root", "dataset.path"):  # relative to where the job was first started
        value = OmegaConf.select(saved, key)
        if value is not None and key not in overridden and not Path(str(value)).expanduser().is_absolute():
            OmegaConf.update(saved, key, str(origin / str(value)))
    _take_destinations(cfg, saved, ckpt, origin, overridden)
    for key in ("device", "dataset.root", "dataset.download", "engine.compile", "engine.eval_batch_size",
                "engine.memory_format"):
        if key in overridden and OmegaConf.select(saved, key) is not None:
            OmegaConf.update(saved, key, OmegaConf.select(cfg, key))
    saved.progress = cfg.progress
    saved.resume = cfg.resume
    saved.test_only, saved.checkpoint = cfg.test_only, cfg.checkpoint
    if "spawn" in saved.engine:  # engine=distributed: how to start the processes, not what they compute
        saved.engine.spawn = saved.engine.spawn or cfg.engine.get("spawn", False)
    validate(saved)
    return saved


def _stored_config(data: Any, what: str) -> DictConfig:
    """A checkpoint's or ``run.json``'s config as a typed config, or one line saying why it is refused:
    a value that is not plain data (an interpolation such as ``${oc.env:TOKEN}`` would be resolved with
    this user's environment; a control character in a name can start a new line in a file), or one that
    does not fit the schemas."""
    if not isinstance(data, dict):
        raise ConfigError(f"{what} is refused: its stored config is not a mapping")
    for key, value in config_strings(data):
        if "${" in value:
            raise ConfigError(f"{what} is refused: its stored config has an interpolation at {key} "
                              f"({_shown(value)}); a stored config holds resolved values only")
        if CONTROL.search(value):
            raise ConfigError(f"{what} is refused: its stored config has a control character in {key} "
                              f"({_shown(value)})")
    try:
        return typed(data)  # (dpl.run.checkpoint upgraded a config of an earlier format)
    except Exception as e:  # OmegaConf's validation errors: several lines, a key and a type in the first
        raise ConfigError(f"{what} is refused: its stored config does not fit dpl's schema "
                          f"({first_line(e)})") from None


def _shown(value: str, limit: int = 60) -> str:
    return repr(value if len(value) <= limit else value[:limit] + "...")


def launch_dir_of(ckpt: dict[str, Any], job: Optional[Path]) -> Path:
    """Where the job was launched, as its file says, when the job dir still lies below that folder
    (so the file names a place the job dir itself vouches for); else this command's launch dir."""
    stored = ckpt.get("launch_dir")
    if job is not None and isinstance(stored, str) and Path(stored).is_absolute():
        origin = Path(stored).resolve()
        if origin in Path(job).resolve().parents:
            return origin
    return launch_dir()


def _take_destinations(cfg: DictConfig, saved: DictConfig, ckpt: dict[str, Any], origin: Path,
                       overridden: list[str]) -> None:
    """DESTINATION_KEYS of ``saved`` set from the command ``cfg`` (a key its option lacks: the schema's
    default). Relative paths not typed on this command line resolve in ``origin``: a job resumed from
    another folder still writes its row and MLflow run where it was launched. A destination that differs
    from the one the job first used is said in one line, with how to keep the old one."""
    for key in DESTINATION_KEYS:
        group, _, name = key.rpartition(".")
        node = saved[group] if group else saved
        if name not in node:
            continue
        mine = cfg[group] if group else cfg
        if name not in mine or OmegaConf.get_type(mine) is not OmegaConf.get_type(node):  # another option
            mine = OmegaConf.structured(OmegaConf.get_type(node))
        value, before = mine[name], node[name]
        if key == "results_csv":
            if key not in overridden and not Path(str(value)).expanduser().is_absolute():
                value = str(origin / str(value))
            if not Path(str(before)).expanduser().is_absolute():
                before = str(Path(str(ckpt.get("launch_dir") or origin)) / str(before))
        elif key == "logger.tracking_uri":
            if key not in overridden:
                value = resolve_tracking_uri(str(value), origin)
            before = ckpt.get("tracking_uri") or before
        if key in ("results_csv", "logger.tracking_uri") and str(before) != str(value) and key not in overridden:
            log.warning("resume: %s=%s, from this command (the job's file says %r, and a stored config does not "
                        "choose where a run writes: pass %s=... for another)", key, value, before, key)
        node[name] = value


def _command_line_keys() -> list[str]:
    """The keys given on the command line (``+`` stripped), or none outside a Hydra app."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    keys = []
    for text in HydraConfig.get().overrides.task:
        key = text.split("=", 1)[0].lstrip("+~")
        if key and not key.startswith("hydra"):
            keys.append(key)
    return keys


def _differs(cfg: DictConfig, saved: DictConfig, key: str) -> bool:
    if key == "experiment":  # a whole preset: any key it sets counts
        mine, theirs = flatten_config(cfg), flatten_config(saved)
        return any(mine.get(k) != theirs.get(k) for k in mine
                   if k.split(".")[0] not in ("hydra", "logger") and k not in (*RESUME_KEYS, "epochs", "results_csv"))
    a, b = OmegaConf.select(cfg, key, default=None), OmegaConf.select(saved, key, default=None)
    plain = lambda v: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v  # noqa: E731
    return plain(a) != plain(b)


def test_only(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate a checkpoint's final and best models on the test split."""
    if not (cfg.checkpoint or cfg.resume):
        raise ConfigError("test_only=true needs checkpoint=<path> (or resume=<job dir>)")
    ckpt = checkpoint.load(resolve_path(cfg.checkpoint or cfg.resume))
    saved = resumed_config(cfg, ckpt, checkpoint.locate(resolve_path(cfg.checkpoint or cfg.resume)).parent)
    saved.pretrained = None
    if ENGINES.facts(saved.engine).processes:  # a checkpoint holds every worker, stacked: one process evaluates it
        saved.engine = one_process_engine(saved.engine)
    trainer = build_trainer(saved, pick_device(cfg.device))
    load_training_state(trainer, ckpt, checkpoint.locate(resolve_path(cfg.checkpoint or cfg.resume)))
    final = trainer.final_metrics()
    print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in final.items()))
    return final
