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

import contextlib
import errno
import ipaddress
import logging
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import socket
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

from dpl.errors import ConfigError, RankFailure, user_errors
from dpl.comm.process_group import ProcessGroupComm, wait_for_key
from dpl.launch.slurm import ranks_from_scheduler

log = logging.getLogger("dpl")

OnFailure = Callable[[str, str], None]  # on_failure(status, reason): end the job's run (dpl.run.job.salvage)
SETTLE_S = 3.0  # after the first fault, how long a rank that left no report may run on before it is killed
WRITE_S = 10.0  # after the first fault, how long a rank that reported may take to write its history and exit
STOP_S = 10.0  # on the launcher's own signal: how long the ranks get to record KILLED before SIGKILL
Body = Callable[..., Any]  # body(cfg, out_dir, comm) -> result; dpl.run.job.run
STORE_TIMEOUT = timedelta(minutes=10)  # store handshakes (run dir, reports), not collectives
# How a failed collective reads (gloo and NCCL put no common exception type on all of them).
COMM_MARKERS = ("gloo", "nccl", "NCCL", "Connection", "Broken pipe", "timeout", "Timed out", "timed out",
                "pair closure", "ProcessGroup", "c10d")


# ----------------------------------------------------------------------------- torchrun


def under_torchrun() -> bool:
    """True when a launcher set the ``env://`` variables (torchrun does)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


_boot: Optional[tuple[dist.Store, int, int]] = None  # this process's (store, rank, world) under torchrun


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


# ----------------------------------------------------------------------------- launching


def launch(cfg: DictConfig, out_dir: Path, body: Body, on_failure: Optional[OnFailure] = None) -> Any:
    """Run ``body(cfg, out_dir, comm)`` on every rank; return this process's result.

    Under torchrun this process is one rank (``engine.spawn`` is ignored: torchrun started
    the processes, so a spawned job resumes under torchrun too). Otherwise, with
    ``engine.spawn``, it starts the K ranks, waits for them and returns rank 0's result.
    """
    backend_for(cfg)  # a bad backend fails here, before any process starts
    if under_torchrun():
        store, rank, world = torchrun_store()
        return run_rank(body, cfg, out_dir, store, rank, world, int(os.environ.get("LOCAL_RANK", rank)),
                        supervised=False)
    if not cfg.engine.spawn:
        raise ConfigError("engine=distributed needs its processes: launch with torchrun --nproc-per-node=K "
                          "-m dpl engine=distributed ..., or add engine.spawn=true")
    return spawn(body, cfg, out_dir, on_failure)


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


def leave_group() -> None:
    """Destroy the default process group if there is one: a peer blocked in a collective with this
    rank then fails at once, and a group whose collective timed out aborts the interpreter at exit
    unless destroyed."""
    if dist.is_initialized():
        dist.destroy_process_group()


def grace_s(timeout_s: float) -> float:
    """How long a rank whose collective failed waits for the others' reports.

    The healthy ranks see a dead peer at once (its connections close) and a hung one at
    the same timeout, so their reports arrive within moments of each other.
    """
    return min(2.0, max(0.5, timeout_s / 4))


# ----------------------------------------------------------------------------- fault reports


def _report_key(rank: int) -> str:
    return f"dpl/fault/{rank}"


def is_comm_error(e: BaseException) -> bool:
    """A collective failed (a peer died, hung or quit), as opposed to an error of this rank's own."""
    return isinstance(e, dist.DistError) or (isinstance(e, RuntimeError) and any(m in str(e) for m in COMM_MARKERS))


def report_fault(e: BaseException, store: dist.Store, rank: int) -> None:
    """Leave this rank's report at once ("peer" for a failed collective, else its own error), so
    the launcher does not take a rank still writing its history for a hung one; and leave the
    process group, which no collective can use any more, so that a rank blocked on this one
    fails now instead of after this rank's history is written, or after the timeout."""
    try:
        if not isinstance(e, RankFailure):
            store.set(_report_key(rank), "peer" if is_comm_error(e) else f"error: {type(e).__name__}: {_first_line(e)}")
    except Exception:  # the store lived on a rank that is gone
        pass
    leave_group()


def explain(e: BaseException, store: dist.Store, rank: int, world: int, grace: float) -> BaseException:
    """What this rank raises, after :func:`report_fault`: its own error as it is, or a collective
    failure that names the culprits from the reports that arrive within ``grace``."""
    if isinstance(e, RankFailure) or not is_comm_error(e):
        return e
    try:
        reports = _collect_reports(store, world, grace)
    except Exception:  # the store lived on a rank that is gone
        return RankFailure(f"rank {rank}: a collective failed and the store is unreachable: {_first_line(e)}")
    return RankFailure(f"{culprits(reports, world)}; rank {rank} stopped too ({_first_line(e)})")


def _collect_reports(store: dist.Store, world: int, grace: float) -> dict[int, str]:
    """Every rank's report, waiting up to ``grace`` for the missing ones."""
    deadline = time.monotonic() + grace
    reports: dict[int, str] = {}
    while True:
        for r in range(world):
            if r not in reports and store.check([_report_key(r)]):
                reports[r] = store.get(_report_key(r)).decode()
        if len(reports) == world or time.monotonic() >= deadline:
            return reports
        time.sleep(0.05)


def culprits(reports: dict[int, str], world: int, exits: Optional[dict[int, Optional[int]]] = None,
             order: Sequence[int] = ()) -> str:
    """Name the ranks at fault: the first to exit without a "peer" report, those that reported an
    error of their own, and those silent.

    A report "peer" marks a rank that only saw a collective fail: it is never blamed. ``exits``
    (spawn only) are exit codes: None for a process the launcher killed because it was still
    running after the first fault, a negative code for the signal that killed it; ``order`` is
    the order they exited in. A rank killed silent after another rank had died or failed was
    most likely waiting on that one: it is not blamed either; with no such rank, it hung.
    """
    first = next((r for r in order if reports.get(r) != "peer" and (exits or {}).get(r) not in (None, 0)), None)
    parts = [] if first is None else [_fault(first, reports.get(first), exits, "first")]
    for r in range(world):
        report = reports.get(r)
        if r == first or report == "peer":
            continue
        if report is None and exits is not None and (exits.get(r) == 0 or (first is not None and exits.get(r) is None)):
            continue  # finished, or killed while it waited on the first
        text = _fault(r, report, exits)
        if text:
            parts.append(text)
    if first is not None and len(parts) == 1 and reports.get(first) is None:
        parts.append("the other ranks stopped after it")
    return "; ".join(parts) or "every rank saw a collective fail and none reported a cause"


def _fault(r: int, report: Optional[str], exits: Optional[dict[int, Optional[int]]], when: str = "") -> str:
    when = f" {when}" if when else ""
    if report is not None and report.startswith("error: "):
        return f"rank {r} failed: {report[len('error: '):]}"
    if exits is None:
        return f"rank {r} died or hung (it stopped answering)"
    code = exits.get(r)
    if code is None:
        return f"rank {r} hung (no answer within engine.timeout_s; killed it)"
    if code < 0:
        return f"rank {r} died{when} (killed by {_signal_name(-code)})"
    if code != 0:
        return f"rank {r} died{when} (exit status {code})"
    return ""


def _signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]


# ----------------------------------------------------------------------------- spawn


def spawn(body: Body, cfg: DictConfig, out_dir: Path, on_failure: Optional[OnFailure] = None) -> Any:
    """Start K local ranks, watch them, and return rank 0's result (or raise naming the failed rank)."""
    world = int(cfg.K)
    on_failure = on_failure or (lambda status, reason: None)
    store, host = host_store(cfg.engine.master_addr, int(cfg.engine.master_port))
    ctx = multiprocessing.get_context("spawn")  # fork after torch started its threads is unsafe
    pipes = [ctx.Pipe(duplex=False) for _ in range(world)]  # (receive, send): each rank's outcome
    threads = max(1, (os.cpu_count() or 1) // world)
    procs = [ctx.Process(target=_spawned_rank, name=f"dpl-rank-{r}",
                         args=(body, cfg, Path(out_dir), host, store.port, r, world, threads,
                               os.getpid(), pipes[r][1]))
             for r in range(world)]
    outcome: dict[int, tuple[str, Any]] = {}
    order: list[int] = []
    try:
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


def host_store(addr: str, port: int) -> tuple[dist.TCPStore, str]:
    """The launcher's store, listening on ``addr`` alone; and the numeric address the ranks connect to.

    Given a host and port, TCPStore binds ``*:port`` (every interface, whatever ``addr`` says)
    and retries an address it cannot reach for STORE_TIMEOUT; on a socket bound here it
    listens where asked, and a bad address or a busy port is one line at once.
    """
    sock = _listen(addr, port)
    host, bound = sock.getsockname()[:2]
    try:
        store = dist.TCPStore(host, bound, is_master=True, wait_for_workers=False, timeout=STORE_TIMEOUT,
                              master_listen_fd=sock.fileno())
    except BaseException:
        with contextlib.suppress(OSError):  # (unless the store closed it already)
            sock.close()
        raise
    sock.detach()  # the store closes it
    return store, host


def _listen(addr: str, port: int) -> socket.socket:
    """A socket bound to ``addr:port`` (port 0: a free one) and listening; ConfigError if it cannot be."""
    try:
        family, kind, proto, _, where = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as e:
        raise ConfigError(f"engine.master_addr={addr} is invalid: it does not resolve ({e}); allowed an "
                          f"address of this machine, e.g. 127.0.0.1") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as TCPStore: TIME_WAIT is no conflict
        sock.bind(where)
        sock.listen(socket.SOMAXCONN)
    except OSError as e:
        sock.close()
        if e.errno in (errno.EADDRINUSE, errno.EACCES):
            raise ConfigError(f"engine.master_port={port} is invalid: cannot listen on {addr}:{port} "
                              f"({e.strerror}); allowed a free port, or 0 for any free port") from None
        raise ConfigError(f"engine.master_addr={addr} is invalid: cannot listen on {addr}:{port} ({e.strerror}); "
                          f"allowed an address of this machine, e.g. 127.0.0.1") from None
    return sock


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


def overdue(alive: list[int], reports: dict[int, str], since_fault: float) -> list[int]:
    """The ranks still running that have had their time since the first fault (see :func:`_watch`).

    A silent rank gets SETTLE_S, or 1 s once the ranks that reported have all exited: with them
    gone, a healthy rank fails (and reports) the moment it enters a collective.
    """
    settle = min(SETTLE_S, 1.0) if reports and not any(r in reports for r in alive) else SETTLE_S
    return [r for r in alive if since_fault > (WRITE_S if r in reports else settle)]


def _reports(store: dist.Store, world: int) -> dict[int, str]:
    """The fault reports in the store so far (none if the store cannot be read)."""
    reports = {}
    for r in range(world):
        try:
            if store.check([_report_key(r)]):
                reports[r] = store.get(_report_key(r)).decode()
        except Exception:
            pass
    return reports


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
                  threads: int, parent: int, send) -> None:
    """Entry point of a spawned rank: connect to the parent's store, run, send back the result."""
    _exit_with_parent(parent)
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


def gloo_on(addr: str) -> None:
    """Make gloo's listeners (each rank's, for its peers) bind the interface of ``addr``, the store's.

    gloo binds the address the machine's hostname resolves to, on most machines a public one,
    even when ``engine.master_addr`` is 127.0.0.1; ``GLOO_SOCKET_IFNAME`` names the interface
    instead. One the user set is kept; where no interface holds ``addr`` gloo keeps its default.
    """
    if "GLOO_SOCKET_IFNAME" not in os.environ:
        name = interface_of(addr)
        if name is not None:
            os.environ["GLOO_SOCKET_IFNAME"] = name


def interface_of(addr: str) -> Optional[str]:
    """The name of the local network interface that holds ``addr`` (the loopback one for any
    loopback address), or None where none does or it cannot be told (not Linux)."""
    ip = ipaddress.ip_address(addr.split("%")[0])
    for name, held in _interface_addresses().items():
        if ip in held or (ip.is_loopback and any(a.is_loopback for a in held)):
            return name
    return None


def _interface_addresses() -> dict[str, list]:
    """Every interface's addresses, on Linux: IPv4 from SIOCGIFADDR, IPv6 from /proc/net/if_inet6."""
    if not sys.platform.startswith("linux"):
        return {}
    import fcntl
    import struct

    found: dict[str, list] = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        for _, name in socket.if_nameindex():
            try:
                raw = fcntl.ioctl(probe.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))  # SIOCGIFADDR
            except OSError:  # no IPv4 address
                continue
            found.setdefault(name, []).append(ipaddress.ip_address(raw[20:24]))
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/if_inet6").read_text().splitlines():
            fields = line.split()
            found.setdefault(fields[-1], []).append(ipaddress.ip_address(bytes.fromhex(fields[0])))
    return found


def _picklable(e: BaseException) -> BaseException:
    try:
        pickle.dumps(e)
        return e
    except Exception:
        return RuntimeError(f"{type(e).__name__}: {_first_line(e)}")


def _exit_with_parent(parent: int) -> None:
    """A rank whose launcher was killed must not train on alone: it exits when the parent is gone."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="dpl-parent-watch", daemon=True).start()
