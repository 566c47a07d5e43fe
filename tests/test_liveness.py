"""A RUNNING run's process is alive only if its PID names the process that started the run: PID and
start time (``dpl.pid`` and ``dpl.pid_start``), checked on real processes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dpl.run.interrupt import process_start
from dpl.tracking.store import HOST_TAG, PID_START_TAG, PID_TAG, process_gone

LINUX = pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads /proc/<pid>/stat (Linux)")
SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]


def tags(pid: int, start: str | None) -> dict[str, str]:
    out = {HOST_TAG: socket.gethostname(), PID_TAG: str(pid)}
    return out if start is None else {**out, PID_START_TAG: start}


@LINUX
def test_a_dead_run_whose_pid_another_process_took_is_gone():
    first = subprocess.Popen(SLEEPER)
    second = None
    try:
        started = process_start(first.pid)
        assert started is not None and started.isdigit()
        assert not process_gone(tags(first.pid, started))  # alive: its PID and start time
        first.kill()
        first.wait(timeout=30)
        assert process_gone(tags(first.pid, started))  # no process has the PID
        time.sleep(0.05)  # the next process starts clock ticks later (a tick is 10 ms)
        second = subprocess.Popen(SLEEPER)
        assert process_start(second.pid) != started
        # the dead run's record as it reads once its PID went to the second process
        assert process_gone(tags(second.pid, started))
        assert not process_gone(tags(second.pid, process_start(second.pid)))  # the second process's own run
        assert not process_gone(tags(second.pid, None))  # a run tagged before dpl.pid_start: by PID alone
    finally:
        for p in (first, second):
            if p is not None:
                p.kill()
                p.wait(timeout=30)


def test_a_run_from_another_host_counts_as_alive():
    assert not process_gone({HOST_TAG: "not-" + socket.gethostname(), PID_TAG: "1", PID_START_TAG: "0"})


@LINUX
def test_the_start_time_read_survives_a_command_name_with_spaces_and_parentheses(tmp_path):
    odd = tmp_path / "a b) c"
    odd.symlink_to(sys.executable)
    p = subprocess.Popen([str(odd), "-c", "import time; time.sleep(60)"])
    try:
        deadline = time.monotonic() + 30
        while "a b) c" not in Path(f"/proc/{p.pid}/stat").read_text():  # the exec has happened
            assert time.monotonic() < deadline
            time.sleep(0.01)
        # after this test's process, and before now (uptime in clock ticks)
        now = float(Path("/proc/uptime").read_text().split()[0]) * os.sysconf("SC_CLK_TCK")
        assert int(process_start(os.getpid())) <= int(process_start(p.pid)) <= now + 1
    finally:
        p.kill()
        p.wait(timeout=30)
