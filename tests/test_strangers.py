"""Strangers on the migration addresses (no TLS, as QEMU without tls-creds, but bounded).

Each test lets strangers in on the link's address and the destination's once both listen, just
before the source migrates; then the real migration goes through the same addresses and must
complete with its memory intact, while the strangers cost no thread and little memory.
"""

import socket
import threading
import time

import pytest

from emu.controller import Run
from emu.figures import report
from emu.migration import incoming, wire
from emu.net import channel
from tests.conftest import config
from tests.wire_peer import closed, destination, frame, peer, read_frame

WAIT = 30  # real seconds: generous, for a loaded machine
MiB = 1 << 20


def proc_status(pid: int, field: str) -> int:
    """A number from /proc/PID/status (kB for the memory fields)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    raise KeyError(field)


class StrangersFirst(Run):
    """A run that lets `strangers(run)` at its addresses just before the source migrates."""

    def __init__(self, cfg, strangers) -> None:
        super().__init__(cfg)
        self.strangers = strangers
        self.kept: list[socket.socket] = []

    def command(self, role: str, *command) -> None:
        if command[0] == "migrate":
            self.kept = self.strangers(self)
        super().command(role, *command)

    def pid(self, role: str) -> int:
        return self.children[role].pid

    def address(self, role: str) -> str:
        """The unix socket path of the link's (network) or the destination's address."""
        return (self.link_uri if role == "network" else self.listening).split(":", 1)[1]


@pytest.fixture
def migrate_after():
    """Run a migration after strangers(run); the strangers kept are closed at the end."""
    runs = []

    def migrate(strangers, **sets) -> StrangersFirst:
        runs.append(_migrate_after(strangers, **sets))
        return runs[-1]
    yield migrate
    for run in runs:
        for sock in run.kept:
            sock.close()


def _migrate_after(strangers, **sets) -> StrangersFirst:
    cfg = config(**sets)
    run = StrangersFirst(cfg, strangers)
    try:
        run.start()
        run.wait()
        assert run.ok, run.errors
        checked = report.check_memory(
            cfg, run.ram("source"), run.ram("destination"), run.pages().dst,
            run.reports["destination"])
        assert checked["ok"], checked
        return run
    except BaseException:
        for sock in run.kept:
            sock.close()
        raise
    finally:
        run.stop()


def connect(path: str, data: bytes = b"") -> socket.socket:
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(path)
    sock.sendall(data)
    return sock


def wait_closed(socks: list[socket.socket], timeout: float = WAIT) -> None:
    """Until the other end has closed every one of `socks`."""
    deadline = time.monotonic() + timeout
    for sock in socks:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            assert closed(sock), "a stranger was answered"
        except TimeoutError:
            raise AssertionError("a stranger was kept waiting") from None


def test_idle_strangers_cost_no_thread_and_little_memory(migrate_after):
    """Before: 400 idle connections made 401 threads in the destination, and 120 took the
    link from 35 to 995 MiB (two 4 MiB buffers each)."""
    seen = {}

    def strangers(run):
        link, dst = run.pid("network"), run.pid("destination")
        threads, rss = proc_status(dst, "Threads"), proc_status(link, "VmRSS")
        kept = [connect(run.address("network")) for _ in range(120)]
        kept += [connect(run.address("destination")) for _ in range(200)]
        # every connect returned: the listeners' backlogs (8) hold the few not accepted yet
        seen["threads"] = proc_status(dst, "Threads") - threads
        seen["rss"] = (proc_status(link, "VmRSS") - rss) * 1024
        return kept

    run = migrate_after(strangers, migration__postcopy_preempt="true")
    assert seen["threads"] <= 2, seen  # the accept thread reads every hello
    assert seen["rss"] < 64 * MiB, seen
    # the oldest were let go to make room: MAX_PENDING at most wait on each address
    wait_closed(run.kept[:120 - channel.MAX_PENDING] + run.kept[120:200 - channel.MAX_PENDING])


def test_a_giant_header_is_refused_at_once(migrate_after):
    """Before: a header announcing 64 MiB was read whole; 12 of them took the destination
    from 290 to 1071 MiB."""
    seen = {}

    def send_giant(path: str) -> None:
        sock = connect(path)
        try:
            sock.sendall(channel.HEADER.pack(channel.DATA, channel.MAX_FRAME, 0, 0.0, 0))
            for _ in range(64):
                sock.sendall(bytes(MiB))
        except OSError:
            pass  # refused: what it wanted to send was not read
        sock.close()

    def strangers(run):
        dst, path = run.pid("destination"), run.address("destination")
        peak = proc_status(dst, "VmHWM")
        senders = [threading.Thread(target=send_giant, args=(path,)) for _ in range(12)]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join(WAIT)
        seen["peak"] = (proc_status(dst, "VmHWM") - peak) * 1024
        return []

    migrate_after(strangers)
    assert seen["peak"] < 100 * MiB, seen


def test_a_hello_has_one_deadline_for_the_whole_handshake(migrate_after):
    """Before: each read had 5 s (a CREDIT frame a second kept the destination waiting
    forever) and the link waited for a hello without any limit."""
    hello = frame(channel.MAIN_HELLO)

    def dribble(sock: socket.socket, pieces: list[bytes], every: float, out: list) -> None:
        sock.settimeout(every)
        for piece in pieces:
            try:
                sock.sendall(piece)
                if closed(sock):
                    break
            except TimeoutError:
                continue  # still open: keep going
            except OSError:
                break
        else:
            out.append("never closed")

    def strangers(run):
        left_open: list = []
        jobs = [(run.address("destination"), [channel.credit_frame(1)] * 300, 0.1),
                (run.address("destination"), [bytes([b]) for b in hello], 0.4),
                (run.address("network"), [bytes([b]) for b in hello], 0.4)]
        threads = [threading.Thread(target=dribble, args=(connect(path), pieces, every,
                                                          left_open))
                   for path, pieces, every in jobs]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WAIT)
        assert not left_open and not any(t.is_alive() for t in threads)
        return []

    migrate_after(strangers)


def test_a_main_hello_then_silence_does_not_keep_the_source_out(migrate_after):
    """Before: a stranger's MAIN_HELLO took the main channel for good and, without preempt,
    closed the listener: the destination stayed in setup forever and the real source was
    refused. A hello then EOF, or then garbage, failed the incoming migration."""
    hello = frame(channel.MAIN_HELLO)

    def strangers(run):
        path = run.address("destination")
        silent = connect(path, hello)
        wait_closed([silent], WAIT)  # MAIN_SETUP_TIMEOUT: given up, the listener still open
        connect(path, hello).close()  # a hello, then EOF
        garbage = connect(path, hello + frame(b"\x77"))  # a hello, then no record of ours
        wait_closed([garbage])
        return [connect(path, hello)]  # silent while the real source comes in

    run = migrate_after(strangers)
    wait_closed(run.kept)  # the real main channel took its place


def test_the_accept_loop_survives_cant_start_new_thread(monkeypatch):
    """Before: RuntimeError from starting a thread ended the accept thread, while the
    migration went on saying setup."""
    real = incoming.start_thread
    failures = []

    def start_thread(name, target, *args):
        if name not in ("accept", "fault") and not failures:
            failures.append(name)
            raise RuntimeError("can't start new thread")
        return real(name, target, *args)

    monkeypatch.setattr(incoming, "start_thread", start_thread)
    with destination() as (dst, _, path):
        first = peer(path, channel.MAIN_HELLO)
        assert closed(first) and failures
        second = peer(path, channel.MAIN_HELLO, wire.command(wire.MIG_CMD_PING, b"\0\0\0\1"))
        assert wire.decode_rp(read_frame(second))[0] == wire.MIG_RP_MSG_PONG
        assert dst.state.status == "active"


@pytest.mark.parametrize("junk", [b"\x00" * 64, channel.credit_frame(1) * 3,
                                  channel.HEADER.pack(channel.DATA, 9, 0, 0.0, 0) + bytes(9)])
def test_what_is_not_a_hello_is_closed_unheard(junk):
    with destination() as (dst, _, path):
        sock = connect(path, junk)
        sock.settimeout(WAIT)
        assert closed(sock)
        assert dst.conns.channels == [None, None]
