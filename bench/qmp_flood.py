"""The QMP monitor's memory and CPU under clients that do not play by the rules.

    python bench/qmp_flood.py [--seconds 20] [--set guest.ram=32MiB ...]

Starts `python -m emu.cli source --qmp unix:...` (the real monitor), then:

1. pipeline: one client sends `query-migrate` requests as fast as the monitor takes them and
   never reads a reply, for --seconds; the monitor's VmRSS before, at its highest and after,
   and whether a second client is still answered meanwhile;
2. array: one client sends a 6 MiB `[1,1,...]` and reads whatever comes back; the number of
   replies and the monitor's CPU seconds spent on it.

Run it from the worktree so that `emu` is the copy under test.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

REQUEST = b'{"execute": "query-migrate"}\n'
ARRAY = b"[" + b"1," * (3 << 20) + b"1]"  # 6 MiB


def status(pid: int, field: str) -> int:
    """A /proc/PID/status field in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(path)
    sock.settimeout(10)
    return sock


def negotiated(path: str) -> tuple[socket.socket, object]:
    sock = connect(path)
    reader = sock.makefile("rb")
    reader.readline()  # greeting
    sock.sendall(b'{"execute": "qmp_capabilities"}\n')
    reader.readline()
    return sock, reader


def answered(path: str) -> bool:
    """Whether a fresh client gets its greeting and a reply."""
    try:
        sock, reader = negotiated(path)
        sock.sendall(b'{"execute": "query-status", "id": "probe"}\n')
        while (reply := json.loads(reader.readline())).get("id") != "probe":
            pass
        sock.close()
        return "return" in reply
    except (OSError, ValueError):
        return False


def pipeline(pid: int, path: str, seconds: float) -> None:
    before = status(pid, "VmRSS")
    sock, _ = negotiated(path)
    sock.setblocking(False)
    sent, highest, deadline = 0, before, time.monotonic() + seconds
    batch = REQUEST * 256
    while time.monotonic() < deadline:
        try:
            sent += sock.send(batch)
        except BlockingIOError:
            time.sleep(0.01)  # the monitor stopped reading us
        except OSError as e:
            print(f"  pipelining client dropped: {e}")
            break
        highest = max(highest, status(pid, "VmRSS"))
    other = answered(path)
    after = status(pid, "VmRSS")
    sock.close()
    print(f"pipeline: {sent // len(REQUEST)} requests taken in {seconds:g} s, never read")
    print(f"  monitor VmRSS before {before / 1024:.0f} MiB, highest {highest / 1024:.0f} MiB, "
          f"after {after / 1024:.0f} MiB; another client answered meanwhile: {other}")


def array(pid: int, path: str, seconds: float) -> None:
    sock, reader = negotiated(path)
    sock.settimeout(None)
    cpu = cpu_seconds(pid)
    replies = [0]

    def count() -> None:
        try:
            while reader.readline():
                replies[0] += 1
        except OSError:
            pass

    def send() -> None:
        try:
            sock.sendall(ARRAY + b'\n{"execute": "query-status", "id": "after"}\n')
        except OSError:
            pass  # the monitor closed the connection

    counter = threading.Thread(target=count, daemon=True)
    sender = threading.Thread(target=send, daemon=True)
    counter.start()
    sender.start()
    counter.join(seconds)
    closed = not counter.is_alive()
    sock.shutdown(socket.SHUT_RDWR)
    sender.join()
    counter.join()
    sock.close()
    print(f"array: 6 MiB [1,1,...] -> {replies[0]} replies, connection closed by the monitor: "
          f"{closed}, monitor CPU {cpu_seconds(pid) - cpu:.1f} s (watched {seconds:g} s at most)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = parser.parse_args()
    folder = tempfile.mkdtemp(prefix="qmpflood")
    path = os.path.join(folder, "q.sock")
    sets = [a for s in ["guest.ram=32MiB", *args.set] for a in ("--set", s)]
    monitor = subprocess.Popen([sys.executable, "-m", "emu.cli", "source", *sets,
                                "--qmp", f"unix:{path}"])
    try:
        deadline = time.monotonic() + 60
        while not answered(path):
            if time.monotonic() > deadline or monitor.poll() is not None:
                raise SystemExit("the monitor did not come up")
            time.sleep(0.2)
        pipeline(monitor.pid, path, args.seconds)
        array(monitor.pid, path, args.seconds)
    finally:
        monitor.send_signal(signal.SIGINT)
        try:
            monitor.wait(30)
        except subprocess.TimeoutExpired:
            monitor.kill()
            monitor.wait()
        if os.path.exists(path):
            os.unlink(path)
        os.rmdir(folder)


if __name__ == "__main__":
    main()
