"""``python -m dpl``: the Hydra app. See README.md for the config groups."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from dpl.config import register_configs
from dpl.errors import ConfigError, RankFailure, user_errors
from dpl.preflight import SWEEPS_DIR, check_overrides

register_configs()

TORCHRUN_ENV = {"RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}  # torchrun's env:// variables


def with_sweeps_dir(argv: list[str]) -> list[str]:
    """``argv`` with ``--config-dir <sweeps>`` added unless one is given: ``--config-name optuna_lr``
    then works from any directory, and a user's own ``--config-dir`` still wins."""
    given = any(a in ("--config-dir", "-cd") or a.startswith("--config-dir=") for a in argv)
    return argv if given or not SWEEPS_DIR.is_dir() else [*argv, "--config-dir", str(SWEEPS_DIR)]


def _multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | str:
    from dpl.app import job_dir, run
    from dpl.engine.launch import announce_run_dir
    from dpl.interrupt import EXIT_STATUS, signal_name

    announce_run_dir(job_dir())  # under torchrun: the other ranks write under rank 0's dir
    try:
        result = run(cfg)
    except user_errors() as e:
        msg = e.args[0] if e.args else str(e)
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)
    except RankFailure as e:  # engine=distributed: a rank died, hung or failed
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: the run is marked KILLED and can be resumed
        name = signal_name(e)
        print(f"error: interrupted by {name}; the run is marked KILLED (resume with resume=<job dir>)",
              file=sys.stderr)
        sys.exit(EXIT_STATUS.get(name, 130))
    if result.get("diverged"):
        if not _multirun():  # a sweep goes on: its other jobs are still worth running
            print(f"error: diverged: {result.get('error')} (the run is marked FAILED)", file=sys.stderr)
            sys.exit(1)
        # Not a number, so Optuna's sweeper records a FAIL trial ("Return value must be
        # float-castable. Got 'diverged'"); a NaN would crash it, a 0.0 could become "best".
        return "diverged"
    return float(result.get("best_val_acc", math.nan))


def _into_job_dir(argv: list[str]) -> list[str]:
    """``resume=`` and ``test_only=`` write into the job they continue or evaluate, not into a new,
    empty job dir; Hydra's ``.hydra/`` of the original run is kept as it was."""
    if any(a.startswith(("hydra.run.dir=", "-m", "--multirun")) for a in argv):
        return argv
    values = dict(a.split("=", 1) for a in argv if "=" in a and not a.startswith("-"))
    testing = values.get("test_only", "").lower() == "true"
    target = values.get("resume") or (values.get("checkpoint") if testing else None)
    if not target or target == "null":
        return argv
    path = Path(target.strip("'\"")).expanduser().resolve()
    job = path if path.is_dir() else path.parent
    if not job.is_dir():
        return argv  # run() reports the missing checkpoint in one line
    quoted = str(job).replace("\\", "\\\\").replace("'", "\\'")
    return [*argv, f"hydra.run.dir='{quoted}'", "hydra.output_subdir=null"]


def _check_cwd(argv: list[str]) -> None:
    """Hydra writes ``outputs/`` under the current directory: fail in one line if it cannot."""
    if any(a.startswith(("hydra.run.dir=", "hydra.sweep.dir=", "--help", "-h", "--cfg", "-c", "--info"))
           for a in argv):
        return
    import tempfile

    try:
        with tempfile.TemporaryFile(dir=os.getcwd()):
            pass
    except OSError as e:
        raise ConfigError(f"the current directory {os.getcwd()} is not writable ({e.strerror}): run from "
                          f"another directory or set hydra.run.dir=<dir>") from None


def cli() -> None:
    from dpl.interrupt import EXIT_STATUS, catch_sigterm, signal_name

    catch_sigterm()
    try:
        check_overrides(sys.argv[1:])
        _check_cwd(sys.argv[1:])
        if TORCHRUN_ENV <= os.environ.keys():  # checked here so that plain runs do not import torch yet
            from dpl.engine.launch import agree_run_dir

            sys.argv[1:] = agree_run_dir(sys.argv[1:])
        else:
            sys.argv[1:] = _into_job_dir(sys.argv[1:])
        sys.argv[1:] = with_sweeps_dir(sys.argv[1:])  # sweep configs by name, from any directory
        main()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:  # before or after a run (a run handles its own)
        print(f"error: interrupted by {signal_name(e)}", file=sys.stderr)
        sys.exit(EXIT_STATUS.get(signal_name(e), 130))


if __name__ == "__main__":
    cli()
