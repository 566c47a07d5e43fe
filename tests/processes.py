"""Watching a spawned ``engine=distributed`` job from a test: its ranks' pids and its first epoch."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

from dpl import checkpoint
from dpl.checkpoint import CheckpointError


def rank_pids(proc: subprocess.Popen, world: int) -> dict[int, int]:
    """{rank: pid} from the launcher's "rank R is pid P" lines, once all ``world`` ranks have said it."""
    pids: dict[int, int] = {}
    for line in proc.stdout:
        m = re.search(r"rank (\d+) is pid (\d+)", line)
        if m:
            pids[int(m.group(1))] = int(m.group(2))
        if len(pids) == world:
            return pids
    raise AssertionError("the ranks never started")


def wait_epoch(job: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Return once the job's checkpoint holds a finished epoch (a fault injected later hits a running job)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if checkpoint.load(job)["state"]["epoch"] >= 1:
                return
        except CheckpointError:
            pass
        time.sleep(0.05)
    raise AssertionError("no epoch finished")
