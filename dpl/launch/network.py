"""Where the ranks listen: the launcher's store on ``engine.master_addr`` alone, and gloo's connections on
that address's interface."""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import os
import socket
import sys
from datetime import timedelta
from pathlib import Path
from typing import Optional

import torch.distributed as dist

from dpl.errors import ConfigError

log = logging.getLogger("dpl")
STORE_TIMEOUT = timedelta(minutes=10)  # store handshakes (run dir, reports), not collectives



def host_store(addr: str, port: int) -> tuple[dist.TCPStore, str]:
    """The launcher's store, listening on ``addr`` alone; and the numeric address the ranks connect to.

    Given a host and port, TCPStore binds ``*:port`` (every interface, whatever ``addr`` says)
    and retries an address it cannot reach for STORE_TIMEOUT; on a socket bound here it
    listens where asked, and a bad address or a busy port is one line at once.
    """
    sock = _listen(addr, port)
    host, bound = sock.getsockname()[:2]
    if ipaddress.ip_address(host.split("%")[0]).is_unspecified:  # 0.0.0.0 or ::, as asked: say what it means
        log.warning("engine.master_addr=%s: the rendezvous store listens on every interface of this machine "
                    "(port %d), open to any host that reaches it; 127.0.0.1 keeps a one-machine job local",
                    addr, bound)
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

