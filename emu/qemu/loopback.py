"""Loopback TCP throughput on this host: what a link between two local QEMUs can carry at
most, for the emulator's matching scenario."""

from __future__ import annotations

import socket
import threading
import time

CHUNK = 1 << 20


def measure(seconds: float = 1.0) -> dict:
    """Send over 127.0.0.1 for `seconds` from one thread to another; bytes/s received.

    Both ends run in this process, so on a busy host the figure is a lower bound of what
    the kernel can carry (QEMU's own throughput is in its query-migrate `mbps`)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        received = [0]
        sender = threading.Thread(target=_send, args=(port, seconds), daemon=True)
        sender.start()
        conn, _ = server.accept()
        with conn:
            buf = bytearray(CHUNK)
            start = time.monotonic()
            while n := conn.recv_into(buf):
                received[0] += n
            elapsed = time.monotonic() - start
        sender.join()
    return {"bytes-per-s": round(received[0] / elapsed), "seconds": round(elapsed, 3),
            "bytes": received[0]}


def _send(port: int, seconds: float) -> None:
    data = memoryview(bytes(CHUNK))
    with socket.create_connection(("127.0.0.1", port)) as conn:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            conn.sendall(data)
