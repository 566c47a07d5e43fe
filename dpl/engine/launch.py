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
spawn the parent also sees exit codes and the order of the exits: it names the first
rank that exited without a "peer" report, with its exit status or signal, and gives a
rank that reported "peer" time to finish writing (rank 0 writes the history and plots)
before it kills what is left. It then ends the MLflow run itself (``on_failure``), so a
rank 0 that died cannot leave it RUNNING; Ctrl-C and SIGTERM on the launcher stop the
ranks (SIGTERM, then SIGKILL) and end the run KILLED.
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
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
from omegaconf import DictConfig

from dpl.errors import ConfigError, RankFailure, user_errors
from dpl.engine.distributed import ProcessGroupComm

log = logging.getLogger("dpl")

OnFailure = Callable[[str, str], None]  # on_failure(status, reason): end the job's run (dpl.app.salvage)
SETTLE_S = 3.0  # after the healthy ranks gave up, how long a silent rank still running may take to exit
STOP_S = 10.0  # on the launcher's own signal: how long the ranks get to record KILLED before SIGKILL
Body = Callable[..., Any]  # body(cfg, out_dir, comm) -> result; dpl.app.run
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


def launch(cfg: DictConfig, out_dir: Path, body: Body, on_failure: Optional[OnFailure] = None) -> Any:
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
    return spawn(body, cfg, out_dir, on_failure)


def backend_for(cfg: DictConfig) -> str:
    """The collective backend: ``auto`` is NCCL on CUDA, gloo on CPU; NCCL needs CUDA."""
    from dpl.engine import pick_device

    device = pick_device(cfg.device)
    backend = cfg.engine.backend
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise ConfigError(f"engine.backend='nccl' is invalid on device {device.type}: allowed gloo, or device=cuda")
    return backend


def rank_device(cfg: DictConfig, local_rank: int) -> torch.device:
    """CUDA: this rank's own GPU (the local rank's); CPU otherwise."""
    from dpl.engine import pick_device

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


def report_fault(e: BaseException, store: dist.Store, rank: int) -> None:
    """Leave this rank's report at once ("peer" for a failed collective, else its own error), so
    the launcher does not take a rank still writing its history for a hung one."""
    if isinstance(e, RankFailure):
        return
    try:
        store.set(_report_key(rank), "peer" if is_comm_error(e) else f"error: {type(e).__name__}: {_first_line(e)}")
    except Exception:  # the store lived on a rank that is gone
        pass


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


def culprits(reports: dict[int, str], world: int, exits: Optional[dict[int, Optional[int]]] = None,
             order: Sequence[int] = ()) -> str:
    """Name the ranks at fault: the first to exit without a "peer" report, those that reported an
    error of their own, and those silent.

    A report "peer" marks a rank that only saw a collective fail: it is never blamed. ``exits``
    (spawn only) are exit codes: None for a process still running after the others had given
    up, a negative code for the signal that killed it; ``order`` is the order they exited in.
    """
    first = next((r for r in order if reports.get(r) != "peer" and (exits or {}).get(r) not in (None, 0)), None)
    parts = [] if first is None else [_fault(first, reports.get(first), exits, "first")]
    for r in range(world):
        if r == first:
            continue
        report = reports.get(r)
        if report == "peer":
            continue
        if report is not None or exits is None or exits.get(r) != 0:
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
    world, timeout = int(cfg.K), float(cfg.engine.timeout_s)
    on_failure = on_failure or (lambda status, reason: None)
    # port 0: the OS picks a free one, so concurrent jobs (and tests) do not collide
    try:
        _probe_port(cfg.engine.master_addr, int(cfg.engine.master_port))  # TCPStore retries a busy port for long
        store = dist.TCPStore(cfg.engine.master_addr, int(cfg.engine.master_port), is_master=True,
                              wait_for_workers=False, timeout=STORE_TIMEOUT)
    except (RuntimeError, OSError) as e:
        raise ConfigError(f"engine.master_port={cfg.engine.master_port} is invalid: cannot listen on "
                          f"{cfg.engine.master_addr}:{cfg.engine.master_port} ({_first_line(e)[:120]}); "
                          f"allowed a free port, or 0 for any free port") from None
    ctx = multiprocessing.get_context("spawn")  # fork after torch started its threads is unsafe
    pipes = [ctx.Pipe(duplex=False) for _ in range(world)]  # (receive, send): each rank's outcome
    threads = max(1, (os.cpu_count() or 1) // world)
    procs = [ctx.Process(target=_spawned_rank, name=f"dpl-rank-{r}",
                         args=(body, cfg, Path(out_dir), cfg.engine.master_addr, store.port, r, world, threads,
                               os.getpid(), pipes[r][1]))
             for r in range(world)]
    outcome: dict[int, tuple[str, Any]] = {}
    order: list[int] = []
    try:
        for r, p in enumerate(procs):
            p.start()
            pipes[r][1].close()  # the child holds the sending end now
            log.info("engine=distributed: rank %d is pid %d", r, p.pid)
        exits = _watch(procs, [recv for recv, _ in pipes], outcome, store, timeout, order)
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM on the launcher: stop the ranks, end the run KILLED
        from dpl.interrupt import signal_name

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


def _probe_port(addr: str, port: int) -> None:
    if port == 0:
        return
    import socket

    with socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as TCPStore: TIME_WAIT is no conflict
        probe.bind((addr, port))


def _stop(procs: list) -> None:
    """SIGTERM every rank (rank 0 records KILLED and writes its history), SIGKILL what is left after STOP_S."""
    for p in procs:
        if p.pid is not None and p.is_alive():
            p.terminate()
    deadline = time.monotonic() + STOP_S
    for p in procs:
        if p.pid is not None:
            p.join(max(0.0, deadline - time.monotonic()))


def _watch(procs: list, pipes: list, outcome: dict, store: dist.Store, timeout: float,
           order: Optional[list] = None) -> dict[int, Optional[int]]:
    """Exit codes once every rank ended, or once one failed and the others had their chance to exit.

    After a failure, a rank still running is either blocked in a collective (it fails at
    the latest ``timeout`` later, reports "peer" and exits), busy writing its history after
    reporting "peer", or hung. Once a rank that reported "peer" has exited, a rank still
    running that has not reported anything gets SETTLE_S more, then counts as hung.
    Outcomes are read from ``pipes`` as they arrive (a rank blocked on a full pipe would
    never exit); ``order`` receives the ranks in the order they were seen to exit.
    """
    order = [] if order is None else order
    failed_at = settled_at = None
    while True:
        for r, p in enumerate(procs):
            if p.exitcode is not None and r not in order:
                order.append(r)
        alive = [r for r, p in enumerate(procs) if p.exitcode is None]
        _read_outcomes(pipes, outcome)  # after the liveness check: an exited rank's outcome is in its pipe
        if failed_at is None and any(p.exitcode not in (None, 0) for p in procs):
            failed_at = time.monotonic()
        if not alive:
            break
        if failed_at is not None:
            reports = _reports(store, len(procs))
            waited = any(v == "peer" and r not in alive for r, v in reports.items())
            if waited and not any(r in reports for r in alive):
                settled_at = settled_at or time.monotonic()
            else:
                settled_at = None
            now = time.monotonic()
            if settled_at is not None and now - settled_at > SETTLE_S:
                break  # the silent ranks still running are hung
            if now - failed_at > timeout + grace_s(timeout) + SETTLE_S:
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

    from dpl.interrupt import catch_sigterm

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
