"""When a rank fails: its report in the store, the ranks that left none (died or hung), and the one line
that names them; the launcher's deadlines from the first fault on (see :mod:`dpl.launch.ranks`)."""

from __future__ import annotations

import logging
import pickle
import signal
import time
from typing import Optional, Sequence

import torch.distributed as dist

from dpl.errors import RankFailure

log = logging.getLogger("dpl")


SETTLE_S = 3.0  # after the first fault, how long a rank that left no report may run on before it is killed


WRITE_S = 10.0  # after the first fault, how long a rank that reported may take to write its history and exit


# How a failed collective reads (gloo and NCCL put no common exception type on all of them).
COMM_MARKERS = ("gloo", "nccl", "NCCL", "Connection", "Broken pipe", "timeout", "Timed out", "timed out",
                "pair closure", "ProcessGroup", "c10d")


def grace_s(timeout_s: float) -> float:
    """How long a rank whose collective failed waits for the others' reports.

    The healthy ranks see a dead peer at once (its connections close) and a hung one at
    the same timeout, so their reports arrive within moments of each other.
    """
    return min(2.0, max(0.5, timeout_s / 4))


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


def _picklable(e: BaseException) -> BaseException:
    try:
        pickle.dumps(e)
        return e
    except Exception:
        return RuntimeError(f"{type(e).__name__}: {_first_line(e)}")


def leave_group() -> None:
    """Destroy the default process group if there is one: a peer blocked in a collective with this
    rank then fails at once, and a group whose collective timed out aborts the interpreter at exit
    unless destroyed."""
    if dist.is_initialized():
        dist.destroy_process_group()
