"""Starting the K processes of ``engine=distributed``, and ending all of them when one fails.

Two launchers, one process per rank either way:

- **torchrun** (``torchrun --nproc-per-node=K -m dpl engine=distributed K=K ...``): every
  rank runs ``python -m dpl`` and so Hydra. Before Hydra starts, :func:`agree_run_dir`
  meets the other ranks on torchrun's store (the ``env://`` rendezvous) and hands ranks
  1..K-1 rank 0's output dir, so one job has one dir and only rank 0 writes there.
- **spawn** (``engine.spawn=true``): the Hydra job starts K processes itself and
  supervises them; it hosts their store, so the store outlives any rank.

Faults: the process group's timeout is ``engine.timeout_s``, so a collective with a
dead or hung peer fails on the healthy ranks instead of waiting forever. Each rank
that fails leaves a report in the store ("its peer failed" or its own error); the
ranks that left none are the ones that died or hung, and the error names them. With
spawn the parent also sees exit codes and kills what is left.
"""

from __future__ import annotations

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
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from omegaconf import DictConfig

from dpl.config import ConfigError
from dpl.engine.distributed import ProcessGroupComm

log = logging.getLogger("dpl")

Body = Callable[..., Any]  # body(cfg, out_dir, comm) -> result; dpl.app.run
STORE_TIMEOUT = timedelta(minutes=10)  # store handshakes (run dir, reports), not collectives
# How a failed collective reads (gloo and NCCL put no common exception type on all of them).
COMM_MARKERS = ("gloo", "nccl", "NCCL", "Connection", "Broken pipe", "timeout", "Timed out", "timed out",
                "pair closure", "ProcessGroup", "c10d")


class RankFailure(RuntimeError):
    """A rank died, hung or failed, and the job stopped; the one-line message names the rank."""


# ----------------------------------------------------------------------------- torchrun


def under_torchrun() -> bool:
    """True when a launcher set the ``env://`` variables (torchrun does)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


_boot: Optional[tuple[dist.Store, int, int]] = None  # this process's (store, rank, world) under torchrun


def torchrun_store() -> tuple[dist.Store, int, int]:
    """The store of torchrun's rendezvous (its agent's, when it serves one), made once per process."""
    global _boot
    if _boot is None:
        _boot = next(dist.rendezvous("env://", timeout=STORE_TIMEOUT))
    return _boot


def _run_dir_key() -> str:
    return f"dpl/run_dir/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"


def agree_run_dir(argv: list[str]) -> list[str]:
    """Under torchrun, the command line of this rank: ranks > 0 get rank 0's output dir.

    Each rank composes its own config, and ``${now:...}`` in ``hydra.run.dir`` may differ
    between them; ranks > 0 therefore wait for rank 0 to announce its dir
    (:func:`announce_run_dir`) and run there without Hydra's ``.hydra/`` copy or log file.
    """
    if not under_torchrun():
        return argv
    if any(a in ("-m", "--multirun") for a in argv):
        raise ConfigError("--multirun is invalid under torchrun: sweep with engine.spawn=true instead")
    store, rank, _ = torchrun_store()
    if rank == 0:
        return argv
    store.wait([_run_dir_key()], STORE_TIMEOUT)
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


def launch(cfg: DictConfig, out_dir: Path, body: Body) -> Any:
    """Run ``body(cfg, out_dir, comm)`` on every rank; return this process's result.

    Under torchrun this process is one rank (``engine.spawn`` is ignored: torchrun started
    the processes, so a spawned job resumes under torchrun too). Otherwise, with
    ``engine.spawn``, it starts the K ranks, waits for them and returns rank 0's result.
    """
    backend_for(cfg)  # a bad backend fails here, before any process starts
    if under_torchrun():
        store, rank, world = torchrun_store()
        return run_rank(body, cfg, out_dir, store, rank, world, int(os.environ.get("LOCAL_RANK", rank)))
    if not cfg.engine.spawn:
        raise ConfigError("engine=distributed needs its processes: launch with torchrun --nproc-per-node=K "
                          "-m dpl engine=distributed ..., or add engine.spawn=true")
    return spawn(body, cfg, out_dir)


def backend_for(cfg: DictConfig) -> str:
    """The collective backend: ``auto`` is NCCL on CUDA, gloo on CPU; NCCL needs CUDA."""
    from dpl.app import pick_device

    device = pick_device(cfg.device)
    backend = cfg.engine.backend
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise ConfigError(f"engine.backend='nccl' is invalid on device {device.type}: allowed gloo, or device=cuda")
    return backend


def rank_device(cfg: DictConfig, local_rank: int) -> torch.device:
    """CUDA: this rank's own GPU (the local rank's); CPU otherwise."""
    from dpl.app import pick_device

    device = pick_device(cfg.device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return device


def run_rank(body: Body, cfg: DictConfig, out_dir: Path, store: dist.Store, rank: int, world: int,
             local_rank: int) -> Any:
    """Join the process group as ``rank`` and run ``body``; a failure names the rank at fault."""
    if cfg.K != world:
        raise ConfigError(f"K={cfg.K} is invalid: engine=distributed runs K = world size = {world} workers")
    backend, device = backend_for(cfg), rank_device(cfg, local_rank)
    timeout = float(cfg.engine.timeout_s)
    try:
        dist.init_process_group(backend, store=dist.PrefixStore("dpl/pg", store), rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout))
        return body(cfg, out_dir, ProcessGroupComm(store, device))
    except BaseException as e:
        failure = explain(e, store, rank, world, grace_s(timeout))
        if failure is e:
            raise
        raise failure from e
    finally:
        if dist.is_initialized():  # a group whose collective timed out aborts the interpreter unless destroyed
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


def explain(e: BaseException, store: dist.Store, rank: int, world: int, grace: float) -> BaseException:
    """What this rank raises: its own error as it is, or a collective failure that names the culprits."""
    if isinstance(e, RankFailure):
        return e
    try:
        if not is_comm_error(e):
            store.set(_report_key(rank), f"error: {type(e).__name__}: {_first_line(e)}")
            return e
        store.set(_report_key(rank), "peer")
        reports = _collect_reports(store, world, grace)
    except Exception:  # the store lived on a rank that is gone
        if not is_comm_error(e):
            return e
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


def culprits(reports: dict[int, str], world: int, exits: Optional[dict[int, Optional[int]]] = None) -> str:
    """Name the ranks at fault: those that reported an error of their own, and those silent.

    A report "peer" marks a rank that only saw a collective fail. ``exits`` (spawn only)
    are exit codes: None for a process still running after the others had given up, a
    negative code for the signal that killed it.
    """
    parts = []
    for r in range(world):
        report = reports.get(r)
        if report is not None:
            if report.startswith("error: "):
                parts.append(f"rank {r} failed: {report[len('error: '):]}")
            continue
        code = None if exits is None else exits.get(r)
        if exits is None:
            parts.append(f"rank {r} died or hung (it stopped answering)")
        elif code is None:
            parts.append(f"rank {r} hung (no answer within engine.timeout_s; killed it)")
        elif code < 0:
            parts.append(f"rank {r} died (killed by {_signal_name(-code)})")
        elif code != 0:
            parts.append(f"rank {r} died (exit status {code})")
    return "; ".join(parts) or "every rank saw a collective fail and none reported a cause"


def _signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]


# ----------------------------------------------------------------------------- spawn


def spawn(body: Body, cfg: DictConfig, out_dir: Path) -> Any:
    """Start K local ranks, watch them, and return rank 0's result (or raise naming the failed rank)."""
    world, timeout = int(cfg.K), float(cfg.engine.timeout_s)
    # port 0: the OS picks a free one, so concurrent jobs (and tests) do not collide
    store = dist.TCPStore(cfg.engine.master_addr, int(cfg.engine.master_port), is_master=True,
                          wait_for_workers=False, timeout=STORE_TIMEOUT)
    ctx = multiprocessing.get_context("spawn")  # fork after torch started its threads is unsafe
    pipes = [ctx.Pipe(duplex=False) for _ in range(world)]  # (receive, send): each rank's outcome
    threads = max(1, (os.cpu_count() or 1) // world)
    procs = [ctx.Process(target=_spawned_rank, name=f"dpl-rank-{r}",
                         args=(body, cfg, Path(out_dir), cfg.engine.master_addr, store.port, r, world, threads,
                               os.getpid(), pipes[r][1]))
             for r in range(world)]
    for r, p in enumerate(procs):
        p.start()
        pipes[r][1].close()  # the child holds the sending end now
        log.info("engine=distributed: rank %d is pid %d", r, p.pid)
    outcome: dict[int, tuple[str, Any]] = {}
    try:
        exits = _watch(procs, [recv for recv, _ in pipes], outcome, store, timeout)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()  # also ends a stopped (SIGSTOP) process
            p.join()
    if any(code != 0 for code in exits.values()):
        _raise_failure(exits, outcome, store, world)
    return outcome[0][1]


def _watch(procs: list, pipes: list, outcome: dict, store: dist.Store, timeout: float) -> dict[int, Optional[int]]:
    """Exit codes once every rank ended, or once one failed and the others had their chance to report.

    After a failure, a rank still running is either blocked in a collective (it fails at
    the latest ``timeout`` later, then reports) or hung. A rank that reported a failed
    collective ("peer") waited for the others' reports before it exited: once one has,
    the silent ones still running are hung.
    Outcomes are read from ``pipes`` as they arrive (a rank blocked on a full pipe would
    never exit).
    """
    failed_at = None
    while True:
        alive = [r for r, p in enumerate(procs) if p.exitcode is None]
        _read_outcomes(pipes, outcome)  # after the liveness check: an exited rank's outcome is in its pipe
        if failed_at is None and any(p.exitcode not in (None, 0) for p in procs):
            failed_at = time.monotonic()
        if not alive:
            break
        if failed_at is not None:
            reports = _reports(store, len(procs))
            waited = any(v == "peer" and r not in alive for r, v in reports.items())
            settled = waited and not any(r in reports for r in alive)
            if settled or time.monotonic() - failed_at > timeout + grace_s(timeout) + 2.0:
                break
        multiprocessing.connection.wait([procs[r].sentinel for r in alive] +
                                        [recv for r, recv in enumerate(pipes) if r not in outcome], timeout=0.5)
    return {r: p.exitcode for r, p in enumerate(procs)}


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


def _raise_failure(exits: dict[int, Optional[int]], outcome: dict, store: dist.Store, world: int) -> None:
    from dpl.__main__ import user_errors

    errors = [v for r, (kind, v) in sorted(outcome.items()) if kind == "error"]
    for e in errors:  # a config, checkpoint or data error is the same on every rank: report it as such
        if isinstance(e, user_errors()):
            raise e
    raise RankFailure(culprits(_reports(store, world), world, exits))


def _spawned_rank(body: Body, cfg: DictConfig, out_dir: Path, addr: str, port: int, rank: int, world: int,
                  threads: int, parent: int, send) -> None:
    """Entry point of a spawned rank: connect to the parent's store, run, send back the result."""
    _exit_with_parent(parent)
    from tqdm import tqdm

    # tqdm's default lock is a multiprocessing semaphore that a killed rank leaves behind
    # (and the launcher then warns about); a rank's bars only need a thread lock.
    tqdm.set_lock(threading.RLock())
    if "OMP_NUM_THREADS" not in os.environ:  # K processes share the cores
        torch.set_num_threads(threads)
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[rank {rank}][%(name)s][%(levelname)s] - %(message)s")
    store = dist.TCPStore(addr, port, is_master=False, timeout=STORE_TIMEOUT)
    try:
        result = run_rank(body, cfg, out_dir, store, rank, world, local_rank=rank)
    except BaseException as e:
        from dpl.__main__ import user_errors

        if isinstance(e, (RankFailure, *user_errors())):  # one line; the parent reports it again
            print(f"rank {rank}: error: {e}", file=sys.stderr, flush=True)
        else:
            traceback.print_exc()
        send.send_bytes(pickle.dumps(("error", _picklable(e))))
        sys.stderr.flush()
        os._exit(1)
    # plain pickle: torch's multiprocessing pickler would share tensors through this process's
    # memory, which is gone once it exits
    send.send_bytes(pickle.dumps(("result", result if rank == 0 else None)))


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
