"""Plumbing beside the training loop: MLflow, checkpoints, progress bars, plots, the results CSV.

:class:`Recorder` attaches to the trainer's hooks; the loop does not know what it does.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from dpl.core.loop import Trainer
from dpl.core.methods import METHODS
from dpl.errors import first_line
from dpl.io import temp_files, write_csv
from dpl.run import checkpoint, preempt
from dpl.run.build import resolve_path, save_training
from dpl.tracking.loggers import NullLogger
from dpl.tracking.params import config_hash, flatten_config, launch_dir, source_tags
from dpl.tracking.results import append_result_row, csv_row
from dpl.tracking.run_names import in_multirun, run_name
from dpl.tracking.store import CONFIG_HASH_TAG, JOB_DIR_TAG, MULTIRUN_TAG, RUN_NAME_TAG, link_line
from dpl.tracking.store_process import make_logger
from dpl.tracking.sweep import parent_run_id

log = logging.getLogger("dpl")
BUILT_IN = ("train_loss", "train_acc")  # the step metrics every epoch's log line shows first
MIB = 2 ** 20


class Recorder:
    """Plumbing beside the loop: MLflow, checkpoints, progress bar, plots, results CSV."""

    def __init__(self, cfg: DictConfig, out_dir: Path, resume_run_id: Optional[str] = None,
                 writer: bool = True, progress: bool = True, origin: Optional[Path] = None) -> None:
        self.cfg, self.out_dir = cfg, out_dir
        self.progress = progress  # False: a packed group's runs, which share the group's one bar (dpl.pack)
        # Ranks other than 0 of engine=distributed take part in checkpoint gathers but write nothing.
        self.writer = writer
        self.ckpt_path = out_dir / checkpoint.FILENAME
        if writer:
            for stale in temp_files(self.ckpt_path):  # a process killed mid-write left it behind
                stale.unlink(missing_ok=True)
        self.logger = make_logger(cfg.logger) if writer else NullLogger()
        tags = {"method": cfg.method.name, "optimizer": cfg.optimizer.name, "dataset": cfg.dataset.name,
                **source_tags(), CONFIG_HASH_TAG: config_hash(cfg), JOB_DIR_TAG: str(out_dir.resolve()),
                RUN_NAME_TAG: run_name(cfg, local_steps=METHODS.facts(cfg.method).local_steps),
                # engine.threads as applied when the workers were built (auto's count depends on the machine and
                # the launch): a tag, which a resume on another machine may change, not a param, which MLflow
                # keeps as first logged
                "threads": str(torch.get_num_threads())}
        if cfg.sweep:
            tags["sweep"] = str(cfg.sweep)
        elif in_multirun():
            tags[MULTIRUN_TAG] = "true"
        if parent_run_id():  # a job of a sweep that opened an MLflow parent run (dpl.tracking.sweep)
            tags["mlflow.parentRunId"] = parent_run_id()
        self.run_id = self.logger.start(cfg, tags, resume_run_id=resume_run_id)
        # What a checkpoint carries beside the training state; also written to run.json at once, so a
        # job killed before its first checkpoint was complete can be resumed (it starts over).
        self.extras = {"config": OmegaConf.to_container(self.cfg, resolve=True), "run_id": self.run_id,
                       "tracking_uri": self.logger.tracking_uri, "launch_dir": str(origin or launch_dir())}
        if writer:
            checkpoint.save_run_file(self.extras, out_dir)
        self.bar = self.step_bar = self._redirect = None

    def attach(self, trainer: Trainer) -> None:
        from tqdm.auto import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        show = bool(self.cfg.progress and self.writer and self.progress)
        s = trainer.state
        every = self.cfg.get("eval_every")
        # the records: epochs, or evaluations every eval_every steps
        total, done = (trainer.epochs, s.epoch) if every is None else (-(-trainer.total_steps // every), len(s.history))
        self.bar = tqdm(total=total, initial=done, desc=f"{self.cfg.method.name}",
                        unit="epoch" if every is None else "eval", disable=not show, dynamic_ncols=True, position=0)
        # The steps to the next record: redrawn at most every `mininterval` s, from host ints only
        # (no device value is read per step, so a GPU run is not synchronised by its progress bar).
        self.step_bar = tqdm(total=self._interval(trainer), initial=s.global_step - s.recorded_at,
                             desc=self._epoch_desc(trainer), unit="step", leave=False, disable=not show,
                             dynamic_ncols=True, position=1, mininterval=0.5)
        if show:  # log lines (one per epoch) print above the bars instead of through them
            self._redirect = logging_redirect_tqdm()
            self._redirect.__enter__()
        trainer.on_epoch.append(self.epoch_done)
        trainer.on_step.append(self.step_done)

    def _interval(self, trainer: Trainer) -> int:
        """The steps from one record to the next: an epoch's, or eval_every."""
        every = self.cfg.get("eval_every")
        return trainer.steps_per_epoch if every is None else every

    def _epoch_desc(self, trainer: Trainer) -> str:
        s = trainer.state
        if self.cfg.get("eval_every") is None:
            return f"epoch {s.epoch + 1}/{trainer.epochs}"
        return f"step {s.global_step}/{trainer.total_steps}"

    def epoch_done(self, trainer: Trainer, record: dict[str, float]) -> None:
        by_step = self.cfg.get("eval_every") is not None  # MLflow's step, the log line: the run's steps
        self.logger.log_metrics({**record, **in_mib(record)}, step=int(record["step" if by_step else "epoch"]))
        self.save(trainer)
        if self.writer:  # one line per record in <job dir>/dpl.log (and on stdout), the registered step metrics last
            log.info("%s", self._line(trainer, record, by_step))
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{record['train_loss']:.3f}", val_acc=f"{record['val_acc']:.3f}",
                                 H=int(record["H"]))
        if self.step_bar is not None and not trainer.finished:
            self.step_bar.reset(total=self._interval(trainer))
            self.step_bar.set_description(self._epoch_desc(trainer), refresh=False)

    def _line(self, trainer: Trainer, record: dict[str, float], by_step: bool) -> str:
        """The record's log line; text shows bits per byte and bytes per second (a byte is its sample)."""
        where = (f"step {int(record['step'])}/{trainer.total_steps}" if by_step
                 else f"epoch {int(record['epoch'])}/{trainer.epochs}")
        extra = "".join(f" {m.name}={record[m.name]:.4g}" for m in trainer.metrics if m.name not in BUILT_IN)
        if "val_bpb" in record:
            scores = (f"train_loss={record['train_loss']:.4f} train_bpb={record['train_bpb']:.4f} "
                      f"val_loss={record['val_loss']:.4f} val_bpb={record['val_bpb']:.4f}")
            speed = f", {record['samples_per_s']:.0f} bytes/s"
        else:
            scores = (f"train_loss={record['train_loss']:.4f} train_acc={record['train_acc']:.4f} "
                      f"val_loss={record['val_loss']:.4f} val_acc={record['val_acc']:.4f}")
            speed = ""
        return f"{where} {scores} lr={record['lr']:.4g} H={int(record['H'])}{extra} ({record['epoch_time_s']:.1f} s{speed})"

    def step_done(self, trainer: Trainer) -> None:
        if self.step_bar is not None and not self.step_bar.disable:
            s = trainer.state
            # update() returns True only when it redraws: the running loss is formatted then, and only
            # while it is a host float (reading a device tensor here would sync every step).
            if self.step_bar.update(1) and "train_loss" in s.sums and s.seen:
                self.step_bar.set_postfix(loss=f"{s.sums['train_loss'] / s.seen:.3f}", refresh=False)
        every = self.cfg.checkpoint_every
        stop = preempt.requested()  # the scheduler's signal (dpl.run.preempt): stop here, resumable from this step
        if stop or (every and trainer.state.global_step % every == 0 and trainer.state.step != 0):
            self.save(trainer)
        if stop:
            raise preempt.Preempted(f"epoch {trainer.state.epoch + 1}, step {trainer.state.step}")

    def save(self, trainer: Trainer) -> None:
        save_training(trainer, self.ckpt_path, self.extras)

    def finish(self, trainer: Trainer, final: dict[str, Any]) -> None:
        self._close_bar()
        final = {**final, **h_summary(trainer.state.history)}
        self.logger.log_metrics({k: float(v) for k, v in final.items()}, step=trainer.state.epoch)
        self._artifacts(trainer)
        if not self.writer:
            return
        row = {**flatten_config(self.cfg), **final, "run_id": self.run_id or "", "job_dir": str(self.out_dir)}
        # The job dir's copy first: if the shared CSV cannot be written now, the row is not lost.
        write_csv(self.out_dir / "result.csv", [csv_row(row)])  # this run's row of results_csv, as an artifact
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
                        "is gone", self.run_id, status, first_line(e)[:200])
        self._print_link()

    def _print_link(self) -> None:
        """Where to see this run: its experiment's runs table in dpl's column view (MLflow only)."""
        line = link_line(self.logger.tracking_uri, self.logger.experiment_id) if self.writer else None
        if line is not None:
            log.info("%s", line)

    def _artifacts(self, trainer: Trainer) -> None:
        rows = trainer.state.history if self.writer else []
        if self.cfg.logger.plots and rows:
            from dpl.run.plots import plot_history  # matplotlib: 0.4 s of start-up a run without plots need not pay

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


def in_mib(record: dict[str, float]) -> dict[str, float]:
    """Each byte count of ``record`` in MiB beside it (``comm_bytes`` -> ``comm_mib``): MLflow's table shows
    95755440 where 91.3 reads at a glance. MLflow only: history.csv and results.csv keep the bytes."""
    return {k.replace("bytes", "mib"): v / MIB for k, v in record.items() if "bytes" in k.split("_")}


def h_summary(history: list[dict[str, float]]) -> dict[str, float]:
    """The local steps H trained with, over the epochs: first, last and mean (a dynamic_h run's H
    changes per epoch; the config's H is only where it starts)."""
    hs = [float(row["H"]) for row in history if "H" in row]
    if not hs:
        return {}
    return {"H_first": hs[0], "H_last": hs[-1], "H_mean": sum(hs) / len(hs)}
