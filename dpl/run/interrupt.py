"""Signals that stop a run: SIGINT (Ctrl-C) and SIGTERM (``kill``, a scheduler's time limit).

Python turns SIGINT into ``KeyboardInterrupt``; :func:`catch_sigterm` makes SIGTERM raise
:class:`Terminated`, a ``KeyboardInterrupt`` too, so one ``except`` path ends the run:
the MLflow run is marked KILLED, history and plots so far are written, and the command
prints one line. SIGKILL cannot be caught; a run it leaves RUNNING is continued by
``resume=`` and shown as "interrupted" by ``dpl.report``.
"""

from __future__ import annotations

import shlex
import signal
import threading
from pathlib import Path
from typing import Optional

EXIT_STATUS = {"SIGINT": 130, "SIGTERM": 143}  # 128 + the signal number, as a shell reports it


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived."""

    signal_name = "SIGTERM"


def signal_name(e: BaseException) -> str:
    return getattr(e, "signal_name", "SIGINT")


def resume_hint(job: str | Path | None) -> str:
    """``resume with: python -m dpl resume=/abs/path/of/the/job``, the path quoted for a shell; the
    placeholder only where the job dir is not known (a run logged before dpl tagged it)."""
    where = shlex.quote(str(Path(job).resolve())) if job else "<job dir>"
    return f"resume with: python -m dpl resume={where}"


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


def catch_sigterm() -> None:
    """From now on SIGTERM raises :class:`Terminated` in the main thread (a no-op off it)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)


def process_start(pid: int | str) -> Optional[str]:
    """When process ``pid`` started, in clock ticks since boot (Linux: field 22 of ``/proc/<pid>/stat``);
    None where that cannot be read (no such process, no /proc). A PID is reused once its process is gone:
    the PID and this together name one process."""
    try:
        stat = Path(f"/proc/{int(pid)}/stat").read_text()
    except (OSError, ValueError):
        return None
    fields = stat.rsplit(")", 1)[-1].split()  # after the command name, which may hold spaces and ")"
    return fields[19] if len(fields) > 19 and fields[19].isdigit() else None  # field 3 is fields[0]
