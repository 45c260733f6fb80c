"""Speaking the wire protocol (emu/migration/wire.py) straight to a destination in this process."""

import contextlib
import os
import queue
import socket
import tempfile

from emu import shm
from emu.board import Board
from emu.clock import Clock
from emu.events import Error, Event, Listening, StateChanged
from emu.figures.metrics import FaultRing
from emu.migration import destination as D
from emu.net import channel
from tests.conftest import config

WAIT = 10  # real seconds: generous, for a loaded machine


class Control:
    """What a destination child says to its controller, kept for the test."""

    role = "destination"

    def __init__(self) -> None:
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        self.errors: list[str] = []
        self.listening = ""

    def emit(self, event: Event) -> None:
        if isinstance(event, Listening):
            self.listening = event.uri
        self.events.put(event)

    def fail(self, message: str) -> None:
        self.errors.append(f"{self.role}: {message}")  # as the controller says it
        self.emit(Error.of(self.role, message))

    def wait_state(self, status: str, timeout: float = WAIT) -> None:
        while True:
            event = self.events.get(timeout=timeout)
            if isinstance(event, StateChanged) and event.status == status:
                return


@contextlib.contextmanager
def destination(ram=None, **sets):
    """A Destination in this process, listening on a unix socket: (dst, control, path).
    Without payload, unless given its guest RAM (a writable buffer of guest.ram bytes)."""
    cfg = config(emulator__payload="false" if ram is None else "true", **sets)
    bufs = {shm.CLOCK: bytearray(Clock.NBYTES),
            shm.DST_BOARD: bytearray(Board.nbytes(D.FIELDS)),
            shm.DST_STATES: bytearray(cfg.npages), shm.DST_ARRIVAL: bytearray(8 * cfg.npages),
            shm.FAULTS: bytearray(FaultRing.nbytes(D.RING))}
    if ram is not None:
        bufs[shm.DST_RAM] = ram
    Clock(bufs[shm.CLOCK]).start(1.0)
    control = Control()
    dst = D.Destination(control, bufs, cfg)
    folder = tempfile.mkdtemp(prefix="pds")
    path = f"{folder}/in.sock"
    try:
        dst.incoming(f"unix:{path}")
        yield dst, control, path
    finally:
        dst.shutdown()
        if os.path.exists(path):
            os.unlink(path)
        os.rmdir(folder)


def frame(payload: bytes) -> bytes:
    """A DATA frame as the link delivers it: with the checksum of its payload."""
    return channel.HEADER.pack(channel.DATA, len(payload), 0, 0.0,
                               channel.checksum(payload)) + payload


def peer(path: str, *payloads: bytes) -> socket.socket:
    """A connection through a link (its RELAYED mark first) that says `payloads`, one frame
    each."""
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(path)
    sock.settimeout(WAIT)
    sock.sendall(channel.relayed_frame() + b"".join(frame(p) for p in payloads))
    return sock


def read_frame(sock: socket.socket) -> bytes:
    """The destination's next DATA frame (its checksum is the link's to fill in: not
    checked); the credits it gives back for what it read are read past, as a link takes them."""
    def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            more = sock.recv(n - len(data))
            assert more, "closed"
            data += more
        return data
    while True:
        kind, size, _, _, _ = channel.HEADER.unpack(exactly(channel.HEADER.size))
        if kind != channel.CREDIT:
            return exactly(size)


def closed(sock: socket.socket) -> bool:
    """The connection ends (what comes before the end, a link's credits say, is read past)."""
    try:
        for _ in range(1000):
            if sock.recv(1 << 16) == b"":
                return True
    except ConnectionResetError:
        return True
    return False
