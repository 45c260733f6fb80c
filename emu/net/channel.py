"""A migration channel endpoint: one end of a connection through the emulated link.

Everything that crosses the link is a frame: kind, payload length, and `virt`, bytes the link
charges without carrying them (emulator.payload=false: a page record travels as a header but
costs the link a whole page). A sender holds at most `window` (link.socket-buffer) bytes in the
connection: once that is reached, send() blocks exactly like write() on a full TCP socket. This
is where head-of-line blocking comes from.

As in TCP, the window is freed by the receiving application, not by the network: a frame's
bytes hold their place in it until the receiving endpoint's thread takes the frame (recv()),
however long it sat unread in the socket. The receiver then writes CREDIT frames back on its
own socket (coalesced, see CREDIT_SHARE), and the link passes them on to the sender; the link
credits on delivery only the little the receiver's socket takes on its own (link.py,
receive_room). So a receiving thread slower than the link holds its sender back, as a reader
that does not keep up with a TCP stream closes its window.
"""

from __future__ import annotations

import io
import select
import socket
import struct
import threading
import time

import numpy as np

from emu import trace

# kind, payload length, charged-but-not-carried bytes, arrival time (set by the link, as the
# time.monotonic() its emulated arrival time fell on: the one clock that a `link` program and a
# destination program, whose emulated clocks started apart, read alike), checksum of the
# payload: like TCP's, it turns bytes corrupted on the way into a broken connection rather than
# a wrong page. The link computes it as the bytes leave the sender (the sending NIC's job), so a
# sender never checksums bytes its guest may still be writing.
HEADER = struct.Struct("<BIQdQ")
ARRIVAL_OFFSET = 13
CHECKSUM_OFFSET = 21
# The first frame of every connection says what it is (QEMU_VM_FILE_MAGIC + version on main;
# the destination takes any other connection for the preempt channel, as QEMU does).
MAIN_HELLO = b"QEVM\x00\x00\x00\x03"
PREEMPT_HELLO = b"QEPC\x00\x00\x00\x01"
# migration.x-preempt-channels (not QEMU, which has one preempt channel): preempt channel i
# says PREEMPT_HELLO with i in its third byte; channel 0's is QEMU's own
_PREEMPT_PREFIX, _PREEMPT_SUFFIX = PREEMPT_HELLO[:6], PREEMPT_HELLO[7:]
HELLO_MAX = 8  # bytes a hello may have: a longer first frame is not one of ours
# A stranger on a migration address (no TLS, as QEMU without tls-creds) costs a socket and a
# few bytes for a bounded time: it has HANDSHAKE_TIMEOUT real seconds for its whole hello, and
# at most MAX_PENDING connections wait for theirs (a newer one ends the oldest: a real peer
# says its hello at once, so it is never the oldest for long).
HANDSHAKE_TIMEOUT = 5.0
MAX_PENDING = 16
REFUSE_DRAIN = 1 << 20
DATA = 0
CREDIT = 1
# A link's first frame to the destination, before the hello it forwards: this connection comes
# through an emulated link. One without it comes straight from a source (link.py's front).
RELAYED = 2
MAX_FRAME = 64 << 20
BATCH = 256 << 10  # bytes of frames send(more=True) gathers before writing them
BATCH_PARTS = 512  # buffers one sendmsg() gets at most (Linux takes 1024)
# A receiver gives back what recv() has taken once that reaches this share of the window, or
# as soon as it has taken all it has read in (or is about to wait for more). Linux coalesces
# its window updates alike (__tcp_cleanup_rbuf(), at the end of the read: once reading has
# opened the window well). A receiver that keeps up credits each frame as it takes it, so a
# sender never waits for room freed already; one busy with a backlog writes a credit per
# eighth of the window, not one per frame, and holds its sender back by an eighth of the
# window at most, a few frames of its own drain time.
CREDIT_SHARE = 8

# A writer asleep on a full connection, and awake again. QEMU has no trace point there (its
# qio_channel_writev_full_all() waits in qio_channel_wait(G_IO_OUT)); named in qemu-file.c's
# style, as the QEMUFile writev that blocks.
TRACE_WRITEV_BLOCKED = trace.point("qemu_file_writev_blocked")
TRACE_WRITEV_UNBLOCKED = trace.point("qemu_file_writev_unblocked")


def preempt_hello(index: int) -> bytes:
    """The hello of preempt channel `index` (0: QEMU's PREEMPT_HELLO)."""
    return _PREEMPT_PREFIX + bytes([index]) + _PREEMPT_SUFFIX


def preempt_name(index: int) -> str:
    """Preempt channel `index`'s name, as its endpoints and the link's connection have it:
    "preempt", then "preempt1", "preempt2", ..."""
    return f"preempt{index}" if index else "preempt"


def preempt_channel_id(hello: bytes) -> int | None:
    """The preempt channel a hello names, or None if it is not a preempt channel's."""
    if len(hello) == len(PREEMPT_HELLO) and hello.startswith(_PREEMPT_PREFIX) \
            and hello.endswith(_PREEMPT_SUFFIX):
        return hello[6]
    return None


class ChannelError(ConnectionError):
    """The connection broke, or a frame did not make sense."""


class Endpoint:
    def __init__(self, sock: socket.socket, window: int, name: str = "",
                 on_arrival=None, wakeup: int = 0) -> None:
        self.name = name
        # called with each DATA frame's scheduled arrival time (time.monotonic(), see HEADER)
        self.on_arrival = on_arrival
        self.sock = sock
        self.window = window
        self.wakeup = wakeup  # link.write-wakeup
        self._incoming = _Incoming(sock, self._credit_all)
        self._reader = io.BufferedReader(self._incoming, 1 << 20)
        self._consumed = 0  # bytes taken out of _reader (what it read ahead is not)
        self._send_lock = threading.Lock()  # one writer at a time, while it waits for room
        # the socket's writes: frames and the credits of what we read (the reader writes
        # those while a writer waits for room, so it must not wait for _send_lock)
        self._write_lock = threading.Lock()
        self._taken = 0  # bytes of the frames recv() took, not credited yet (reader only)
        self._credit_every = max(1, window // CREDIT_SHARE)
        self._credit = threading.Condition()
        self._outstanding = 0
        self._closed = False
        self._held: list = []  # frames (their parts) written with more=True, not sent yet
        self._held_bytes = 0

    @property
    def closed(self) -> bool:
        """This side closed it (a failure it reports afterwards is old news)."""
        return self._closed

    @property
    def outstanding(self) -> int:
        """Bytes of ours the link holds (or this endpoint, not written yet)."""
        return self._outstanding

    def send(self, parts: list, virt: int = 0, more: bool = False) -> None:
        """Write one frame made of `parts` (bytes-like); blocks while the link holds `window`
        bytes of ours. A frame larger than the window waits for an empty link, then goes.

        more=True: the caller has more frames right behind this one (a stream of pages). The
        frame is held, its bytes referenced, not copied, until BATCH bytes have gathered, the
        next send without more, flush(), or a wait for the link: one system call then writes
        them all, as QEMU's QEMUFile gathers page iovecs before a writev()."""
        size = len(parts[0]) if len(parts) == 1 else sum(len(p) for p in parts)
        self._put([(parts, size, virt)], size + virt, more)

    def send_write(self, frames: list[tuple[list, int]], more: bool = False) -> None:
        """One write() of several frames, each (parts, virt) as send()'s: it waits for room
        for all of them at once, as a writer does for its whole writev(), and the link
        delivers each frame as its own last byte arrives (a reader that parses as it reads)."""
        sized = [(parts, sum(len(p) for p in parts), virt) for parts, virt in frames]
        self._put(sized, sum(size + virt for _, size, virt in sized), more)

    def _put(self, frames: list[tuple[list, int, int]], charge: int, more: bool) -> None:
        """frames: (parts, size, virt); `charge` their bytes, real and virtual."""
        with self._send_lock:
            if self._outstanding + charge > self.window:  # only credits make it smaller
                self._write_held()  # what we hold must reach the link to be credited
                self._wait_for_room(charge)
            with self._credit:
                self._outstanding += charge
            for parts, size, virt in frames:
                self._held += [HEADER.pack(DATA, size, virt, 0.0, 0), *parts]
                self._held_bytes += HEADER.size + size
            if not more or self._held_bytes >= BATCH or len(self._held) >= BATCH_PARTS:
                self._write_held()

    def _wait_for_room(self, charge: int) -> None:
        """Blocked: like a writer asleep on a full TCP socket, wake only once `wakeup` bytes
        more than this write needs have drained."""
        room = self.window - self.wakeup
        # traced outside the lock: a slow sink must not hold up the credits
        traced = TRACE_WRITEV_BLOCKED.enabled and self._full(charge, room)
        if traced:
            TRACE_WRITEV_BLOCKED(channel=self.name, queued=self._outstanding, size=charge)
        with self._credit:
            while self._full(charge, room):
                if self._closed:
                    raise ChannelError(f"{self.name}: closed")
                self._credit.wait(0.5)
        if traced and TRACE_WRITEV_UNBLOCKED.enabled:
            TRACE_WRITEV_UNBLOCKED(channel=self.name, queued=self._outstanding, size=charge)

    def wait_room(self, charge: int, stop) -> bool:
        """A non-blocking writer's poll() (migration.x-main-nonblocking, an experiment): wait
        until a send of `charge` bytes would not block, or until stop() says to do something
        else (asked at once and at every wake(): a request queued calls it). True if there is
        room; what this endpoint holds is written first, so that it can be credited."""
        room = self.window - self.wakeup
        with self._credit:
            if not self._full(charge, room):
                return True
        self.flush()
        with self._credit:
            while self._full(charge, room):
                if self._closed:
                    raise ChannelError(f"{self.name}: closed")
                if stop():
                    return False
                self._credit.wait(0.5)
        return True

    def wake(self) -> None:
        """Wake a wait_room() to look at its stop() again."""
        with self._credit:
            self._credit.notify_all()

    def _full(self, charge: int, room: int) -> bool:
        """No room for `charge` more bytes (a frame larger than the link goes when it is
        empty)."""
        return bool(self._outstanding) and self._outstanding + charge > room

    def flush(self) -> None:
        """Write the frames held by send(more=True)."""
        if not self._held:  # nothing held (an urgent page's send wrote itself): no lock
            return
        with self._send_lock:
            self._write_held()

    def recv(self) -> bytes:
        """The next DATA frame's payload; credits met on the way are taken in. The frame's
        bytes are then the sender's room again: credited back (see CREDIT_SHARE)."""
        while True:
            kind, size, virt, arrival, check = self._read_header()
            if kind == CREDIT:
                self._take_credit(virt)
                continue
            if self.on_arrival:
                self.on_arrival(arrival)
            try:
                payload = self._reader.read(size) if size else b""
            except (OSError, ValueError) as err:
                raise ChannelError(f"{self.name}: {err}") from None
            if len(payload) != size:
                raise ChannelError(f"{self.name}: connection closed mid-frame")
            if checksum(payload) != check:
                raise ChannelError(f"{self.name}: checksum mismatch, the frame was corrupted")
            self._consumed += size
            self._taken += size + virt
            if self._taken >= self._credit_every or self._consumed == self._incoming.count:
                self._credit_all()  # a share of the window, or all that came: see CREDIT_SHARE
            return payload

    def _credit_all(self) -> None:
        """Give the sender back the bytes of what recv() took (the reader's thread)."""
        if not self._taken:
            return
        frame, self._taken = credit_frame(self._taken), 0
        try:
            with self._write_lock:
                self.sock.sendall(frame)
        except OSError:
            pass  # the connection is gone: reading on gets what came before its end, then fails

    def read_credits_in_background(self, on_error=None) -> threading.Thread:
        """For a write-only endpoint (the source's preempt channel): someone must read credits.
        on_error(err) is called when the connection breaks."""
        def loop() -> None:
            try:
                while True:
                    self.recv()
            except ChannelError as err:
                if on_error:  # before close(): a failure of a closed endpoint is old news
                    on_error(err)
                self.close()
        thread = threading.Thread(target=loop, name=f"{self.name}-credits", daemon=True)
        thread.start()
        return thread

    def hung_up(self) -> bool:
        """The connection is closed, by this side or the other (poll's POLLRDHUP, which
        holds with bytes still unread): for a thread that waits on something else instead
        of reading it."""
        if self._closed:
            return True
        poller = select.poll()
        poller.register(self.sock, select.POLLRDHUP | select.POLLHUP | select.POLLERR)
        return bool(poller.poll(0))

    def close(self) -> None:
        with self._credit:
            self._closed = True
            self._credit.notify_all()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _read_header(self) -> tuple[int, int, int, float, int]:
        try:
            raw = self._reader.read(HEADER.size)
        except (OSError, ValueError) as err:  # reset, or closed under our feet
            raise ChannelError(f"{self.name}: {err}") from None
        if len(raw) != HEADER.size:
            raise ChannelError(f"{self.name}: connection closed")
        self._consumed += HEADER.size
        kind, size, virt, arrival, check = HEADER.unpack(raw)
        if kind not in (DATA, CREDIT) or size > MAX_FRAME:
            raise ChannelError(f"{self.name}: bad frame header {raw.hex()}")
        return kind, size, virt, arrival, check

    def _take_credit(self, n: int) -> None:
        with self._credit:
            self._outstanding = max(0, self._outstanding - n)
            self._credit.notify_all()

    def _write_held(self) -> None:
        views = [memoryview(p).cast("B") for p in self._held]
        self._held, self._held_bytes = [], 0
        try:
            with self._write_lock:
                while views:
                    sent = self.sock.sendmsg(views)
                    done = 0
                    while done < len(views) and sent >= len(views[done]):
                        sent -= len(views[done])
                        done += 1
                    views = views[done:]
                    if sent:
                        views[0] = views[0][sent:]
        except OSError as err:
            raise ChannelError(f"{self.name}: {err}") from err


class _Incoming(io.RawIOBase):
    """An endpoint's socket as its buffered reader reads it: a read that would wait for the
    socket calls on_idle() first. The reader has then taken every frame that came, and
    on_idle gives back their credit before the wait (the sender may be waiting for it)."""

    def __init__(self, sock: socket.socket, on_idle) -> None:
        self._sock = sock
        self._on_idle = on_idle
        self.count = 0  # bytes read off the socket

    def readinto(self, buf) -> int:
        n = self._read_into(buf)
        self.count += n
        return n

    def readable(self) -> bool:
        return True

    def _read_into(self, buf) -> int:
        try:  # one system call when there is more: the same one a plain read makes
            return self._sock.recv_into(buf, 0, socket.MSG_DONTWAIT)
        except BlockingIOError:
            pass
        self._on_idle()
        return self._sock.recv_into(buf)


class Hello:
    """The first frame of a new connection, read without trusting it, from a non-blocking
    socket: a DATA frame of at most HELLO_MAX bytes, behind the RELAYED mark of the link it
    came through. Reads never go past that frame, so the channel's own reader starts right
    behind it; the hello, read, is credited back like any frame an Endpoint takes. A
    connection with no mark comes straight from a source: `direct`, and read no further than
    its first header, so that it can be handed on to a link whole."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.deadline = deadline  # time.monotonic() by which the whole frame must be in
        self.arrival = 0.0  # as the link scheduled it (time.monotonic(), see HEADER)
        self.relayed = False
        self._buf = bytearray()
        self._need = HEADER.size
        self._check: int | None = None
        self._charge = 0  # the hello's bytes, as its sender's window counts them

    @property
    def direct(self) -> bool:
        """A hello header with no link's mark before it: what was read is `read_so_far`."""
        return not self.relayed and self._check is not None

    @property
    def read_so_far(self) -> bytes:
        return bytes(self._buf)

    def read(self) -> bytes | None:
        """Take in what has come: the payload once the frame is complete (b"" at once for a
        direct connection), else None. ChannelError when the connection closed or it is not
        a hello."""
        try:
            data = self.sock.recv(self._need - len(self._buf))
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as err:
            raise ChannelError(f"hello: {err}") from None
        if not data:
            raise ChannelError("hello: connection closed")
        self._buf += data
        if self._check is None and len(self._buf) == HEADER.size:
            kind, size, virt, arrival, check = HEADER.unpack(self._buf)
            if kind == RELAYED and size == 0 and not self.relayed:
                self.relayed = True  # a link's mark: the hello follows
                self._buf.clear()
                return None
            if kind != DATA or size > HELLO_MAX:
                raise ChannelError(f"not a hello: frame header {self._buf.hex()}")
            self.arrival, self._check, self._charge = arrival, check, size + virt
            if not self.relayed:
                return b""  # direct
            self._need += size
        if len(self._buf) < self._need:
            return None
        payload = bytes(self._buf[HEADER.size:])
        if checksum(payload) != self._check:
            raise ChannelError("hello: checksum mismatch")
        try:  # taken: its sender has the room again (37 bytes, into an empty socket)
            self.sock.sendall(credit_frame(self._charge))
        except OSError:
            pass  # the peer is gone: what it sent before is still read, as by Endpoint.recv
        return payload


def refuse(sock: socket.socket) -> None:
    """Close a connection that is not a migration stream. What it sent and we did not read is
    thrown away first (up to REFUSE_DRAIN bytes): closed with unread bytes, a socket resets
    the peer's connection, and a stranger is told an orderly no."""
    drained = 0
    try:
        while drained < REFUSE_DRAIN:
            data = sock.recv(1 << 16, socket.MSG_DONTWAIT)
            if not data:
                break
            drained += len(data)
    except OSError:
        pass
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


SMALL_FRAME = 256  # payload bytes up to which checksum() sums words without numpy
_WORDS = [struct.Struct(f"<{n}Q") for n in range(SMALL_FRAME // 8 + 1)]  # n words, unpacked


def checksum(payload) -> int:
    """The payload's 64-bit little-endian words summed, wrapping around: TCP's checksum is a
    16-bit sum of the same kind. Any one corrupted byte changes it, and numpy sums a page five
    times faster than zlib computes a CRC-32 of it (the link and the receiver do it per byte).
    A small payload (a page request, a record without payload) is summed by struct: numpy's
    call costs more than the sum there, 10-20 us on each of a fault's four checksums when
    the CPU comes out of idle (2-core dev VM)."""
    view = memoryview(payload).cast("B")
    whole = len(view) & ~7
    if not whole:
        total = 0
    elif whole <= SMALL_FRAME:
        total = sum(_WORDS[whole >> 3].unpack_from(view))
    else:
        total = int(np.frombuffer(view[:whole], np.uint64).sum())
    return (total + int.from_bytes(view[whole:], "little")) & 0xFFFF_FFFF_FFFF_FFFF


def credit_frame(n: int) -> bytes:
    return HEADER.pack(CREDIT, 0, n, 0.0, 0)


def relayed_frame() -> bytes:
    return HEADER.pack(RELAYED, 0, 0, 0.0, 0)


def read_header(sock: socket.socket, timeout: float) -> bytes:
    """A connection's first frame header, read off the socket itself (nothing past it, so the
    socket can still be handed on whole); b"" if it closed or said too little in time."""
    deadline = time.monotonic() + timeout
    raw = b""
    try:
        while len(raw) < HEADER.size:
            sock.settimeout(max(deadline - time.monotonic(), 1e-3))
            more = sock.recv(HEADER.size - len(raw))
            if not more:
                return b""
            raw += more
    except OSError:  # the deadline passed, or the connection broke
        return b""
    finally:
        sock.settimeout(None)
    return raw
