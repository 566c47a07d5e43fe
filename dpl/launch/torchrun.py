"""torchrun's (and Slurm's) ranks: the store they meet on, and one job dir for all of them (rank 0's),
agreed before Hydra makes one."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

import torch.distributed as dist

from dpl.comm.process_group import wait_for_key
from dpl.errors import ConfigError
from dpl.launch.faults import _first_line
from dpl.launch.network import STORE_TIMEOUT, host_store
from dpl.launch.slurm import ranks_from_scheduler

log = logging.getLogger("dpl")

_boot: Optional[tuple[dist.Store, int, int]] = None  # this process's (store, rank, world) under torchrun


def under_torchrun() -> bool:
    """True when a launcher set the ``env://`` variables (torchrun does)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def torchrun_store() -> tuple[dist.Store, int, int]:
    """The store of torchrun's rendezvous (its agent's, when it serves one), made once per process.

    A store that cannot be hosted or reached (a busy or wrong MASTER_PORT) is one line: it is
    the user's launch command to fix, not a traceback of this rank's.
    """
    global _boot
    if _boot is None and ranks_from_scheduler():
        _boot = _scheduler_store()
    if _boot is None:
        try:
            _boot = next(dist.rendezvous("env://", timeout=STORE_TIMEOUT))
        except (RuntimeError, OSError, ValueError) as e:
            where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
            raise ConfigError(f"MASTER_ADDR:MASTER_PORT={where} is invalid: rank {os.environ.get('RANK')} cannot "
                              f"host or reach the rendezvous store there ({_first_line(e)[:160]}); allowed a "
                              f"free port on the master, reachable from every node (torchrun --master-port, "
                              f"--rdzv-endpoint)") from None
    return _boot


def _scheduler_store() -> tuple[dist.Store, int, int]:
    """Ranks from Slurm (:mod:`dpl.launch.slurm`): no agent serves a store, so rank 0 hosts it on
    MASTER_ADDR:MASTER_PORT alone (TCPStore on its own would listen on every interface) and the
    other ranks connect to it, retrying until rank 0 is up."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    if rank == 0:
        try:
            store, _ = host_store(addr, port)
        except ConfigError as e:  # worded for engine.master_*; here the addresses are Slurm's
            detail = str(e).split("is invalid: ", 1)[-1].split("; allowed")[0]  # "cannot listen on ... (why)"
            raise ConfigError(f"MASTER_ADDR:MASTER_PORT={addr}:{port} is invalid for rank 0's store: {detail}; "
                              f"allowed the job's first node and a free port there (export MASTER_PORT=<port>)") from None
        return store, rank, world
    try:
        store = dist.TCPStore(addr, port, world_size=world, is_master=False, timeout=STORE_TIMEOUT)
    except (RuntimeError, OSError, ValueError) as e:
        raise ConfigError(f"MASTER_ADDR:MASTER_PORT={addr}:{port} is invalid: rank {rank} cannot reach rank 0's "
                          f"store there within {STORE_TIMEOUT.total_seconds():.0f} s ({_first_line(e)[:160]})") from None
    return store, rank, world


def _run_dir_key() -> str:
    return f"dpl/run_dir/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"


def agree_run_dir(argv: list[str]) -> list[str]:
    """Under torchrun, the command line of this rank: ranks > 0 get rank 0's output dir.

    Each rank composes its own config, and ``${now:...}`` in ``hydra.run.dir`` may differ
    between them; ranks > 0 therefore wait for rank 0 to announce its dir
    (:func:`announce_run_dir`) and run there without Hydra's ``.hydra/`` copy or log file.
    The wait is in short slices: a rank 0 that fails first makes torchrun's agent SIGTERM
    the others, and one long wait in the store would hold that signal off until it ends.
    """
    if not under_torchrun():
        return argv
    if any(a in ("-m", "--multirun") for a in argv):
        raise ConfigError("--multirun is invalid under torchrun: sweep with engine.spawn=true instead")
    store, rank, _ = torchrun_store()
    if rank == 0:
        return argv
    if not wait_for_key(store, _run_dir_key(), STORE_TIMEOUT.total_seconds()):
        raise ConfigError(f"rank {rank}: rank 0 did not start the job within {STORE_TIMEOUT.total_seconds():.0f} s "
                          f"(its own error says why)")
    run_dir = store.get(_run_dir_key()).decode()
    quoted = run_dir.replace("\\", "\\\\").replace("'", "\\'")
    return [*argv, f"hydra.run.dir='{quoted}'", "hydra.output_subdir=null", "hydra/job_logging=disabled"]


def announce_run_dir(run_dir: str | Path) -> None:
    """Rank 0 under torchrun: tell the other ranks where this job writes."""
    if under_torchrun():
        store, rank, _ = torchrun_store()
        if rank == 0:
            store.set(_run_dir_key(), str(Path(run_dir).resolve()))
