"""``python -m dpl``: the Hydra app (docs/configuration.md lists its groups and keys)."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from dpl import timeline
from dpl.config.overrides import check_overrides
from dpl.config.store import register_configs
from dpl.errors import ConfigError, RankFailure, user_errors
from dpl.tracking.run_names import in_multirun

try:  # here, not in cli(): a launcher's job process imports this module to run main()
    register_configs()
except ConfigError as _e:  # a plugin module that cannot be imported (dpl.plugins): one line, as any config error
    print(f"error: {_e}", file=sys.stderr)
    sys.exit(2)

TORCHRUN_ENV = {"RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}  # torchrun's env:// variables


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | str:
    timeline.mark("composed")
    from dpl.tracking.store_process import begin

    begin(cfg.logger)  # MLflow's imports and the store's check, beside torch's import and the build below
    from dpl.launch.torchrun import announce_run_dir
    from dpl.run.interrupt import EXIT_STATUS, resume_hint, signal_name
    from dpl.run.job import job_dir, run

    timeline.mark("imported (torch, the training path)")
    announce_run_dir(job_dir())  # under torchrun: the other ranks write under rank 0's dir
    try:
        result = run(cfg)
    except user_errors() as e:
        remove_refused_job_dir(job_dir())
        msg = e.args[0] if e.args else str(e)
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)
    except RankFailure as e:  # engine=distributed: a rank died, hung or failed
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: the run is marked KILLED and can be resumed
        name = signal_name(e)
        if run_started(job_dir()):
            print(f"error: interrupted by {name}; the run is marked KILLED ({resume_hint(job_dir())})",
                  file=sys.stderr)
        else:  # while the data loaded or the lr was tabulated: no MLflow run, no checkpoint to resume
            remove_refused_job_dir(job_dir())
            print(f"error: interrupted by {name} before the run started; nothing was recorded", file=sys.stderr)
        sys.exit(EXIT_STATUS.get(name, 130))
    if result.get("diverged"):
        if not in_multirun():  # a sweep goes on: its other jobs are still worth running
            print(f"error: diverged: {result.get('error')} (the run is marked FAILED)", file=sys.stderr)
            sys.exit(1)
        # Not a number, so Optuna's sweeper records a FAIL trial ("Return value must be
        # float-castable. Got 'diverged'"); a NaN would crash it, a 0.0 could become "best".
        return "diverged"
    return float(result.get("best_val_acc", math.nan))


def check_output_dirs(argv: list[str]) -> None:
    """Hydra creates the job dir (``outputs/`` under the current directory, or ``hydra.run.dir``;
    ``multirun/`` or ``hydra.sweep.dir`` for ``-m``) before dpl runs, and fails on an unwritable
    one with a traceback: try each where it would be made, in one line, creating nothing."""
    if any(a.startswith(("--help", "-h", "--cfg", "-c", "--info", "--hydra-help")) for a in argv):
        return
    multirun = any(a in ("-m", "--multirun") for a in argv)
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    given = [a.split("=", 1)[1].strip("'\"") for a in argv if a.startswith(key + "=")]
    if given and "${" in given[-1]:  # an interpolation: Hydra resolves it, dpl cannot tell where yet
        return
    target = Path(given[-1]).expanduser() if given else Path.cwd()
    base = target if target.is_absolute() else Path.cwd() / target
    while not base.exists() and base != base.parent:  # the deepest folder that exists
        base = base.parent
    import tempfile

    try:
        if not base.is_dir():
            raise NotADirectoryError(20, "Not a directory")
        with tempfile.TemporaryFile(dir=base):
            pass
    except OSError as e:
        if given:
            raise ConfigError(f"{key}={given[-1]!r} is invalid: cannot create it in {base} "
                              f"({e.strerror})") from None
        raise ConfigError(f"the current directory {os.getcwd()} is not writable ({e.strerror}): run from "
                          f"another directory or set {key}=<dir>") from None


def flags_first(argv: list[str]) -> list[str]:
    """Hydra's flags (``-m``, ``--config-name x``) before the overrides: Hydra's argument parser
    stops reading overrides at the first flag and rejects the rest (``dataset=synthetic -m K=1,2``)."""
    from dpl.config.overrides import override_args

    overrides = override_args(argv)
    flags, rest = [], list(overrides)
    for a in argv:
        if rest and a == rest[0]:
            rest.pop(0)
        else:
            flags.append(a)
    return [*flags, *overrides]


def as_sweep(argv: list[str]) -> list[str]:
    """A ``-m`` command line of ``conf/config.yaml`` (no sweep config) with what makes it a sweep as
    ``--config-name <sweep>`` is one: sweeps/_sweep.yaml's settings and a sweep name
    (:func:`dpl.tracking.sweep.command_line_sweep`). A ``--config-name`` config says its own."""
    from dpl.config.overrides import SWEEPS_DIR, config_name, override_args

    if not any(a in ("-m", "--multirun") for a in argv) or config_name(argv).removesuffix(".yaml") != "config":
        return argv
    from dpl.tracking.sweep import command_line_sweep

    return [*argv, *command_line_sweep(override_args(argv), SWEEPS_DIR / "_sweep.yaml")]


def run_started(job: Path) -> bool:
    """Whether the job dir names an MLflow run: the run file (or a checkpoint) is written when the run is
    created, before it trains."""
    from dpl.run.checkpoint import FILENAME, RUN_FILE

    return (job / RUN_FILE).is_file() or (job / FILENAME).is_file()


def remove_refused_job_dir(job: Path) -> None:
    """A run refused before it trained leaves no trace: the job dir Hydra made for it (``.hydra/``
    and ``dpl.log``, nothing else) is removed, with the empty folders above it up to the launch
    dir (``outputs/<date>/``), and a sweep dir that holds only Hydra's ``multirun.yaml``. A dir
    with anything else in it stays; in a job dir that resume or test_only wrote into, only an
    empty ``dpl.log`` goes (Hydra opened it for the refused run)."""
    from dpl.tracking.params import launch_dir

    made = {".hydra", "dpl.log", ".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml"}
    try:
        job = job.resolve()
        log_file = job / "dpl.log"
        if log_file.is_file() and log_file.stat().st_size == 0:  # opened for this run, nothing logged
            log_file.unlink()
        if not (job / ".hydra").is_dir():  # resume / test_only write into their job (hydra.output_subdir=null)
            return
        if not {str(p.relative_to(job)) for p in job.rglob("*")} <= made:
            return
        for name in sorted(made, reverse=True):  # files before their folder
            p = job / name
            p.rmdir() if p.is_dir() else p.unlink(missing_ok=True)
        job.rmdir()
        top, parent = launch_dir().resolve(), job.parent
        if in_multirun() and {p.name for p in parent.iterdir()} <= {"multirun.yaml"}:
            (parent / "multirun.yaml").unlink(missing_ok=True)
        while parent != top and top in parent.parents and not any(parent.iterdir()):
            parent.rmdir()
            parent = parent.parent
    except OSError:  # cleaning up is a courtesy: the error line matters more
        pass


def cli() -> None:
    import logging

    from dpl.run.interrupt import EXIT_STATUS, catch_sigterm, signal_name

    timeline.mark("imports")
    catch_sigterm()
    # A log file that cannot be written (a full disk) must not print a traceback per record
    # ("--- Logging error ---"): the run's own one-line error says what happened.
    logging.raiseExceptions = False
    if any(a in ("--help", "-h") for a in sys.argv[1:]):  # from the registries: Hydra's takes 9-40 s here
        from dpl.config.help import help_text

        print(help_text())
        return
    try:
        check_overrides(sys.argv[1:])
        check_output_dirs(sys.argv[1:])
        # The command line as Hydra needs it: its flags before the overrides (its parser stops at the
        # first flag), and under torchrun, rank 0's job dir for the other ranks (ranks compose their
        # configs apart, ${now:...} may differ, and the dir must be agreed before Hydra makes one).
        # Everything else, e.g. resume= writing into its own job dir, is in conf/config.yaml's hydra node.
        sys.argv[1:] = flags_first(sys.argv[1:])
        sys.argv[1:] = as_sweep(sys.argv[1:])
        if "SLURM_STEP_ID" in os.environ and "RANK" not in os.environ:  # (dpl.core.engines imports torch: only then)
            from dpl.launch.slurm import export_ranks, in_srun_step

            if in_srun_step():  # srun --ntasks=K: Slurm's ranks, without torchrun
                export_ranks()
        if TORCHRUN_ENV <= os.environ.keys():  # checked here so that plain runs do not import torch yet
            from dpl.launch.torchrun import agree_run_dir

            sys.argv[1:] = agree_run_dir(sys.argv[1:])
        timeline.mark("checked")
        main()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:  # before or after a run (a run handles its own)
        print(f"error: interrupted by {signal_name(e)}", file=sys.stderr)
        sys.exit(EXIT_STATUS.get(signal_name(e), 130))


def exit_without_teardown(code: object = 0) -> None:
    """End a ``python -m dpl`` process that is done as Python would, less its teardown: the other threads
    joined, the ``atexit`` handlers run (logging's, MLflow's, ...), the streams flushed, then ``os._exit``
    with ``code`` as ``sys.exit(code)`` would give it (a text is printed, status 1). Freeing
    torch's, torch._dynamo's and MLflow's modules one by one takes 1-4 s on a 2-core machine (measured:
    ``python -c 'import torch, torch._dynamo, mlflow'`` 6.1-9.3 s, 5.1 s so), for every process of a sweep.
    ``DPL_NO_FAST_EXIT=1``: an embedding process that goes on (a test running the command in itself)."""
    import atexit
    import threading

    if os.environ.get("DPL_NO_FAST_EXIT") == "1":
        sys.exit(code)
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    for thread in threading.enumerate():  # as Python's own shutdown waits for them
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing more can be said
            pass
    os._exit(code or 0)


if __name__ == "__main__":
    try:
        cli()
    except SystemExit as e:  # an error's status (a refused command, a failed rank): its teardown saved too
        exit_without_teardown(e.code)
    exit_without_teardown()
