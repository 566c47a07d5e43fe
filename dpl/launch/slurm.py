"""The ranks of ``engine=distributed`` from a scheduler's job, without torchrun.

Under ``srun`` (``srun --ntasks=K python -m dpl engine=distributed K=K ...``) or a job of
``hydra/launcher=slurm`` with ``tasks_per_node`` × ``nodes`` = K, every task is one rank.
Slurm says which in its variables (``SLURM_PROCID``, ``SLURM_LOCALID``, the job's node list);
:func:`export_ranks` turns them into the ``env://`` variables torch.distributed reads
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), reading them
through submitit's job environments, which parse Slurm's compressed node lists
(``node[01-04]``); the master port is a function of the job id, so every task agrees on it
without talking. From there a rank runs as under torchrun
(:mod:`dpl.launch.ranks`), except that no agent hosts the store: rank 0 hosts it, listening
on the master's address alone.
"""

from __future__ import annotations

import os
import zlib
from typing import Any

# Set by export_ranks: the env:// variables came from the scheduler, and no torchrun agent serves a store.
RANKS_FROM_ENV = "DPL_RANKS_FROM"
ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _step_tasks() -> int:
    """The tasks of this srun step (the allocation's SLURM_NTASKS where Slurm did not say)."""
    return int(os.environ.get("SLURM_STEP_NUM_TASKS", os.environ.get("SLURM_NTASKS", "1")))


def in_srun_step() -> bool:
    """A task of an ``srun`` step of more than one task (a batch script itself has no step id:
    ``python -m dpl`` run there directly is one process, not rank 0 of the allocation)."""
    return ("SLURM_JOB_ID" in os.environ and "SLURM_STEP_ID" in os.environ and "SLURM_PROCID" in os.environ
            and _step_tasks() > 1)


def export_ranks(job_env: Any = None) -> dict[str, str]:
    """Set this task's ``env://`` variables from its scheduler job, and return them.

    ``job_env``: a submitit job environment (``submitit.JobEnvironment()`` in a job the launcher
    submitted: Slurm's, or the local executor's emulation of it); by default Slurm's own variables,
    as ``srun`` sets them. The master is the job's first node; its port is ``MASTER_PORT`` where the
    user set one, else a function of the job id (20000-59999), which every task computes alike."""
    if job_env is None:
        from submitit.slurm.slurm import SlurmJobEnvironment

        job_env = SlurmJobEnvironment()
        world = _step_tasks()  # the srun step's tasks, not the whole allocation's
    else:
        world = job_env.num_tasks
    nodes = max(1, job_env.num_nodes)
    port = os.environ.get("MASTER_PORT") or str(20000 + zlib.crc32(str(job_env.job_id).encode()) % 40000)
    values = {"RANK": job_env.global_rank, "WORLD_SIZE": world, "LOCAL_RANK": job_env.local_rank,
              "LOCAL_WORLD_SIZE": world // nodes, "MASTER_ADDR": job_env.hostnames[0], "MASTER_PORT": port}
    for key, value in values.items():
        os.environ[key] = str(value)
    os.environ[RANKS_FROM_ENV] = job_env.name()
    return {k: os.environ[k] for k in ENV_KEYS}


def ranks_from_scheduler() -> bool:
    return bool(os.environ.get(RANKS_FROM_ENV))
