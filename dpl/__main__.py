"""``python -m dpl``: the Hydra app. See README.md for the config groups."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from dpl.config import ConfigError, register_configs
from dpl.preflight import check_overrides

register_configs()

TORCHRUN_ENV = {"RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}  # torchrun's env:// variables
# The sweep configs, found wherever the command runs (like conf/, found relative to this file).
SWEEPS_DIR = Path(__file__).resolve().parent.parent / "sweeps"


def with_sweeps_dir(argv: list[str]) -> list[str]:
    """``argv`` with ``--config-dir <sweeps>`` added unless one is given: ``--config-name optuna_lr``
    then works from any directory, and a user's own ``--config-dir`` still wins."""
    given = any(a in ("--config-dir", "-cd") or a.startswith("--config-dir=") for a in argv)
    return argv if given or not SWEEPS_DIR.is_dir() else [*argv, "--config-dir", str(SWEEPS_DIR)]


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors that are the user's to fix: reported in one line, exit status 2."""
    from dpl.checkpoint import CheckpointError
    from dpl.data import DatasetUnavailable

    return ConfigError, CheckpointError, DatasetUnavailable


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    from dpl.app import job_dir, run
    from dpl.engine.launch import RankFailure, announce_run_dir

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
    return float(result.get("best_val_acc", 0.0))


def cli() -> None:
    try:
        check_overrides(sys.argv[1:])
        if TORCHRUN_ENV <= os.environ.keys():  # checked here so that plain runs do not import torch yet
            from dpl.engine.launch import agree_run_dir

            sys.argv[1:] = agree_run_dir(sys.argv[1:])
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.argv[1:] = with_sweeps_dir(sys.argv[1:])
    main()


if __name__ == "__main__":
    cli()
