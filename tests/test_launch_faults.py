"""engine=distributed, safe to start and clean to fail: the launcher's listeners sit on
``engine.master_addr`` alone, a bad address or port and a world size other than K are one
line before anything waits, and a dead or hung rank ends the job within seconds of the fault.

Subprocess tests bound every wait and kill what they start in ``finally``.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as dist

from dpl.errors import ConfigError
from dpl.launch.faults import overdue
from dpl.launch.network import host_store, interface_of
from dpl.launch.ranks import spawn
from dpl.run.job import run
from tests.conftest import TINY
from tests.processes import rank_pids, run_cli, wait_epoch

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "TORCHELASTIC_USE_AGENT_STORE",
            "DPL_SWEEP_PARENT_RUN_ID"):
    ENV.pop(key, None)
LINUX = pytest.mark.skipif(not Path("/proc/net/tcp").is_file(), reason="reads /proc/net/tcp (Linux)")


def listening(pid: int | str = "self") -> list[tuple[ipaddress._BaseAddress, int]]:
    """(address, port) of every TCP socket of process ``pid`` in state LISTEN, from /proc/net/tcp{,6}."""
    fds = Path(f"/proc/{pid}/fd")
    inodes = set()
    for fd in fds.iterdir():
        try:
            link = os.readlink(fd)
        except OSError:  # closed meanwhile
            continue
        if link.startswith("socket:["):
            inodes.add(link[len("socket:["):-1])
    found = []
    for table in ("tcp", "tcp6"):
        path = Path(f"/proc/net/{table}")
        for line in path.read_text().splitlines()[1:] if path.is_file() else []:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                address, port = fields[1].split(":")
                raw = bytes.fromhex(address)  # 32-bit words, each in host (little-endian) order
                found.append((ipaddress.ip_address(b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))),
                              int(port, 16)))
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-3000:]
    return lines[0]


# ----------------------------------------------------------------------------- listeners


@LINUX
@pytest.mark.parametrize("addr", ["127.0.0.1", "::1"])
def test_the_launchers_store_listens_on_master_addr_alone(addr):
    try:
        socket.getaddrinfo(addr, 0)
        with socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET) as probe:
            probe.bind((addr, 0))
    except OSError:
        pytest.skip(f"no {addr} here")
    store, host = host_store(addr, 0)
    try:
        assert host == addr
        assert [ip for ip, port in listening() if port == store.port] == [ipaddress.ip_address(addr)]
        client = dist.TCPStore(host, store.port, is_master=False)  # the ranks reach it there
        client.set("k", "v")
        assert store.get("k") == b"v"
    finally:
        del store


@pytest.mark.parametrize("addr,warned", [("0.0.0.0", True), ("127.0.0.1", False)])
def test_a_store_on_every_interface_says_so_in_one_warning(addr, warned, caplog):
    with caplog.at_level(logging.WARNING, logger="dpl"):
        store, host = host_store(addr, 0)
    try:
        lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        if warned:
            assert len(lines) == 1 and "\n" not in lines[0], lines
            assert lines[0].startswith(f"engine.master_addr={addr}: the rendezvous store listens on every "
                                       f"interface of this machine (port {store.port})")
        else:
            assert lines == []
        client = dist.TCPStore(host, store.port, is_master=False)  # still reachable: a warning, not a refusal
        client.set("k", "v")
        assert store.get("k") == b"v"
    finally:
        del store


def _listeners_of_every_rank(_cfg, _out_dir, comm) -> tuple[list, list]:
    """On each rank: its GLOO_SOCKET_IFNAME and listening addresses; rank 0 also the launcher's."""
    mine = (os.environ.get("GLOO_SOCKET_IFNAME"), [str(ip) for ip, _ in listening()])
    everyone = [None] * comm.world
    dist.all_gather_object(everyone, mine)
    return everyone, [str(ip) for ip, port in listening(os.getppid()) if port == comm.store.port]


@LINUX
def test_a_spawned_job_listens_on_loopback_only(make_cfg, tmp_path, monkeypatch):
    """gloo binds the address the hostname resolves to unless told an interface: on most
    machines a public one. The ranks are told master_addr's, the loopback interface."""
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    ranks, launcher = spawn(_listeners_of_every_rank, make_cfg("engine=distributed", "engine.spawn=true", "K=2"),
                            tmp_path)
    assert launcher == ["127.0.0.1"]  # the store: TCPStore alone binds every interface
    for ifname, addresses in ranks:
        assert ifname == interface_of("127.0.0.1")
        assert addresses and all(ipaddress.ip_address(a).is_loopback for a in addresses), ranks


# ----------------------------------------------------------------------------- bad addresses, ports, world sizes


@pytest.mark.parametrize("addr", ["256.1.1.1", "203.0.113.7"])  # invalid; valid but of no interface here
def test_bad_master_addr_is_one_line_at_once(make_cfg, tmp_path, addr):
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=f"^engine.master_addr={re.escape(addr)} is invalid"):
        run(make_cfg("engine=distributed", "engine.spawn=true", "K=2", f"engine.master_addr={addr}"),
            out_dir=tmp_path)
    assert time.monotonic() - t0 < 10  # TCPStore alone retried it for 10 minutes


def test_busy_master_port_of_a_launcher_is_one_line(tmp_path, monkeypatch):
    """A rank 0 that hosts the ``env://`` store itself (no torchrun agent store): its port is busy."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}.items():
            monkeypatch.setenv(key, value)
        monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
        proc = run_cli(tmp_path, [*TINY, "engine=distributed", "K=1"])  # python -m dpl, in this process
    assert proc.returncode == 2
    assert f"MASTER_ADDR:MASTER_PORT=127.0.0.1:{port} is invalid" in one_error_line(proc.stderr)


def test_world_size_other_than_K_is_one_line_on_every_rank(tmp_path):
    """Every rank says why (under torchrun the first to exit gets the others SIGTERMed, so they
    meet first), and none waits for long."""
    port = free_port()
    procs = []
    try:
        for rank in range(2):
            env = {**ENV, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
            procs.append(subprocess.Popen([sys.executable, "-m", "dpl", *TINY, "engine=distributed", "K=3",
                                           "engine.timeout_s=60"], cwd=tmp_path, env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        outcomes = [(p.communicate(timeout=120)[1], p.returncode) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for stderr, code in outcomes:
        assert code == 2
        assert "K=3 is invalid: engine=distributed runs K = world size = 2 workers" in one_error_line(stderr)


@pytest.mark.slow  # torchrun's agent plus three ranks that each run Hydra (~15 s)
@pytest.mark.parametrize("nproc, K", [(3, 2), (2, 3)])
def test_torchrun_with_a_world_size_other_than_K_says_so_on_every_rank(tmp_path, nproc, K):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "dpl",
           *TINY, "engine=distributed", f"K={K}", "engine.timeout_s=60"]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=180)
    assert proc.returncode != 0 and time.monotonic() - t0 < 90
    ours = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert ours == [f"error: K={K} is invalid: engine=distributed runs K = world size = {nproc} workers"] * nproc, \
        proc.stderr[-3000:]


# ----------------------------------------------------------------------------- how fast a fault ends the job


def test_watch_gives_silent_ranks_seconds_and_writing_ranks_longer():
    assert overdue([0, 1], {}, 2.0) == []  # a fault just now: everyone still has time to report
    assert overdue([0, 1], {}, 3.5) == [0, 1]
    assert overdue([0, 1], {0: "peer"}, 3.5) == [1]  # rank 0 reported: it is writing its history
    assert overdue([0], {0: "peer"}, 10.5) == [0]
    assert overdue([1], {0: "peer", 2: "peer"}, 1.5) == [1]  # the ranks that reported are gone


def _spawn_job(tmp_path: Path, K: int, *overrides: str) -> tuple[subprocess.Popen, dict[int, int], Path]:
    """A tracked spawn job; returns it, its ranks' pids and its job dir once the first epoch is saved."""
    job = tmp_path / "job"
    cmd = [sys.executable, "-m", "dpl", "dataset=synthetic", "dataset.num_train=400", "dataset.num_test=100",
           "batch_size=32", "progress=false", "device=cpu", "logger.plots=false", "engine=distributed",
           "engine.spawn=true", f"K={K}", "method=localsgd", "H=2", "epochs=100", *overrides, f"hydra.run.dir={job}"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    pids = rank_pids(proc, K)
    wait_epoch(job, proc, timeout=240)
    return proc, pids, job


def _ends_naming(proc: subprocess.Popen, t0: float, rank: int, what: str, world: int) -> float:
    out = proc.communicate(timeout=180)[0]
    took = time.monotonic() - t0
    assert proc.returncode == 1, out[-3000:]
    (error,) = [line for line in out.splitlines() if line.startswith("error: ")]
    assert what in error and not any(f"rank {r}" in error for r in range(world) if r != rank), error
    return took


def _kill_all(proc: subprocess.Popen, pids: dict[int, int]) -> None:
    """The launcher and its ranks (a stopped rank cannot notice that its launcher is gone)."""
    proc.kill()
    for pid in pids.values():
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.slow  # the same fault, also timed: test_failures.py::test_killed_rank_two_of_four_is_named_and_no_healthy_rank_is_blamed
def test_dead_rank_ends_the_job_within_seconds(tmp_path):
    proc, pids, _ = _spawn_job(tmp_path, 4, "engine.timeout_s=60")
    try:
        assert proc.poll() is None and len(pids) == 4
        t0 = time.monotonic()
        os.kill(pids[1], signal.SIGKILL)
        took = _ends_naming(proc, t0, 1, "rank 1 died first (killed by SIGKILL)", 4)
    finally:
        _kill_all(proc, pids)
    assert took < 15  # measured 4 s idle, 7 s on a loaded machine; the collective timeout is 60 s


@pytest.mark.slow  # the collective timeout itself (~25 s)
def test_hung_rank_ends_the_job_within_the_timeout_plus_seconds(tmp_path):
    timeout_s = 10
    proc, pids, _ = _spawn_job(tmp_path, 4, f"engine.timeout_s={timeout_s}")
    try:
        assert proc.poll() is None and len(pids) == 4
        t0 = time.monotonic()
        os.kill(pids[3], signal.SIGSTOP)  # alive but silent: only the collective timeout can tell
        took = _ends_naming(proc, t0, 3, "rank 3 hung", 4)
    finally:
        _kill_all(proc, pids)
    assert took < timeout_s + 10
