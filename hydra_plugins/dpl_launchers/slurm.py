"""``hydra/launcher=slurm`` and ``hydra/launcher=local``: Hydra's submitit launchers, with dpl's job start.

Each job of a sweep is one submitit job (on Slurm, one task of a job array; with ``local``, real
processes on this machine, as submitit's local executor starts them). dpl's launchers are the
plugin's (``hydra-submitit-launcher``), with what a dpl job needs at its start and end:

- **preemption and time limits** (:mod:`dpl.run.preempt`): submitit's signal is met at the end of a
  step, where dpl writes its checkpoint; :meth:`checkpoint` then resubmits the job with ``resume=``
  its job dir, so the requeued job continues in the same dir and MLflow run. ``max_num_timeout``
  bounds the requeues after time limits (submitit's count; preemptions are requeued always).
- **ranks** (:mod:`dpl.launch.slurm`): a job of several tasks (``tasks_per_node`` x ``nodes``) is
  one ``engine=distributed`` run whose ranks are its tasks; rank 0 alone writes the job dir's
  ``.hydra/`` and ``dpl.log``.
- **errors**: a job refused for the user's reason (a bad value) is one line per job and exit
  status 2 after the sweep, as with the basic launcher; a relative ``sqlite:///`` store is
  refused before anything is submitted to Slurm (each node would resolve it on its own).

The configs are ``conf/hydra/launcher/slurm.yaml`` and ``local.yaml``; the keys are the plugin's.
"""

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, run_job, setup_globals
from omegaconf import open_dict

from hydra_plugins.hydra_submitit_launcher.config import LocalQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import BaseSubmititLauncher


class _DplJobs(BaseSubmititLauncher):
    """What dpl's two submitit launchers share; ``_EXECUTOR`` says which executor."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from dpl.tracking.loggers import LOGGERS
        from dpl.tracking.store import check_store_for_launcher
        from hydra_plugins.dpl_launchers import _exit_on_user_errors

        assert self.config is not None
        if self.config.get("logger") is not None and LOGGERS.facts(self.config.logger).store:
            check_store_for_launcher(str(self.config.logger.tracking_uri), type(self).__name__)
        import submitit

        from dpl.core.engines import LAUNCH_JOBS_ENV

        if self._EXECUTOR == "local":  # every job of the sweep starts at once on this machine: each takes a share
            os.environ[LAUNCH_JOBS_ENV] = str(len(job_overrides))  # of the cores (engine.threads=auto)
        try:
            returns = super().launch(job_overrides, initial_job_idx)
        except submitit.core.utils.UncompletedJobError as e:  # its process ended before the job ran
            _exit_not_started(e, self.params.get("setup"))
        finally:
            if self._EXECUTOR == "local":
                _tidy_local_sweep(Path(str(self.config.hydra.sweep.dir)))
        _exit_on_user_errors(returns)
        return returns

    def __call__(self, sweep_overrides: List[str], job_dir_key: str, job_num: int, job_id: str,
                 singleton_state: Dict[type, Singleton], resume_dir: Optional[str] = None) -> JobReturn:
        """One job, in its submitit process (each task of it, for a job of several tasks)."""
        import submitit

        from dpl.launch.slurm import export_ranks
        from dpl.run import preempt

        assert self.hydra_context is not None and self.config is not None and self.task_function is not None
        env = submitit.JobEnvironment()
        Singleton.set_state(singleton_state)
        setup_globals()
        extra: List[str] = []
        if env.num_tasks > 1:  # engine=distributed over the job's tasks: the env:// variables from them
            export_ranks(env)
            if env.global_rank > 0:  # one job dir, written by rank 0 (as under torchrun)
                extra = ["hydra.output_subdir=null", "hydra/job_logging=disabled"]
        config = self.hydra_context.config_loader.load_sweep_config(self.config, [*sweep_overrides, *extra])
        with open_dict(config.hydra.job):
            config.hydra.job.id = env.job_id
            config.hydra.job.num = job_num
        if resume_dir is not None:  # requeued after a preemption: continue the run where it stopped
            with open_dict(config):
                config.resume = resume_dir
        self._job_dir = Path(str(config.hydra.sweep.dir), str(config.hydra.sweep.subdir)).resolve()
        # One task: stop at a step boundary. Several: submitit's handler (see dpl.run.preempt).
        if env.num_tasks == 1:
            preempt.defer(env._usr_sig())
        try:
            return run_job(hydra_context=self.hydra_context, task_function=self.task_function, config=config,
                           job_dir_key=job_dir_key, job_subdir_key="hydra.sweep.subdir")
        except preempt.Preempted as stop:
            try:
                preempt.requeue()  # submitit's handler: checkpoint() below, requeue, exit
            except submitit.core.utils.UncompletedJobError as e:  # its time limit once too often
                from dpl.errors import OutOfRequeues, first_line
                from dpl.run.interrupt import resume_hint

                why = OutOfRequeues(f"stopped at {stop.where} and not requeued: {first_line(e).rstrip('.')} "
                                    f"(hydra.launcher.max_num_timeout={self.params.get('max_num_timeout')}: raise "
                                    f"it or timeout_min; {resume_hint(self._job_dir)})")
                return _failed(sweep_overrides, why)
            raise
        except SystemExit as e:  # python -m dpl's one-line exits: the error that caused it, as the job's return
            cause = e.__context__
            if not _one_line_error(cause):
                raise
            return _failed(sweep_overrides, cause)
        finally:
            preempt.reset()

    def checkpoint(self, sweep_overrides: List[str], job_dir_key: str, job_num: int, job_id: str,
                   singleton_state: Dict[type, Singleton], resume_dir: Optional[str] = None) -> Any:
        """submitit's checkpoint protocol: the job to requeue. The same job, with ``resume=`` its job dir
        once dpl has written something there to resume (``run.json``, then ``checkpoint.pt``)."""
        import submitit

        from dpl.run.checkpoint import FILENAME, RUN_FILE

        job = getattr(self, "_job_dir", None)
        if job is not None and ((job / FILENAME).is_file() or (job / RUN_FILE).is_file()):
            resume_dir = str(job)
        return submitit.helpers.DelayedSubmission(self, sweep_overrides, job_dir_key, job_num, job_id,
                                                  singleton_state, resume_dir=resume_dir)


def _failed(sweep_overrides: List[str], error: BaseException) -> JobReturn:
    """The job's return for an error its process reported in one line (the launcher prints it)."""
    return JobReturn(overrides=list(sweep_overrides), working_dir=os.getcwd(), task_name="dpl",
                     status=JobStatus.FAILED, _return_value=error)


def _exit_not_started(e: BaseException, setup: Optional[Sequence[str]]) -> None:
    """A job whose process ended without a result (a ``setup`` line that failed, a Python that cannot
    start): one line naming it and the last line it printed, exit status 2, as for a refused job."""
    import sys

    message = str(e).splitlines()
    said = [line for line in message[2:] if line.strip() and not set(line) <= {"-"}
            and not line.startswith(("Error stream produced", "No error stream", "No output/error stream"))]
    shown = f": {said[-1].strip()[:300]}" if said else " and printed nothing"
    where = f" (hydra.launcher.setup={list(setup)} ran before it)" if setup else ""
    job = message[0].split(" with path")[0] if message else "a job"
    from dpl.tracking.sweep import discard_unused_parent

    discard_unused_parent()  # no job ran: no parent run (nor a store made for it) is left behind
    print(f"error: {job} of the sweep did not start: its process exited without a result{where}{shown}",
          file=sys.stderr)
    sys.exit(2)


def _tidy_local_sweep(sweep_dir: Path) -> None:
    """At the end of a local sweep submitit's folder goes (its pickles are of no use once the jobs ended):
    what each job printed (its tasks' stdout, then stderr: the lines ``dpl.log`` holds, and prints, warnings
    and tracebacks) is kept as ``<job dir>/console.log`` (``<sweep dir>/<n>.console.log`` where no job dir was
    made). A sweep dir left with Hydra's ``multirun.yaml`` alone (no job started) goes too, with the empty
    folders above it."""
    import shutil

    from submitit.core import utils

    folder = sweep_dir / ".submitit"
    for submitted in sorted(folder.glob("*/*_submitted.pkl")):
        logs = sorted(submitted.parent.glob("*_log.out")) + sorted(submitted.parent.glob("*_log.err"))
        text = "".join(p.read_text(errors="replace") for p in logs)
        if not text:
            continue
        try:
            num = str(utils.pickle_load(submitted).args[2])
        except Exception:  # noqa: BLE001 - a pickle submitit did not finish writing: name it by its job id
            num = submitted.parent.name
        job = sweep_dir / num
        (job / "console.log" if job.is_dir() else sweep_dir / f"{num}.console.log").write_text(text)
    shutil.rmtree(folder, ignore_errors=True)
    if sweep_dir.is_dir() and {p.name for p in sweep_dir.iterdir()} <= {"multirun.yaml"}:
        from dpl.tracking.params import launch_dir

        (sweep_dir / "multirun.yaml").unlink(missing_ok=True)
        top, d = launch_dir().resolve(), sweep_dir.resolve()
        while d != top and top in d.parents and not any(d.iterdir()):
            d.rmdir()
            d = d.parent


def _one_line_error(e: Optional[BaseException]) -> bool:
    from dpl.errors import RankFailure, user_errors

    return isinstance(e, (*user_errors(), RankFailure, KeyboardInterrupt))


class SlurmLauncher(_DplJobs):
    _EXECUTOR = "slurm"


class LocalLauncher(_DplJobs):
    _EXECUTOR = "local"


@dataclass
class DplLocalQueueConf(LocalQueueConf):
    """``hydra/launcher=local``: the plugin's local keys, and two of the Slurm ones submitit's local
    executor also takes (the plugin's local config leaves them out)."""

    _target_: str = "hydra_plugins.dpl_launchers.slurm.LocalLauncher"
    # Requeues after reaching timeout_min (submitit's local executor signals a job then too).
    max_num_timeout: int = 3
    # Shell lines run before each job starts.
    setup: Optional[List[str]] = None


# The schema of conf/hydra/launcher/local.yaml, in a subgroup so that it is not an option of its own.
ConfigStore.instance().store(group="hydra/launcher/schema", name="local", node=DplLocalQueueConf, provider="dpl")
