"""The emulated network between source and destination, like a netem box.

The relay runs in its own process. It keeps the link's schedule in emulated time instead of
sleeping per packet: every frame read from a sender is queued at the bottleneck, leaves it when
its turn and its share of the bandwidth allow (`Bottleneck`, a fluid fair-share model: the
connections with bytes waiting split the bandwidth equally), arrives one one-way delay later,
and is written to the receiver when the scaled clock reaches that time.

A sender holds at most link.socket-buffer bytes of its connection (channel.py's window), and
as in TCP they are freed by the receiver: a frame delivered stays the sender's until the
receiving endpoint has read it, which it says with CREDIT frames on its own socket; the relay
passes them on to the sender. The receiver's socket itself takes `receive_room` bytes more
(an eighth of the window, channel.CREDIT_SHARE): those are credited as they are delivered, as
a TCP receiver acknowledges what its receive buffer has room for before the application reads
it. So a receiving thread that keeps up on the whole but reads in bursts (a listen thread
placing a huge page) does not close its sender's window, and one slower than the link holds
the connection to the window plus that room. A credit from a port that receives nothing, or
for more than the receiver was given and has not credited, is not our protocol: the
connection breaks.

Connections: main and preempt go source -> destination and share one bottleneck; the return
path goes destination -> source on its own (the link is full duplex). Every connection the
relay forwards starts, on the destination's side, with a RELAYED frame: the destination tells
by it a connection through a link from one that comes straight from a source.

A source connected straight to a standalone destination (no `link` program, as two QEMUs) goes
through the destination program's own relay, its front: the destination hands such a
connection over (hand_over: the socket itself, passed over a unix socket in the program's
private folder), and the front relays it to the destination's end of a socketpair, marked like
any other. A connection through a `link` program is marked already and never reaches the
front: the link is emulated once.
"""

from __future__ import annotations

import collections
import itertools
import selectors
import shutil
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from emu import shm
from emu.board import Board
from emu.clock import SPIN_S, Clock
from emu.config import Config
from emu.events import Bound, Link, Ready
from emu.migration.wire import multifd_channel_id
from emu.net import channel, uri

CONNECTIONS = ("main", "preempt", "return")
# connection -> (sender port, receiver port, direction); ports are the relay's sockets
ROUTES = {
    "main": ("src-main", "dst-main", "forward"),
    "preempt": ("src-preempt", "dst-preempt", "forward"),
    "return": ("dst-main", "src-main", "reverse"),
}
MULTIFD = "multifd"  # multifd channel N is connection "multifdN", source to destination
# the multifd connections are published together, as "multifd"
FIELDS = tuple(f"{k}-{c}" for c in (*CONNECTIONS, MULTIFD) for k in ("queued", "delivered")) + (
    "lag-max", "lag-sum", "frames", "late-frames")
INBUF = 4 << 20  # bytes a migration connection's port reads ahead; grows for a larger frame
HELLO_BUF = channel.HEADER.size + channel.HELLO_MAX  # what a new connection's port reads ahead
IOV_MAX = 1024  # buffers one sendmsg() takes (Linux's UIO_MAXIOV)
LATE = 10e-6  # emulated seconds past its arrival time after which a delivery counts as late
HANDOVER_TIMEOUT = 1.0  # real seconds for a hand-over's message (sent right after connecting)


def _route(conn: str) -> tuple[str, str, str]:
    """(sender port, receiver port, direction) of a connection: a multifd one goes forward
    on its own ports, like preempt."""
    return ROUTES.get(conn) or (f"src-{conn}", f"dst-{conn}", "forward")


def _field(conn: str) -> str:
    """The board fields' name of a connection: the multifd ones share theirs, and so do the
    preempt ones."""
    if conn.startswith(MULTIFD):
        return MULTIFD
    return "preempt" if conn.startswith("preempt") else conn


def _conn_from(port: str) -> str | None:
    """The connection a frame read from `port` travels on."""
    side, conn = port.split("-", 1)
    if side == "src":
        return conn
    return "return" if conn == "main" else None  # nothing flows back on preempt


def _credited_conn(port: str) -> str | None:
    """The connection whose receiver is `port`, which a CREDIT frame read from it frees."""
    side, conn = port.split("-", 1)
    if side == "dst":
        return conn
    return "return" if conn == "main" else None  # the source receives nothing on preempt


def receive_room(window: int) -> int:
    """What a receiver's socket of a connection with `window` acknowledges before its reader
    reads it: as much as the receiver holds back in one credit (channel.CREDIT_SHARE), so
    that a reader's coalescing and its short bursts of work leave the sender's room alone."""
    return window // channel.CREDIT_SHARE


def _sleep_for(wait: float) -> float:
    """How long the loop may sleep when its next event is `wait` real seconds away: until
    SPIN_S before it, then it spins (select(0)), since a sleep may end that late."""
    return 0.0 if wait < SPIN_S else wait - SPIN_S


def _frame(buf: bytearray, pos: int, end: int) -> bytearray:
    """One frame out of a port's input, with the checksum of its payload as it was sent."""
    with memoryview(buf) as view:
        frame = bytearray(view[pos:end])
    with memoryview(frame) as view:
        check = channel.checksum(view[channel.HEADER.size:])
    struct.pack_into("<Q", frame, channel.CHECKSUM_OFFSET, check)
    return frame


class Bottleneck:
    """Fluid fair sharing of one bottleneck among FIFO connections (processor sharing)."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.t = 0.0
        self._queues: dict[str, collections.deque] = collections.defaultdict(collections.deque)

    def push(self, conn: str, item: object, charge: int) -> None:
        """Queue `item` (costing `charge` bytes) at time self.t: call advance(now) first."""
        self._queues[conn].append([float(charge), item])

    def drop(self, conn: str) -> None:
        """Forget what `conn` had queued (the connection broke)."""
        self._queues[conn].clear()

    def advance(self, now: float) -> list[tuple[float, str, object]]:
        """Move the schedule to `now`; returns (departure time, conn, item) of what left."""
        out = []
        while True:
            active = [(c, q) for c, q in self._queues.items() if q]
            if not active:
                self.t = max(self.t, now)
                return out
            share = self.rate / len(active)
            first = min(q[0][0] for _, q in active)
            done = self.t + first / share
            if done > now:
                for _, q in active:
                    q[0][0] -= (now - self.t) * share
                self.t = now
                return out
            for conn, q in active:
                q[0][0] -= first
                if q[0][0] <= 1e-6:
                    out.append((done, conn, q.popleft()[1]))
            self.t = done

    def next_departure(self) -> float:
        active = [q for q in self._queues.values() if q]
        if not active:
            return float("inf")
        return self.t + min(q[0][0] for q in active) * len(active) / self.rate


@dataclass
class Port:
    """The relay's end of one endpoint's socket. A new connection's port holds its hello at
    most: the big buffer comes once the hello has named it (a stranger costs a few bytes)."""
    sock: socket.socket
    conn: str = ""  # the connection it belongs to: "main" or "preempt" ("" until the hello)
    inbuf: bytearray = field(default_factory=bytearray)
    fill: int = 0  # bytes of inbuf holding input not parsed yet
    out: collections.deque = field(default_factory=collections.deque)  # [view, conn, charge]
    deadline: float = float("inf")  # time.monotonic() by which a new connection says hello
    peer: socket.socket | None = None  # a handed-over connection's destination end

    def __post_init__(self) -> None:
        if not self.inbuf:
            self.inbuf = bytearray(INBUF if self.conn else HELLO_BUF)


class Relay:
    """The link's process loop: connections come in from the source (listen) and go on to
    the destination (target), or are attached ready-made (attach)."""

    def __init__(self, clock: Clock, board: Board, bandwidth: float, rtt: float,
                 receive_room: int = 0) -> None:
        self.clock = clock
        self.board = board
        self.delay = rtt / 2
        self.ports: dict[str, Port] = {}  # "src-main", "dst-main", "src-preempt", "dst-preempt"
        self.bottleneck = {"forward": Bottleneck(bandwidth), "reverse": Bottleneck(bandwidth)}
        # per connection, multifd ones added as they come (attach)
        self.arrivals = {c: collections.deque() for c in CONNECTIONS}  # (t, frame, charge)
        # bytes in the sender's window: at the bottleneck, on the wire, or delivered and not
        # read yet (unread) past what the receiver's socket acknowledged (acked)
        self.queued = dict.fromkeys(CONNECTIONS, 0)
        self.unread = dict.fromkeys(CONNECTIONS, 0)  # delivered, the receiver has not credited
        self.receive_room = receive_room
        self.acked = dict.fromkeys(CONNECTIONS, 0)  # of unread, credited on delivery
        self.credit_due = dict.fromkeys(CONNECTIONS, 0)  # freed, not yet passed to the sender
        # select(), not epoll: epoll rounds timeouts up to whole milliseconds
        self.sel = selectors.SelectSelector()
        self.listener: socket.socket | None = None
        self.target = ""
        self.corrupt_next: set[str] = set()
        self.cut_pending: set[str] = set()
        self.events: list[tuple] = []  # ("connected"/"broken", connection) for the controller
        # whether the controller has a command waiting: it goes before a new connection, since
        # it may say where connections go now (a recovery's new address: "target")
        self.commands_waiting: Callable[[], bool] = lambda: False

    def listen(self, listen_uri: str, target_uri: str) -> str:
        self.listener = uri.listen(listen_uri)
        self.listener.setblocking(False)
        self.sel.register(self.listener, selectors.EVENT_READ, None)
        self.target = target_uri
        return uri.bound(self.listener)

    def attach(self, conn: str, src: socket.socket, dst: socket.socket) -> None:
        """Put a ready connection on the link (tests, and connections accepted earlier)."""
        self.arrivals.setdefault(conn, collections.deque())
        self.queued.setdefault(conn, 0)
        self.unread.setdefault(conn, 0)
        self.acked.setdefault(conn, 0)
        self.credit_due.setdefault(conn, 0)
        for side, sock in (("src", src), ("dst", dst)):
            sock.setblocking(False)
            port = Port(sock, conn)
            name = f"{side}-{conn}"
            if name in self.ports:
                self._close_port(name)
            self.ports[name] = port
            self.sel.register(sock, selectors.EVENT_READ, name)
        self.events.append(("connected", conn))

    def cut(self, conn: str) -> None:
        """Break a connection: both ends see it fail, and whatever was in flight is lost.
        The return path is the main connection's other direction, so it breaks with it.
        A connection being set up right now breaks as soon as it says hello."""
        conn = "main" if conn == "return" else conn
        if f"src-{conn}" not in self.ports:
            self.cut_pending.add(conn)
            return
        for side in ("src", "dst"):
            self._close_port(f"{side}-{conn}")
        lost = [conn, "return"] if conn == "main" else [conn]
        for c in lost:
            self.bottleneck[_route(c)[2]].drop(c)
            self.arrivals[c].clear()
            # none of it is owed on a new connection
            self.queued[c] = self.unread[c] = self.acked[c] = self.credit_due[c] = 0
            self._publish_queued(c)
        self.events.append(("broken", conn))

    def corrupt(self, conn: str) -> None:
        """Flip a byte of the next frame the link delivers on `conn`."""
        self.corrupt_next.add(conn)

    def step(self, max_wait: float = 0.05) -> None:
        """One turn of the loop: schedule, deliver, then wait for input or the next event."""
        now = self.clock.now()
        self._advance_all(now)
        self._deliver(now)
        self._return_credits()
        next_event = self._next_event()
        wait = _sleep_for(min(max_wait, self.clock.real_wait(next_event)))
        self._expire(time.monotonic())
        for key, mask in self.sel.select(wait) if wait else self._spin(next_event):
            if key.fileobj is self.listener:
                if not self.commands_waiting():
                    self._accept()
                continue
            if key.data not in self.ports:
                continue  # closed earlier in this turn
            if mask & selectors.EVENT_READ:
                self._read(key.data)
            if mask & selectors.EVENT_WRITE and key.data in self.ports:
                self._flush(key.data)
        self._return_credits()

    def _spin(self, t_emu: float) -> list:
        """The next event is less than SPIN_S away (or due): poll the sockets until it is due
        or one of them is ready, without turning the whole loop each time (a turn took
        15-20 us on the 2-core dev VM, and a frame due meanwhile left up to that late)."""
        while not (ready := self.sel.select(0)) and self.clock.real_wait(t_emu) > 0:
            pass
        return ready

    def close(self) -> None:
        for name in list(self.ports):
            self._close_port(name)
        if self.listener:
            self.sel.unregister(self.listener)
            self.listener.close()

    # ---- connections ----

    def _accept(self) -> None:
        """One new connection (one per turn: a hello already in is read before the next
        stranger can push it out): a source's, forwarded to the target once its hello names
        it; or, with no target (a destination program's front), one the destination hands
        over with its destination end and the bytes it had read."""
        try:
            sock, _ = self.listener.accept()
        except OSError:  # nothing after all, or out of descriptors: the next turn tries again
            return
        peer, prefix = None, b""
        if not self.target:
            handed = _handed_over(sock)
            if handed is None:
                return
            sock, peer, prefix = handed
        pending = [name for name, port in self.ports.items() if not port.conn]
        if len(pending) >= channel.MAX_PENDING:
            self._close_port(min(pending, key=lambda name: self.ports[name].deadline))
        uri.tune(sock)
        sock.setblocking(False)
        # named by the hello in its first frame; until then the connection has a number
        name = f"src-new-{sock.fileno()}"
        port = self.ports[name] = Port(sock, peer=peer,
                                       deadline=time.monotonic() + channel.HANDSHAKE_TIMEOUT)
        port.inbuf[:len(prefix)] = prefix
        port.fill = len(prefix)
        self.sel.register(sock, selectors.EVENT_READ, name)
        if prefix:
            self._parse(name)  # the hello may be in already

    def _expire(self, now: float) -> None:
        """Close the new connections that did not say their hello in time."""
        for name in [n for n, port in self.ports.items() if port.deadline <= now]:
            self._close_port(name)

    def _name(self, key: str, hello: bytes) -> str | None:
        """Rename a new connection after its hello and connect it on to the destination;
        None if it said nothing we know, or the destination is not there."""
        if hello == channel.MAIN_HELLO:
            conn = "main"
        elif (preempt_id := channel.preempt_channel_id(hello)) is not None:
            conn = channel.preempt_name(preempt_id)
        elif (multifd_id := multifd_channel_id(hello)) is not None:
            conn = f"{MULTIFD}{multifd_id}"
        else:
            return None
        port = self.ports[f"src-{key}"]
        try:
            dst, port.peer = port.peer or uri.connect(self.target), None
        except OSError:
            return None  # the destination is not listening: the source sees its connection close
        try:
            dst.sendall(channel.relayed_frame())  # before anything from the source
        except OSError:
            dst.close()
            return None
        del self.ports[f"src-{key}"]
        self.sel.unregister(port.sock)
        self.attach(conn, port.sock, dst)
        named = self.ports[f"src-{conn}"]
        named.inbuf[:port.fill] = port.inbuf[:port.fill]
        named.fill = port.fill
        if conn in self.cut_pending:
            self.cut_pending.discard(conn)
            self.cut(conn)
            return None
        return conn

    def _close_port(self, name: str) -> None:
        port = self.ports.pop(name, None)
        if port is None:
            return
        self.sel.unregister(port.sock)
        if not port.conn:
            if port.peer:
                port.peer.close()
            channel.refuse(port.sock)  # a stranger, or a hello gone wrong: an orderly no
            return
        try:
            port.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        port.sock.close()

    def _broken(self, name: str) -> None:
        """One end went away: in TCP the whole connection is gone."""
        if name not in self.ports:
            return  # already torn down with its connection
        conn = self.ports[name].conn
        if conn:
            self.cut(conn)
        else:
            key = name.split("-", 1)[1]
            for side in ("src", "dst"):
                self._close_port(f"{side}-{key}")

    # ---- data ----

    def _next_event(self) -> float:
        times = [neck.next_departure() for neck in self.bottleneck.values()]
        times += [q[0][0] for q in self.arrivals.values() if q]
        return min(times)

    def _read(self, name: str) -> None:
        port = self.ports[name]
        if port.fill == len(port.inbuf) and port.conn:  # a frame larger than the buffer
            port.inbuf.extend(bytes(len(port.inbuf)))
        try:
            with memoryview(port.inbuf) as view:
                n = port.sock.recv_into(view[port.fill:])
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            n = 0
        if not n:
            self._broken(name)
            return
        port.fill += n
        self._parse(name)

    def _parse(self, name: str) -> None:
        port = self.ports[name]
        buf, pos, now, sent = port.inbuf, 0, None, None
        while port.fill - pos >= channel.HEADER.size:
            kind, size, virt, _, _ = channel.HEADER.unpack_from(buf, pos)
            if kind == channel.CREDIT and port.conn and not size:
                if not self._credited(name, virt):
                    self._broken(name)  # a credit nobody owes: not our protocol
                    return
                pos += channel.HEADER.size
                continue
            limit = channel.MAX_FRAME if port.conn else channel.HELLO_MAX
            if kind != channel.DATA or size > limit:
                self._broken(name)  # not our framing: a stranger, or a stream gone wrong
                return
            end = pos + channel.HEADER.size + size
            if port.fill < end:
                break
            if not port.conn:  # the hello of a new connection names it
                hello = bytes(buf[pos + channel.HEADER.size:end])
                conn = self._name(name.split("-", 1)[1], hello) if name[:4] == "src-" else None
                if conn is None:
                    if name in self.ports:  # not a migration stream: close it, disturb nothing
                        self._broken(name)
                    return
                name, port = f"src-{conn}", self.ports[f"src-{conn}"]
                buf = port.inbuf  # where _name put what the new connection's port held
            if now is None:
                now = self.clock.now()
                self._advance_all(now)
            sent = _conn_from(name)
            if sent is not None:
                self._enqueue(sent, _frame(buf, pos, end), size + virt)
            pos = end
        if sent is not None:
            self._publish_queued(sent)
        # keep the start of a frame not complete yet at the front
        buf[:port.fill - pos] = buf[pos:port.fill]
        port.fill -= pos

    def _credited(self, name: str, n: int) -> bool:
        """The receiver at port `name` has read `n` bytes: they go back to their sender with
        this turn's credit (_return_credits). False if it was not given that many."""
        conn = _credited_conn(name)
        if conn is None or n > self.unread.get(conn, 0):
            return False
        self.unread[conn] -= n
        self.credit_due[conn] += n
        self._acknowledge(conn)  # less unread: less of it acknowledged ahead, already credited
        return True

    def _advance_all(self, now: float) -> None:
        for neck in self.bottleneck.values():
            for t, conn, (frame, charge) in neck.advance(now):
                self.arrivals[conn].append((t + self.delay, frame, charge))

    def _enqueue(self, conn: str, frame: bytes, charge: int) -> None:
        self.queued[conn] += charge  # published once per read (_parse), not per frame
        self.bottleneck[_route(conn)[2]].push(conn, (frame, charge), charge)

    def _deliver(self, now: float) -> None:
        lags = []
        for conn, queue in self.arrivals.items():
            receiver = _route(conn)[1]
            while queue and queue[0][0] <= now:
                t, frame, charge = queue.popleft()
                if receiver not in self.ports:
                    continue
                lags.append(now - t)
                if conn in self.corrupt_next:
                    self.corrupt_next.discard(conn)
                    frame[-1] ^= 0xFF
                # the receiver measures how late it gets to each frame against this time: in
                # real time, since a `link` program's emulated clock is not the destination's
                struct.pack_into("<d", frame, channel.ARRIVAL_OFFSET, self.clock.real_at(t))
                self.ports[receiver].out.append([memoryview(frame), conn, charge])
            self._flush(receiver)
        if lags:
            self._note_lags(lags)

    def _note_lags(self, lags: list[float]) -> None:
        b = self.board
        b.add("frames", len(lags))
        b.add("lag-sum", sum(lags))
        b["lag-max"] = max(b["lag-max"], *lags)
        b.add("late-frames", sum(lag > LATE for lag in lags))

    def _flush(self, name: str) -> None:
        """Write what `name` has waiting, many frames per system call."""
        port = self.ports.get(name)
        if port is None:
            return
        out = port.out
        while out:
            try:
                sent = port.sock.sendmsg([e[0] for e in itertools.islice(out, IOV_MAX)])
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._broken(name)
                return
            while out and sent >= len(out[0][0]):
                sent -= len(out[0][0])
                _, conn, charge = out.popleft()
                if conn is not None:
                    self._delivered(conn, charge)
            if sent:  # the socket is full: the rest of this frame goes next time
                out[0][0] = out[0][0][sent:]
                break
        self._want_write(name, bool(out))

    def _delivered(self, conn: str, charge: int) -> None:
        """In the receiver's socket: still the sender's until the receiver has read it, but
        for the socket's own room."""
        self.unread[conn] += charge
        self._acknowledge(conn)

    def _acknowledge(self, conn: str) -> None:
        """The receiver's socket acknowledges what it holds unread up to receive_room: the
        sender has that room back at once."""
        acked = min(self.receive_room, self.unread[conn])
        self.credit_due[conn] += acked - self.acked[conn]
        self.acked[conn] = acked

    def _return_credits(self) -> None:
        """Free the senders' windows by what the receivers have read, one credit per
        connection and turn of the loop."""
        for conn in list(self.credit_due):
            charge, sender = self.credit_due[conn], _route(conn)[0]
            if not charge:
                continue
            # zeroed first: flushing a credit may deliver frames, and credits, of another
            self.credit_due[conn] = 0
            self.queued[conn] -= charge
            self._publish_queued(conn)
            self.board.add(f"delivered-{_field(conn)}", charge)
            if sender in self.ports:
                self.ports[sender].out.append([memoryview(channel.credit_frame(charge)), None, 0])
                self._flush(sender)

    def _publish_queued(self, conn: str) -> None:
        field = _field(conn)
        self.board[f"queued-{field}"] = sum(n for c, n in self.queued.items()
                                            if _field(c) == field)

    def _want_write(self, name: str, want: bool) -> None:
        port = self.ports.get(name)
        if port is None:
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if want else 0)
        if self.sel.get_key(port.sock).events != events:
            self.sel.modify(port.sock, events, name)


def hand_over(front: str, sock: socket.socket, prefix: bytes) -> socket.socket | None:
    """Give a connection that came straight from a source to the front listening at `front`,
    with the bytes already read of it (`prefix`); the destination's end of its way through
    the front's link, or None if the front is not there. `sock` is closed here either way."""
    ours, theirs = socket.socketpair()
    try:
        with uri.connect(front) as conn:
            socket.send_fds(conn, [prefix], [sock.fileno(), theirs.fileno()])
    except OSError:
        ours.close()
        return None
    finally:
        theirs.close()  # the front has its own copies now
        sock.close()
    return uri.tune(ours)


def _handed_over(conn: socket.socket) -> tuple | None:
    """What hand_over sent on `conn`: (source's socket, destination's end, prefix)."""
    size, prefix, fds = channel.HEADER.size, b"", []
    with conn:
        try:
            conn.settimeout(HANDOVER_TIMEOUT)
            prefix, fds, _, _ = socket.recv_fds(conn, size, 2)
            while len(prefix) < size and (more := conn.recv(size - len(prefix))):
                prefix += more
        except OSError:
            pass
    socks = [socket.socket(fileno=fd) for fd in fds]
    if len(socks) != 2 or len(prefix) != size:
        for sock in socks:
            sock.close()
        return None
    return socks[0], socks[1], prefix


def _orphaned(listener: socket.socket, run_dir: str | None) -> None:
    """The program that started us vanished (killed) and cannot clean up: remove what it
    would have, by the exact paths made: our socket file if it is still ours, and the run
    directory a controller made with mkdtemp and handed us (None from `postcopy-emu link`,
    whose socket's folder is the user's)."""
    if pin := uri.bound_file(listener):
        pin.remove()
    if run_dir:
        shutil.rmtree(run_dir, ignore_errors=True)


def main(control, bufs: dict, cfg: Config, listen_uri: str, target_uri: str,
         run_dir: str | None = None) -> None:
    """The network process: relay what connects at `listen_uri` to `target_uri`; with no
    target, relay what a destination hands over there (its front). run_dir: the folder the
    program made for it, removed if the program is killed."""
    relay = Relay(Clock(bufs[shm.CLOCK]), Board(FIELDS, bufs[shm.RELAY_BOARD]),
                  cfg["link.bandwidth"], cfg["link.rtt"], receive_room(cfg["link.socket-buffer"]))
    relay.listen(listen_uri, target_uri)
    control.on_orphan = lambda: _orphaned(relay.listener, run_dir)
    if pin := uri.bound_file(relay.listener):
        control.emit(Bound(control.role, pin.file))  # the program removes it at its end
    actions = {"cut": relay.cut, "corrupt": relay.corrupt,
               "target": lambda target: setattr(relay, "target", target)}
    relay.commands_waiting = control.conn.poll
    control.emit(Ready(control.role))
    try:
        while True:
            if control.conn.poll():
                try:
                    command, *args = control.conn.recv()
                except (EOFError, OSError):
                    control.orphaned()
                if command == "quit":
                    return
                actions[command](*args)
            relay.step()
            for what, channel_name in relay.events:
                control.emit(Link(what, channel_name, relay.clock.now()))
            relay.events.clear()
    finally:
        relay.close()
