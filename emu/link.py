"""The emulated network between source and destination, like a netem box.

The relay runs in its own process. It keeps the link's schedule in emulated time instead of
sleeping per packet: every frame read from a sender is queued at the bottleneck, leaves it when
its turn and its share of the bandwidth allow (`Bottleneck`, a fluid fair-share model: the
connections with bytes waiting split the bandwidth equally), arrives one one-way delay later,
and is written to the receiver when the scaled clock reaches that time. Delivering a frame sends
a credit back to its sender (see channel.py), which bounds what each connection holds queued to
link.socket-buffer bytes.

Connections: main and preempt go source -> destination and share one bottleneck; the return
path goes destination -> source on its own (the link is full duplex).
"""

from __future__ import annotations

import collections
import selectors
import socket
import struct
from dataclasses import dataclass, field

from emu import channel
from emu.clock import SPIN_S, Clock
from emu.status import Board

CONNECTIONS = ("main", "preempt", "return")
# connection -> (sender port, receiver port, direction); ports are the relay's sockets
ROUTES = {
    "main": ("src-main", "dst-main", "forward"),
    "preempt": ("src-preempt", "dst-preempt", "forward"),
    "return": ("dst-main", "src-main", "reverse"),
}
FIELDS = tuple(f"{k}-{c}" for c in CONNECTIONS for k in ("queued", "delivered")) + (
    "lag-max", "lag-sum", "frames", "late-frames")
LATE = 10e-6  # emulated seconds past its arrival time after which a delivery counts as late


class Bottleneck:
    """Fluid fair sharing of one bottleneck among FIFO connections (processor sharing)."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.t = 0.0
        self._queues: dict[str, collections.deque] = collections.defaultdict(collections.deque)

    def push(self, conn: str, item: object, charge: int) -> None:
        """Queue `item` (costing `charge` bytes) at time self.t: call advance(now) first."""
        self._queues[conn].append([float(charge), item])

    def backlog(self, conn: str) -> float:
        return sum(entry[0] for entry in self._queues[conn])

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
    """The relay's end of one endpoint's socket."""
    sock: socket.socket
    inbuf: bytearray = field(default_factory=bytearray)
    out: collections.deque = field(default_factory=collections.deque)  # [memoryview, conn, charge]
    eof: bool = False


class Relay:
    def __init__(self, ports: dict[str, socket.socket], clock: Clock, board: Board,
                 bandwidth: float, rtt: float) -> None:
        self.ports = {name: Port(sock) for name, sock in ports.items()}
        self.clock = clock
        self.board = board
        self.delay = rtt / 2
        self.bottleneck = {"forward": Bottleneck(bandwidth), "reverse": Bottleneck(bandwidth)}
        self.arrivals = {c: collections.deque() for c in CONNECTIONS}  # (t, frame, charge)
        self.queued = dict.fromkeys(CONNECTIONS, 0)
        self.sel = selectors.DefaultSelector()
        for name, port in self.ports.items():
            port.sock.setblocking(False)
            self.sel.register(port.sock, selectors.EVENT_READ, name)

    def step(self, max_wait: float = 0.05) -> None:
        """One turn of the loop: schedule, deliver, then wait for input or the next event."""
        now = self.clock.now()
        self._advance_all(now)
        self._deliver(now)
        wait = min(max_wait, self.clock.real_wait(self._next_event()))
        if wait < SPIN_S:
            wait = 0
        for key, mask in self.sel.select(wait):
            if mask & selectors.EVENT_READ:
                self._read(key.data)
            if mask & selectors.EVENT_WRITE:
                self._flush(key.data)

    def _next_event(self) -> float:
        times = [neck.next_departure() for neck in self.bottleneck.values()]
        times += [q[0][0] for q in self.arrivals.values() if q]
        return min(times)

    def _read(self, name: str) -> None:
        port = self.ports[name]
        try:
            data = port.sock.recv(1 << 20)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            port.eof = True
            self.sel.unregister(port.sock)
            return
        port.inbuf += data
        self._parse(name, port)

    def _parse(self, name: str, port: Port) -> None:
        buf, pos, now = port.inbuf, 0, None
        while len(buf) - pos >= channel.HEADER.size:
            kind, size, virt, _ = channel.HEADER.unpack_from(buf, pos)
            end = pos + channel.HEADER.size + size
            if len(buf) < end:
                break
            conn = self._conn_from(name)
            if now is None:
                now = self.clock.now()
                self._advance_all(now)
            if kind == channel.DATA and conn is not None:
                self._enqueue(conn, bytearray(buf[pos:end]), size + virt)
            pos = end
        del buf[:pos]

    def _advance_all(self, now: float) -> None:
        for neck in self.bottleneck.values():
            for t, conn, (frame, charge) in neck.advance(now):
                self.arrivals[conn].append((t + self.delay, frame, charge))

    def _enqueue(self, conn: str, frame: bytes, charge: int) -> None:
        self.queued[conn] += charge
        self.board[f"queued-{conn}"] = self.queued[conn]
        self.bottleneck[ROUTES[conn][2]].push(conn, (frame, charge), charge)

    @staticmethod
    def _conn_from(port: str) -> str | None:
        for conn, (sender, _, _) in ROUTES.items():
            if sender == port:
                return conn
        return None

    def _deliver(self, now: float) -> None:
        for conn, queue in self.arrivals.items():
            receiver = ROUTES[conn][1]
            while queue and queue[0][0] <= now:
                t, frame, charge = queue.popleft()
                self._note_lag(now - t)
                # the receiver measures how late it gets to each frame against this time
                struct.pack_into("<d", frame, channel.ARRIVAL_OFFSET, t)
                self.ports[receiver].out.append([memoryview(frame), conn, charge])
            self._flush(receiver)

    def _note_lag(self, lag: float) -> None:
        b = self.board
        b.add("frames", 1)
        b.add("lag-sum", lag)
        if lag > b["lag-max"]:
            b["lag-max"] = lag
        if lag > LATE:
            b.add("late-frames", 1)

    def _flush(self, name: str) -> None:
        port = self.ports[name]
        while port.out:
            entry = port.out[0]
            try:
                sent = port.sock.send(entry[0])
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                port.out.clear()
                break
            entry[0] = entry[0][sent:]
            if len(entry[0]):
                break
            port.out.popleft()
            if entry[1] is not None:
                self._delivered(entry[1], entry[2])
        self._want_write(name, bool(port.out))

    def _delivered(self, conn: str, charge: int) -> None:
        self.queued[conn] -= charge
        self.board[f"queued-{conn}"] = self.queued[conn]
        self.board.add(f"delivered-{conn}", charge)
        sender = ROUTES[conn][0]
        self.ports[sender].out.append([memoryview(channel.credit_frame(charge)), None, 0])
        self._flush(sender)

    def _want_write(self, name: str, want: bool) -> None:
        port = self.ports[name]
        if port.eof:
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if want else 0)
        if self.sel.get_key(port.sock).events != events:
            self.sel.modify(port.sock, events, name)


def main(control, bufs: dict, cfg, ports: dict[str, socket.socket]) -> None:
    relay = Relay(ports, Clock(bufs["clock"]), Board(FIELDS, bufs["relay-board"]),
                  cfg["link.bandwidth"], cfg["link.rtt"])
    control.emit(("ready", control.role))
    while True:
        if control.conn.poll():
            try:
                command, *_ = control.conn.recv()
            except (EOFError, OSError):
                return
            if command == "quit":
                return
        relay.step()
