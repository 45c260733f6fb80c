"""Migration and monitor addresses as QEMU writes them: unix:PATH or tcp:HOST:PORT."""

from __future__ import annotations

import os
import socket

KERNEL_BUFFER = 4 << 20


def parse(uri: str) -> tuple[int, object]:
    """(address family, address) of a QEMU-style URI; ValueError with what is allowed."""
    kind, _, rest = uri.partition(":")
    if kind == "unix" and rest:
        return socket.AF_UNIX, rest
    if kind == "tcp":
        host, _, port = rest.rpartition(":")
        if port.isdigit():
            return socket.AF_INET, (host.strip("[]") or "127.0.0.1", int(port))
    raise ValueError(f"expected an address like unix:/path/to/socket or tcp:HOST:PORT, got {uri!r}")


def listen(uri: str, backlog: int = 8) -> socket.socket:
    family, address = parse(uri)
    sock = socket.socket(family, socket.SOCK_STREAM)
    if family == socket.AF_UNIX:
        if os.path.exists(address):
            os.unlink(address)  # a stale socket file of an earlier listener
    else:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(address)
    sock.listen(backlog)
    return sock


def connect(uri: str, timeout: float = 5.0) -> socket.socket:
    family, address = parse(uri)
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(address)
    except OSError:
        sock.close()
        raise
    sock.settimeout(None)
    return tune(sock)


def tune(sock: socket.socket) -> socket.socket:
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        sock.setsockopt(socket.SOL_SOCKET, opt, KERNEL_BUFFER)
    if sock.family == socket.AF_INET:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def bound(sock: socket.socket) -> str:
    """The URI a listening socket can be reached at (tcp port 0 gets its real port here)."""
    if sock.family == socket.AF_UNIX:
        return f"unix:{sock.getsockname()}"
    host, port = sock.getsockname()[:2]
    return f"tcp:{host}:{port}"
