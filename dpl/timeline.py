"""Where a process's time goes before and after its steps: with ``DPL_TIMELINE=1`` in the environment,
each phase of a run prints one line to stderr, ``[timeline] <seconds since the process started> <phase>``.

``python -m dpl.bench startup`` reads these lines for its breakdown. The seconds count from the process's
own start (Linux: its start time in ``/proc/self/stat``), so the interpreter's start-up and the imports
before dpl's first line are counted too. Off (the default), a mark costs one attribute test.
"""

from __future__ import annotations

import atexit
import os
import sys
import time

ENABLED = os.environ.get("DPL_TIMELINE") == "1"
_T0 = time.perf_counter()  # where /proc is not there: from this module's import


def since_start() -> float:
    """Seconds since this process started."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime (after the command's name)
        return time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return time.perf_counter() - _T0


def mark(phase: str) -> None:
    """One timeline line for ``phase`` (only with ``DPL_TIMELINE=1``)."""
    if ENABLED:
        print(f"[timeline] {since_start():.3f} {phase}", file=sys.stderr, flush=True)


def once(phase: str):
    """A hook that marks ``phase`` the first time it is called (``on_step``: the first step)."""
    done: list[bool] = []

    def hook(*_) -> None:
        if not done:
            done.append(True)
            mark(phase)

    return hook


if ENABLED:
    atexit.register(mark, "exit")
