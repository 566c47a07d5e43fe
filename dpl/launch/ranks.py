"""Starting the K processes of ``engine=distributed``, and ending all of them when one fails.

Two launchers, one process per rank either way:

- **torchrun** (``torchrun --nproc-per-node=K -m dpl engine=distributed K=K ...``): every
  rank runs ``python -m dpl`` and so Hydra. Before Hydra starts, :func:`agree_run_dir`
  meets the other ranks on torchrun's store (the ``env://`` rendezvous) and hands ranks
  1..K-1 rank 0's output dir, so one job has one dir and only rank 0 writes there.
- **spawn** (``engine.spawn=true``): the Hydra job starts K processes itself and
  supervises them; it hosts their store, so the store outlives any rank. The store and
  gloo's connections between the ranks listen on ``engine.master_addr`` alone.

Faults: the process group's timeout is ``engine.timeout_s``, so a collective with a
dead or hung peer fails on the healthy ranks instead of waiting forever. Each rank
that fails leaves a report in the store at once ("its peer failed" or its own error)
and leaves the process group, so that a rank waiting on it fails at once too; the
ranks that left none are the ones that died or hung, and the error names them. With
spawn the parent also sees exit codes and the order of the exits: it names the first
rank that exited without a "peer" report, with its exit status or signal. From the
first fault on it gives a silent rank SETTLE_S to report and a rank that reported
WRITE_S to finish writing (rank 0 writes the history and plots), then kills what is
left. It then ends the MLflow run itself (``on_failure``), so a rank 0 that died cannot
leave it RUNNING; Ctrl-C and SIGTERM on the launcher stop the ranks (SIGTERM, then
SIGKILL) and end the run KILLED.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import sys
import threading
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
from omegaconf import DictConfig

from dpl.comm.process_group import ProcessGroupComm
from dpl.core.engines import LAUNCH_JOBS_ENV, concurrent_jobs, torch_threads
from dpl.errors import ConfigError, RankFailure, user_errors
from dpl.launch.faults import (
    _first_line,
    _picklable,
    _reports,
    culprits,
    explain,
    grace_s,
    is_comm_error,
    leave_group,
    overdue,
    report_fault,
)
from dpl.launch.network import STORE_TIMEOUT, gloo_on, host_store
from dpl.launch.slurm import ranks_from_scheduler
from dpl.launch.torchrun import torchrun_store, under_torchrun
from dpl.tracking.run_names import Naming, carry_naming, job_naming

log = logging.getLogger("dpl")

OnFailure = Callable[[str, str], None]  # on_failure(status, reason): end the job's run (dpl.run.job.salvage)
STOP_S = 10.0  # on the launcher's own signal: how long the ranks get to record KILLED before SIGKILL
Body = Callable[..., Any]  # body(cfg, out_dir, comm) -> result; dpl.run.job.run


# ----------------------------------------------------------------------------- torchrun




# ----------------------------------------------------------------------------- launching


def launch(cfg: DictConfig, out_dir: Path, body: Body, on_failure: Optional[OnFailure] = None) -> Any:
    """Run ``body(cfg, out_dir, comm)`` on every rank; return this process's result.

    Under torchrun this process is one rank (``engine.spawn`` is ignored: torchrun started
    the processes, so a spawned job resumes under torchrun too). Otherwise, with
    ``engine.spawn``, it starts the K ranks, waits for them and returns rank 0's result.
    """
    backend_for(cfg)  # a bad backend fails here, before any process starts
    # What names the run, read here in the Hydra job's process and handed to the ranks, so that every
    # path names it from the command line's overrides as the simulation does (a spawned rank has no Hydra).
    naming = job_naming(cfg)
    if under_torchrun():  # this process is a rank, and the Hydra job of its own copy of the command line
        carry_naming(naming)
        store, rank, world = torchrun_store()
        return run_rank(body, cfg, out_dir, store, rank, world, int(os.environ.get("LOCAL_RANK", rank)),
                        supervised=False)
    if not cfg.engine.spawn:
        raise ConfigError("engine=distributed needs its processes: launch with torchrun --nproc-per-node=K "
                          "-m dpl engine=distributed ..., or add engine.spawn=true")
    return spawn(body, cfg, out_dir, on_failure, naming)


def backend_for(cfg: DictConfig) -> str:
    """The collective backend: ``auto`` is NCCL on CUDA, gloo on CPU; NCCL needs CUDA."""
    from dpl.core.engines import pick_device

    device = pick_device(cfg.device)
    backend = cfg.engine.backend
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise ConfigError(f"engine.backend='nccl' is invalid on device {device.type}: allowed gloo, or device=cuda")
    return backend


def rank_device(cfg: DictConfig, local_rank: int) -> torch.device:
    """CUDA: this rank's own GPU (the local rank's among those visible); CPU otherwise."""
    from dpl.core.engines import pick_device

    device = pick_device(cfg.device)
    if device.type == "cuda":
        # Modulo the visible GPUs: a scheduler that gives each task its own (srun --gpus-per-task=1,
        # CUDA_VISIBLE_DEVICES per task) leaves every rank one GPU, its cuda:0.
        device = torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
        torch.cuda.set_device(device)
    return device


def run_rank(body: Body, cfg: DictConfig, out_dir: Path, store: dist.Store, rank: int, world: int,
             local_rank: int, supervised: bool = True) -> Any:
    """Join the process group as ``rank`` and run ``body``; a failure names the rank at fault.

    ``supervised``: spawn's launcher names the culprits from the reports and exit codes
    itself, so a rank does not wait for the others' reports to word its own error.
    """
    timeout = float(cfg.engine.timeout_s)
    if cfg.K != world:
        meet(store, f"dpl/world_mismatch/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", world, timeout)
        tasks = " (the Slurm job's tasks: nodes x tasks_per_node, or srun --ntasks)" if ranks_from_scheduler() else ""
        raise ConfigError(f"K={cfg.K} is invalid: engine=distributed runs K = world size = {world} workers{tasks}")
    backend, device = backend_for(cfg), rank_device(cfg, local_rank)
    try:
        dist.init_process_group(backend, store=dist.PrefixStore("dpl/pg", store), rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout))
        return body(cfg, out_dir, ProcessGroupComm(store, device))
    except BaseException as e:
        report_fault(e, store, rank)  # (again, if body reported already: the same report)
        failure = explain(e, store, rank, world, 0.0 if supervised else grace_s(timeout))
        if failure is e:
            raise
        raise failure from e
    finally:
        leave_group()


def meet(store: dist.Store, key: str, world: int, timeout_s: float) -> None:
    """Wait until every rank has called ``meet`` with ``key`` (at most ``timeout_s``).

    An error that every rank finds alike (K other than the world size) is raised by all of
    them after meeting here: under torchrun the first rank to exit makes the agent SIGTERM
    the others, which would then say "interrupted" instead of the error.
    """
    deadline = time.monotonic() + timeout_s
    try:
        arrived = store.add(key, 1)
        while arrived < world and time.monotonic() < deadline:
            time.sleep(0.05)
            arrived = store.add(key, 0)
    except Exception:  # the store lived on a rank that met the others and is gone
        pass


# ----------------------------------------------------------------------------- fault reports


# ----------------------------------------------------------------------------- spawn


def spawn(body: Body, cfg: DictConfig, out_dir: Path, on_failure: Optional[OnFailure] = None,
          naming: Optional[Naming] = None) -> Any:
    """Start K local ranks, watch them, and return rank 0's result (or raise naming the failed rank).
    ``naming`` names the run in the ranks (default: :func:`job_naming` here, in the launching process)."""
    world = int(cfg.K)
    naming = naming or job_naming(cfg)
    on_failure = on_failure or (lambda status, reason: None)
    store, host = host_store(cfg.engine.master_addr, int(cfg.engine.master_port))
    ctx = multiprocessing.get_context("spawn")  # fork after torch started its threads is unsafe
    pipes = [ctx.Pipe(duplex=False) for _ in range(world)]  # (receive, send): each rank's outcome
    threads = torch_threads(cfg)  # engine.threads: auto shares the cores among the K ranks (and a sweep's jobs)
    os.environ.setdefault(LAUNCH_JOBS_ENV, str(concurrent_jobs()))  # the ranks have no Hydra config to read it from
    procs = [ctx.Process(target=_spawned_rank, name=f"dpl-rank-{r}",
                         args=(body, cfg, Path(out_dir), host, store.port, r, world, threads,
                               os.getpid(), pipes[r][1], naming))
             for r in range(world)]
    outcome: dict[int, tuple[str, Any]] = {}
    order: list[int] = []
    ended = threading.Event()
    try:
        threading.Thread(target=_warm_salvage, args=(cfg, Path(out_dir), ended), name="dpl-warm-salvage",
                         daemon=True).start()  # while the ranks start: they take seconds too
        for r, p in enumerate(procs):
            p.start()
            pipes[r][1].close()  # the child holds the sending end now
            log.info("engine=distributed: rank %d is pid %d", r, p.pid)
        exits = _watch(procs, [recv for recv, _ in pipes], outcome, store, order)
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM on the launcher: stop the ranks, end the run KILLED
        from dpl.run.interrupt import signal_name

        _stop(procs)
        on_failure("KILLED", f"the launcher was interrupted by {signal_name(e)}")
        raise
    finally:
        ended.set()
        for p in procs:
            if p.pid is not None and p.is_alive():
                p.kill()  # also ends a stopped (SIGSTOP) process
            if p.pid is not None:
                p.join()
    if any(code != 0 for code in exits.values()):
        try:
            _raise_failure(exits, outcome, store, world, order)
        except RankFailure as e:  # (a user error is the same on every rank and came before any run)
            on_failure("FAILED", _first_line(e))
            raise
    return outcome[0][1]


def _warm_salvage(cfg: DictConfig, out_dir: Path, ended: threading.Event) -> None:
    """Load what ``on_failure`` needs while the ranks train, so that a dead rank ends the job within seconds:
    on 2 loaded cores, importing MLflow and opening its store took 4-7 s of the launcher's salvage, all after
    the fault. The store is opened once rank 0 made it (its run file exists), and MLflow keeps it open for
    the salvage; ``ended`` (the ranks ended) stops the wait. Best effort: a failure here is the salvage's to
    report."""
    try:
        from dpl.tracking.loggers import LOGGERS

        if not LOGGERS.facts(cfg.logger).store:
            return
        import mlflow.tracking  # noqa: F401

        from dpl.run.checkpoint import RUN_FILE
        from dpl.tracking.store import open_store

        while not (out_dir / RUN_FILE).is_file():
            if ended.wait(0.5):  # the ranks ended before rank 0 made its run
                return
        uri = json.loads((out_dir / RUN_FILE).read_text()).get("tracking_uri")
        if uri and not ended.is_set():
            open_store(uri, timeout_s=5)
    except Exception:  # noqa: BLE001
        pass


def _stop(procs: list) -> None:
    """SIGTERM every rank (rank 0 records KILLED and writes its history), SIGKILL what is left after STOP_S."""
    for p in procs:
        if p.pid is not None and p.is_alive():
            p.terminate()
    deadline = time.monotonic() + STOP_S
    for p in procs:
        if p.pid is not None:
            p.join(max(0.0, deadline - time.monotonic()))


def _watch(procs: list, pipes: list, outcome: dict, store: dist.Store,
           order: Optional[list] = None) -> dict[int, Optional[int]]:
    """Exit codes once every rank ended; None for a rank killed here because it ran on after a fault.

    The first fault is the first rank to exit non-zero or to leave a report. The healthy
    ranks see it within moments: a dead peer's connections close at once, a hung one fails
    their collectives at the timeout they share, and each rank that fails reports and
    leaves the group at once, so the ranks waiting on it fail too. A rank still silent
    SETTLE_S after the fault is hung, or stuck waiting on the faulty one; a rank that
    reported is writing its history and gets WRITE_S (``on_failure`` writes the history
    and plots again from the checkpoint, for a rank 0 killed meanwhile). Outcomes are read
    from ``pipes`` as they arrive (a rank blocked on a full pipe would never exit); ``order``
    receives the ranks in the order they were seen to exit by themselves.
    """
    order = [] if order is None else order
    killed: set[int] = set()
    fault_at = None
    while True:
        for r, p in enumerate(procs):
            if p.exitcode is not None and r not in order and r not in killed:
                order.append(r)
        alive = [r for r, p in enumerate(procs) if p.exitcode is None]
        _read_outcomes(pipes, outcome)  # after the liveness check: an exited rank's outcome is in its pipe
        if not alive:
            break
        reports = _reports(store, len(procs))
        if fault_at is None and (reports or any(p.exitcode not in (None, 0) for p in procs)):
            fault_at = time.monotonic()
        if fault_at is not None:
            for r in overdue(alive, reports, time.monotonic() - fault_at):
                if r not in killed:
                    procs[r].kill()  # also ends a stopped (SIGSTOP) process
                    killed.add(r)
        multiprocessing.connection.wait([procs[r].sentinel for r in alive] +
                                        [recv for r, recv in enumerate(pipes) if r not in outcome],
                                        timeout=0.5 if fault_at is None else 0.1)
    return {r: None if r in killed else p.exitcode for r, p in enumerate(procs)}


def _read_outcomes(pipes: list, outcome: dict) -> None:
    for r, recv in enumerate(pipes):
        if r not in outcome and recv.poll():
            try:
                outcome[r] = pickle.loads(recv.recv_bytes())
            except EOFError:  # the rank ended without sending anything
                outcome[r] = ("died", None)


def _raise_failure(exits: dict[int, Optional[int]], outcome: dict, store: dist.Store, world: int,
                   order: Sequence[int] = ()) -> None:

    errors = [v for r, (kind, v) in sorted(outcome.items()) if kind == "error"]
    for e in errors:  # a config, checkpoint or data error is the same on every rank: report it as such
        if isinstance(e, user_errors()):
            raise e
    raise RankFailure(culprits(_reports(store, world), world, exits, order))


def _spawned_rank(body: Body, cfg: DictConfig, out_dir: Path, addr: str, port: int, rank: int, world: int,
                  threads: int, parent: int, send, naming: Optional[Naming] = None) -> None:
    """Entry point of a spawned rank: connect to the parent's store, run, send back the result."""
    _exit_with_parent(parent)
    carry_naming(naming)  # no Hydra here: the run is named by the launching process's overrides
    from tqdm import tqdm

    from dpl.run.interrupt import catch_sigterm

    # Ctrl-C reaches every process of the terminal: the launcher alone handles it (it sends
    # the ranks SIGTERM), so that the ranks stop once, in order, without a traceback each.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    catch_sigterm()

    # tqdm's default lock is a multiprocessing semaphore that a killed rank leaves behind
    # (and the launcher then warns about); a rank's bars only need a thread lock.
    tqdm.set_lock(threading.RLock())
    if "OMP_NUM_THREADS" not in os.environ:  # K processes share the cores
        torch.set_num_threads(threads)
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[rank {rank}][%(name)s][%(levelname)s] - %(message)s")
    gloo_on(addr)
    store = dist.TCPStore(addr, port, is_master=False, timeout=STORE_TIMEOUT)
    try:
        result = run_rank(body, cfg, out_dir, store, rank, world, local_rank=rank)
    except BaseException as e:
    
        # The launcher reports a user error, a rank failure or its own signal in one line;
        # only an unexpected crash prints its traceback here.
        if not isinstance(e, (RankFailure, KeyboardInterrupt, *user_errors())) and not is_comm_error(e):
            traceback.print_exc()
        send.send_bytes(pickle.dumps(("error", _picklable(e))))
        sys.stderr.flush()
        os._exit(1)
    # plain pickle: torch's multiprocessing pickler would share tensors through this process's
    # memory, which is gone once it exits
    send.send_bytes(pickle.dumps(("result", result if rank == 0 else None)))
    # Done: leave without the interpreter's teardown, where the C++ threads of gloo and the store
    # can abort a finished rank ("terminate called without an active exception", SIGABRT; seen once
    # in CI after the resumed job had ended) and turn a finished job into a failed one.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _exit_with_parent(parent: int) -> None:
    """A rank whose launcher was killed must not train on alone: it exits when the parent is gone."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="dpl-parent-watch", daemon=True).start()
