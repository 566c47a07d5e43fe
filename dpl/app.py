"""One dpl job: build the pieces named by the config, train, evaluate, record.

This is the plumbing around :class:`dpl.train.Trainer`: device and data, MLflow,
checkpoints, plots and the results CSV. ``python -m dpl`` calls :func:`run`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from dpl import checkpoint, legacy
from dpl.compression import build_compression
from dpl.config import typed
from dpl.errors import ConfigError, Diverged
from dpl.preflight import validate
from dpl.data import load_dataset
from dpl.engine import build_workers, pick_device
from dpl.io import temp_files, write_csv
from dpl.methods import METHODS, build_method
from dpl.models import build_model
from dpl.plots import plot_history
from dpl.sweep import parent_run_id
from dpl.tracking import (CONFIG_HASH_TAG, JOB_DIR_TAG, MULTIRUN_TAG, RUN_NAME_TAG, append_result_row,
                          check_results_file, check_tracking, check_writable_dir, config_hash, end_run_if_running,
                          find_finished_run, flatten_config, in_multirun, launch_dir, link_line, make_logger, run_name,
                          source_tags)
from dpl.train import Trainer

log = logging.getLogger("dpl")

# A diverged run's best_val_acc: no number (python -m dpl hands a sweeper "diverged", a failed trial).
DIVERGED_OBJECTIVE = float("nan")
# Keys a resume may pass that change how the job runs, not what it computes.
RESUME_KEYS = ("resume", "progress", "engine.spawn", "device", "dataset.root", "dataset.download", "test_only",
               "checkpoint", "engine.compile", "engine.eval_batch_size", "engine.memory_format")


def job_dir() -> Path:
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path.cwd()


def resolve_path(path: str | os.PathLike) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else launch_dir() / p


def build_trainer(cfg: DictConfig, device: torch.device, rank: int = 0, comm=None) -> Trainer:
    """Data, model, workers, method and optimizer for ``cfg`` (seeded: the same on every rank)."""

    def load(download: bool):
        node = cfg.dataset if download or "download" not in cfg.dataset else \
            OmegaConf.merge(cfg.dataset, {"download": False})
        root = cfg.dataset.get("root")  # synthetic data has no files
        return load_dataset(node, cfg.seed, device, root=resolve_path(root) if root else None)

    # engine=distributed: only rank 0 may download; the others wait for it
    data = load(True) if comm is None else comm.rank0_first(load)
    n_train = int(data.train_y.shape[0])
    if cfg.K > n_train:
        raise ConfigError(f"K={cfg.K} is invalid: allowed at most {n_train} (the training samples of "
                          f"{cfg.dataset.name})")
    torch.manual_seed(cfg.seed)
    try:
        model = build_model(cfg.model.name, data.channels, data.num_classes, data.image_size).to(device)
    except ValueError as e:  # the model cannot take these images
        raise ConfigError(f"dataset.image_size={data.image_size} is invalid: {e}") from None
    if cfg.pretrained:
        weights = checkpoint.load_weights(resolve_path(cfg.pretrained))
        try:
            model.load_state_dict(weights)
        except RuntimeError as e:  # missing / unexpected keys or shapes: one line, not torch's list
            first = str(e).strip().splitlines()
            detail = " ".join(line.strip() for line in first[1:3])[:300] or first[0][:300]
            raise checkpoint.CheckpointError(f"pretrained={cfg.pretrained!r} does not fit model "
                                             f"{cfg.model.name} on {cfg.dataset.name}: {detail}") from None
    method = build_method(cfg.method, cfg.local_momentum)
    workers = build_workers(cfg, model, device, comm, synchronous=method.synchronous)
    workers.point.compression = build_compression(cfg.get("compression"), cfg.seed)  # None: none
    return Trainer(cfg, data, workers, method, rank=rank)


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
        cfg = _resumed_config(cfg, ckpt)
        if "state" not in ckpt:
            log.warning("resume: %s was stopped before its first checkpoint was written; it starts over "
                        "(the same MLflow run)", out_dir)
        elif launcher and finished(ckpt, cfg, out_dir):
            state = ckpt["state"]
            print(f"resume: {out_dir} already finished ({state['epoch']} epochs, best_val_acc="
                  f"{state['best_val_acc']:.4f}); nothing to do (add epochs=<more> to train on)")
            return {"best_val_acc": state["best_val_acc"], "already_finished": True}
    elif launcher:
        done = _finished_in_sweep(cfg)
        if done is not None:
            return done
    if launcher:
        check_destinations(cfg, out_dir, ckpt.get("tracking_uri") if ckpt else None)
    if cfg.engine.name == "distributed" and comm is None:
        _check_world(cfg)
        from dpl.engine.launch import launch

        return launch(cfg, out_dir, run, on_failure=lambda status, reason: salvage(cfg, out_dir, status, reason))
    rank = 0 if comm is None else comm.rank
    trainer = build_trainer(cfg, pick_device(cfg.device) if comm is None else comm.device, rank, comm)
    if ckpt is not None and "state" in ckpt:
        load_training_state(trainer, ckpt, out_dir)
    recorder = Recorder(cfg, out_dir, resume_run_id=ckpt.get("run_id") if ckpt else None,
                        resume_uri=ckpt.get("tracking_uri") if ckpt else None, writer=rank == 0)
    recorder.attach(trainer)
    try:
        recorder.save(trainer)  # at once: from here on the job dir can be resumed and names its run
        trainer.fit()
    except Diverged as e:
        log.error("diverged: %s", e)
        recorder.fail(trainer, f"diverged: {e}")
        return {"best_val_acc": DIVERGED_OBJECTIVE, "diverged": True, "error": str(e)}
    except BaseException as e:
        if comm is not None:  # tell the launcher at once: writing plots below takes a while
            from dpl.engine.launch import report_fault

            report_fault(e, comm.store, rank)
        if isinstance(e, KeyboardInterrupt):
            from dpl.interrupt import signal_name

            recorder.fail(trainer, f"interrupted by {signal_name(e)}", status="KILLED")
        else:
            recorder.fail(trainer, f"{type(e).__name__}: {_first_line(e)}")
        raise
    final = trainer.final_metrics()
    recorder.finish(trainer, final)
    return final


def load_training_state(trainer: Trainer, ckpt: dict[str, Any], where: Path) -> None:
    """``trainer.load_state_dict(ckpt)``; a checkpoint whose contents do not fit its own config
    (edited, or from another dpl) is one line naming it, not a KeyError or a shape traceback."""
    try:
        trainer.load_state_dict(ckpt)
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
        raise checkpoint.CheckpointError(f"checkpoint {where} does not fit the run it describes "
                                         f"({type(e).__name__}: {_first_line(e)[:200]})") from None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:500]


def check_destinations(cfg: DictConfig, out_dir: Path, resume_uri: Optional[str] = None) -> None:
    """Everything a run writes to, tried before any data is loaded: a run must not train for
    hours and then lose its results to a typo in ``results_csv`` or an unreachable server."""
    check_results_file("results_csv", str(cfg.results_csv), resolve_path(cfg.results_csv))
    check_writable_dir("hydra.run.dir", out_dir)  # the job dir: checkpoints, history, plots, result.csv
    check_tracking(cfg.logger, resume_uri)


# Training images before the validation split, where the config alone tells (build_trainer checks exactly).
TRAIN_SAMPLES = {"cifar10": 50_000, "cifar100": 50_000, "fashion_mnist": 60_000}


def _check_world(cfg: DictConfig) -> None:
    """engine=distributed: a K that no dataset split could feed fails here, once, before K processes start."""
    n = cfg.dataset.num_train if cfg.dataset.name == "synthetic" else TRAIN_SAMPLES.get(cfg.dataset.name)
    if n is not None and cfg.K > n:
        raise ConfigError(f"K={cfg.K} is invalid: allowed at most {n} (the training samples of {cfg.dataset.name})")


def finished(ckpt: dict[str, Any], cfg: DictConfig, out_dir: Path) -> bool:
    """The checkpoint's training is complete and its row was recorded (``result.csv``)."""
    state = ckpt["state"]
    trained = state["step"] == 0 and (state["epoch"] >= cfg.epochs or state["stopped_early"])
    return trained and (out_dir / "result.csv").is_file()


def _finished_in_sweep(cfg: DictConfig) -> Optional[dict[str, Any]]:
    """A re-run sweep: the metrics of this job's FINISHED run (same sweep tag, or both of a multirun
    without one, and the same config), or None."""
    if not (cfg.sweep or in_multirun()) or cfg.logger.name != "mlflow":
        return None
    found = find_finished_run(cfg.logger, str(cfg.sweep) if cfg.sweep else None, config_hash(cfg))
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
            plot_history(rows, out_dir / "plots")
    if ckpt.get("run_id") and ckpt.get("tracking_uri"):
        end_run_if_running(ckpt["tracking_uri"], ckpt["run_id"], status, reason)


def _resumed_config(cfg: DictConfig, ckpt: dict[str, Any]) -> DictConfig:
    """The checkpoint's config, so a resumed run is the same run.

    Only keys in RESUME_KEYS may differ on the command line, and ``epochs`` may be raised to
    train on; any other override is refused in one line naming the keys, instead of being
    silently dropped."""
    saved = typed(legacy.upgrade(ckpt["config"]))  # configs written before method.outer
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
    origin = ckpt.get("launch_dir")
    for key in ("results_csv", "dataset.root"):  # relative to where the job was first started, not to here
        value = str(OmegaConf.select(saved, key))
        if OmegaConf.select(saved, key) is None:  # a dataset without files
            continue
        if origin and key not in overridden and not Path(value).expanduser().is_absolute():
            OmegaConf.update(saved, key, str(Path(origin) / value))
    for key in ("device", "dataset.root", "dataset.download", "engine.compile", "engine.eval_batch_size",
                "engine.memory_format"):
        if key in overridden and OmegaConf.select(saved, key) is not None:
            OmegaConf.update(saved, key, OmegaConf.select(cfg, key))
    saved.progress = cfg.progress
    saved.resume = cfg.resume
    if "spawn" in saved.engine:  # engine=distributed: how to start the processes, not what they compute
        saved.engine.spawn = saved.engine.spawn or cfg.engine.get("spawn", False)
    validate(saved)
    return saved


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
    saved = _resumed_config(cfg, ckpt)
    saved.pretrained = None
    saved.engine.name = "simulated"  # a checkpoint holds every worker, stacked: one process evaluates it
    trainer = build_trainer(saved, pick_device(cfg.device))
    load_training_state(trainer, ckpt, checkpoint.locate(resolve_path(cfg.checkpoint or cfg.resume)))
    final = trainer.final_metrics()
    print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in final.items()))
    return final


class Recorder:
    """Plumbing beside the loop: MLflow, checkpoints, progress bar, plots, results CSV."""

    def __init__(self, cfg: DictConfig, out_dir: Path, resume_run_id: Optional[str] = None,
                 writer: bool = True, resume_uri: Optional[str] = None) -> None:
        self.cfg, self.out_dir = cfg, out_dir
        # Ranks other than 0 of engine=distributed take part in checkpoint gathers but write nothing.
        self.writer = writer
        self.ckpt_path = out_dir / checkpoint.FILENAME
        if writer:
            for stale in temp_files(self.ckpt_path):  # a process killed mid-write left it behind
                stale.unlink(missing_ok=True)
        self.logger = make_logger(cfg.logger if writer else OmegaConf.create({"name": "none"}))
        tags = {"method": cfg.method.name, "optimizer": cfg.optimizer.name, "dataset": cfg.dataset.name,
                **source_tags(), CONFIG_HASH_TAG: config_hash(cfg), JOB_DIR_TAG: str(out_dir.resolve()),
                RUN_NAME_TAG: run_name(cfg, local_steps=METHODS[cfg.method.name].has_local_steps)}
        if cfg.sweep:
            tags["sweep"] = str(cfg.sweep)
        elif in_multirun():
            tags[MULTIRUN_TAG] = "true"
        if parent_run_id():  # a job of a sweep that opened an MLflow parent run (dpl.sweep)
            tags["mlflow.parentRunId"] = parent_run_id()
        self.run_id = self.logger.start(cfg, tags, resume_run_id=resume_run_id, resume_uri=resume_uri)
        # What a checkpoint carries beside the training state; also written to run.json at once, so a
        # job killed before its first checkpoint was complete can be resumed (it starts over).
        self.extras = {"config": OmegaConf.to_container(self.cfg, resolve=True), "run_id": self.run_id,
                       "tracking_uri": self.logger.tracking_uri, "launch_dir": str(launch_dir())}
        if writer:
            checkpoint.save_run_file(self.extras, out_dir)
        self.bar = self.step_bar = self._redirect = None

    def attach(self, trainer: Trainer) -> None:
        from tqdm.auto import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        show = bool(self.cfg.progress and self.writer)
        s = trainer.state
        self.bar = tqdm(total=self.cfg.epochs, initial=s.epoch, desc=f"{self.cfg.method.name}", unit="epoch",
                        disable=not show, dynamic_ncols=True, position=0)
        # The steps of the epoch in progress: redrawn at most every `mininterval` s, from host ints only
        # (no device value is read per step, so a GPU run is not synchronised by its progress bar).
        self.step_bar = tqdm(total=trainer.steps_per_epoch, initial=s.step, desc=self._epoch_desc(s.epoch),
                             unit="step", leave=False, disable=not show, dynamic_ncols=True, position=1,
                             mininterval=0.5)
        if show:  # log lines (one per epoch) print above the bars instead of through them
            self._redirect = logging_redirect_tqdm()
            self._redirect.__enter__()
        trainer.on_epoch.append(self.epoch_done)
        trainer.on_step.append(self.step_done)

    def _epoch_desc(self, epoch: int) -> str:
        return f"epoch {epoch + 1}/{self.cfg.epochs}"

    def epoch_done(self, trainer: Trainer, record: dict[str, float]) -> None:
        self.logger.log_metrics(record, step=int(record["epoch"]))
        self.save(trainer)
        if self.writer:  # one line per epoch in <job dir>/dpl.log (and on stdout)
            log.info("epoch %d/%d train_loss=%.4f train_acc=%.4f val_loss=%.4f val_acc=%.4f lr=%.4g H=%d (%.1f s)",
                     int(record["epoch"]), self.cfg.epochs, record["train_loss"], record["train_acc"],
                     record["val_loss"], record["val_acc"], record["lr"], int(record["H"]), record["epoch_time_s"])
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{record['train_loss']:.3f}", val_acc=f"{record['val_acc']:.3f}",
                                 H=int(record["H"]))
        if self.step_bar is not None and trainer.state.epoch < self.cfg.epochs:
            self.step_bar.reset(total=trainer.steps_per_epoch)
            self.step_bar.set_description(self._epoch_desc(trainer.state.epoch), refresh=False)

    def step_done(self, trainer: Trainer) -> None:
        if self.step_bar is not None and not self.step_bar.disable:
            s = trainer.state
            # update() returns True only when it redraws: the running loss is formatted then, and only
            # while it is a host float (reading a device tensor here would sync every step).
            if self.step_bar.update(1) and isinstance(s.loss_sum, float) and s.seen:
                self.step_bar.set_postfix(loss=f"{s.loss_sum / s.seen:.3f}", refresh=False)
        every = self.cfg.checkpoint_every
        if every and trainer.state.global_step % every == 0 and trainer.state.step != 0:
            self.save(trainer)

    def save(self, trainer: Trainer) -> None:
        trainer.save_checkpoint(self.ckpt_path, self.extras)

    def finish(self, trainer: Trainer, final: dict[str, Any]) -> None:
        self._close_bar()
        final = {**final, **h_summary(trainer.state.history)}
        self.logger.log_metrics({k: float(v) for k, v in final.items()}, step=trainer.state.epoch)
        self._artifacts(trainer)
        if not self.writer:
            return
        row = {**flatten_config(self.cfg), **final, "run_id": self.run_id or "", "job_dir": str(self.out_dir)}
        # The job dir's copy first: if the shared CSV cannot be written now, the row is not lost.
        write_csv(self.out_dir / "result.csv", [row])  # this run's row of results_csv, as an artifact
        shared = resolve_path(self.cfg.results_csv)
        try:
            append_result_row(shared, row)
        except OSError as e:
            log.error("could not add the row to %s (%s); it is in %s", shared, e, self.out_dir / "result.csv")
        self.logger.log_artifact(self.out_dir / "result.csv")
        self.logger.finish("FINISHED")
        log.info("test_acc=%.4f test_acc_best=%.4f best_val_acc=%.4f",
                 final["test_acc"], final["test_acc_best"], final["best_val_acc"])
        self._print_link()

    def fail(self, trainer: Trainer, reason: str, status: str = "FAILED") -> None:
        """Record what there is and end the run ``status``. Each step may fail in turn (a full disk
        fails the history too, and a store on that disk): a warning each, then the run's own error."""
        self._close_bar()
        try:
            self._artifacts(trainer)
        except OSError as e:
            log.warning("could not write the history and plots in %s: %s", self.out_dir, e.strerror or e)
        try:
            self.logger.finish(status, reason=reason)
        except Exception as e:  # noqa: BLE001 - the store's own error (sqlite: "database or disk is full")
            log.warning("could not end MLflow run %s %s (%s); dpl.report ends it KILLED once this process "
                        "is gone", self.run_id, status, _first_line(e)[:200])
        self._print_link()

    def _print_link(self) -> None:
        """Where to see this run: its experiment's runs table in dpl's column view (MLflow only)."""
        line = link_line(self.logger.tracking_uri, self.logger.experiment_id) if self.writer else None
        if line is not None:
            log.info("%s", line)

    def _artifacts(self, trainer: Trainer) -> None:
        rows = trainer.state.history if self.writer else []
        if self.cfg.logger.plots and rows:
            for path in plot_history(rows, self.out_dir / "plots"):
                self.logger.log_artifact(path, "plots")
        if rows:
            csv = self.out_dir / "history.csv"
            write_csv(csv, rows)
            self.logger.log_artifact(csv)

    def _close_bar(self) -> None:
        for bar in (self.step_bar, self.bar):
            if bar is not None:
                bar.close()
        self.bar = self.step_bar = None
        if self._redirect is not None:
            self._redirect.__exit__(None, None, None)
            self._redirect = None


def h_summary(history: list[dict[str, float]]) -> dict[str, float]:
    """The local steps H trained with, over the epochs: first, last and mean (a dynamic_h run's H
    changes per epoch; the config's H is only where it starts)."""
    hs = [float(row["H"]) for row in history if "H" in row]
    if not hs:
        return {}
    return {"H_first": hs[0], "H_last": hs[-1], "H_mean": sum(hs) / len(hs)}
