"""The floor of a page fault's path: a 4 KiB request/response ping-pong over a real link.

A fault's page request goes destination -> link -> source on the main channel's way back, and
its page comes source -> link -> destination on preempt. This measures that round trip with
nothing else in the way: the same three processes (each started as an engine child is, with
the same switch interval), the real link process, the same Endpoints, frames and messages
(REQ_PAGES; a RAM record of one 4 KiB page, header only without emulator.payload), but one
thread per side and no guest, queue or placement. What a fault costs above this is the
emulator's hand-offs between its threads (bench/overhead.py compares the two).
"""

from __future__ import annotations

import multiprocessing as mp
import shutil
import socket
import tempfile
import time

from emu import engines, shm
from emu.child import child_main
from emu.clock import Clock
from emu.config import Config
from emu.events import Error, Exit, Ready, Report
from emu.migration import wire
from emu.migration.ram import TARGET_PAGE
from emu.net import channel, uri
from emu.net.channel import Endpoint

ROLES = ("network", "source", "destination")
START_TIMEOUT = 60.0  # real seconds for the processes to start (spawn imports numpy: slow)
FLAGS = wire.RAM_SAVE_FLAG_PAGE | wire.RAM_SAVE_FLAG_CONTINUE


def measure(cfg: Config, rounds: int = 500, timeout: float = 120.0) -> dict:
    """Time `rounds` round trips at cfg's link and time scale. Returns {"rounds", "rtt-us":
    the mean round trip and "link-us": the link's own share of it (rtt and both frames at
    link.bandwidth), in emulated us, and "floor-us": the rest, the processes' own real time
    per round trip}. RuntimeError if a process fails or it takes longer than `timeout`."""
    tmp = tempfile.mkdtemp(prefix="postcopy-emu-pingpong-")
    shared = engines.Shared(cfg, ("network",))
    children: list[engines.Child] = []
    try:
        link_uri, dst_uri = f"unix:{tmp}/link.sock", f"unix:{tmp}/dst.sock"
        children.append(shared.spawn("network", cfg, link_uri, dst_uri, tmp, janitor=True))
        _ready(children[-1])
        children.append(_spawn(shared, "destination", _destination, cfg, dst_uri, rounds))
        _ready(children[-1])
        shared.clock.start(cfg["emulator.time-scale"])
        children.append(_spawn(shared, "source", _source, cfg, link_uri))
        report = _wait_report(children, timeout)
    finally:
        engines.stop(children)
        shared.close()
        shutil.rmtree(tmp, ignore_errors=True)
    link = cfg["link.rtt"] + report["bytes"] / cfg["link.bandwidth"]
    rtt = report["sum"] / rounds
    return {"rounds": rounds, "rtt-us": rtt * 1e6, "link-us": link * 1e6,
            "floor-us": (rtt - link) / cfg["emulator.time-scale"] * 1e6}


def _spawn(shared: engines.Shared, role: str, body, cfg: Config, *args) -> engines.Child:
    """A child like an engine's (emu/child.py: title, switch interval, segments), running
    `body` instead of an engine."""
    ctx = mp.get_context("spawn")
    parent, conn = ctx.Pipe()
    proc = ctx.Process(target=child_main, name=f"postcopy-emu-pingpong-{role}", daemon=True,
                       args=(role, body, conn, shared.segments.names(), cfg, *args))
    proc.start()
    conn.close()
    return engines.Child(role, proc, parent, None)


def _ready(child: engines.Child) -> None:
    """Wait for the child's Ready (the link says first where it bound: our folder's file)."""
    deadline = time.monotonic() + START_TIMEOUT
    while child.conn.poll(max(deadline - time.monotonic(), 0)):
        try:
            event = child.recv()
        except (EOFError, OSError):
            raise RuntimeError(f"ping-pong: {child.death()}") from None
        if isinstance(event, Ready):
            return
        if isinstance(event, Error):
            raise RuntimeError(f"ping-pong: {event.role}: {event.message}")
    raise RuntimeError(f"ping-pong: the {child.role} process did not start")


def _wait_report(children: list[engines.Child], timeout: float) -> dict:
    """The destination's report; a child that fails or dies before its Exit is an error
    (the source ends as soon as the destination closes, maybe before the report is read)."""
    deadline, live = time.monotonic() + timeout, list(children)
    while time.monotonic() < deadline:
        for child in list(live):
            while child in live and child.conn.poll(0.05):
                try:
                    event = child.recv()
                except (EOFError, OSError):
                    raise RuntimeError(f"ping-pong: {child.death()}") from None
                if isinstance(event, Error):
                    raise RuntimeError(f"ping-pong: {event.role}: {event.message}")
                if isinstance(event, Report):
                    return event.report
                if isinstance(event, Exit):
                    live.remove(child)
    raise RuntimeError(f"ping-pong: not done after {timeout:g} real seconds")


# ---- the two ends, each in its own process ----

def _source(control, bufs: dict, cfg: Config, address: str) -> None:
    """Connect main and preempt as the source does; answer each REQ_PAGES with its page on
    preempt, from the thread that reads the requests."""
    window, wakeup = cfg["link.socket-buffer"], cfg["link.write-wakeup"]
    main = Endpoint(uri.connect(address), window, "main", wakeup=wakeup)
    main.send([channel.MAIN_HELLO])
    preempt = Endpoint(uri.connect(address), window, "preempt", wakeup=wakeup)
    preempt.send([channel.PREEMPT_HELLO])
    preempt.read_credits_in_background()
    page = memoryview(bytes(TARGET_PAGE)) if cfg["emulator.payload"] else None
    control.emit(Ready(control.role))
    try:
        while True:
            offset, _ = wire.parse_req_pages(*wire.decode_rp(main.recv()))
            header = wire.ram_header(offset, 1, FLAGS)
            if page is None:
                preempt.send([header], virt=TARGET_PAGE)
            else:
                preempt.send([header, page])
    except channel.ChannelError:
        pass  # the destination is done and closed


def _destination(control, bufs: dict, cfg: Config, address: str, rounds: int) -> None:
    """Take the two channels the link brings, then ask for a page and wait for it, `rounds`
    times; report the sum of the round trips (emulated s) and the bytes the link carried."""
    clock = Clock(bufs[shm.CLOCK])
    listener = uri.listen(address)
    control.emit(Ready(control.role))
    eps = dict(_accept(listener, cfg) for _ in range(2))
    listener.close()
    main, preempt = eps[channel.MAIN_HELLO], eps[channel.PREEMPT_HELLO]
    main.read_credits_in_background()  # the listen thread's job, on main
    payload = cfg["emulator.payload"]
    page_charge = len(wire.ram_header(0, 1, FLAGS)) + TARGET_PAGE  # as the link charges it
    total, charged = 0.0, 0
    for i in range(rounds):
        request = wire.req_pages(i * TARGET_PAGE, TARGET_PAGE, i == 0)
        t0 = clock.now()
        main.send([request])
        record = wire.decode_main(preempt.recv(), payload)
        total += clock.now() - t0
        if record.npages != 1:
            raise wire.ProtocolError(f"ping-pong: {record.npages} pages came, not one")
        charged += len(request) + page_charge
    for ep in (main, preempt):
        ep.close()
    control.emit(Report(control.role, {"sum": total, "bytes": charged / rounds}))


def _accept(listener: socket.socket, cfg: Config) -> tuple[bytes, Endpoint]:
    """One connection through the link: its RELAYED mark, its hello, then an Endpoint."""
    sock, _ = listener.accept()
    hello = channel.Hello(uri.tune(sock), time.monotonic() + channel.HANDSHAKE_TIMEOUT)
    sock.settimeout(channel.HANDSHAKE_TIMEOUT)
    while (payload := hello.read()) is None:
        pass
    sock.settimeout(None)
    name = "main" if payload == channel.MAIN_HELLO else "preempt"
    return payload, Endpoint(sock, cfg["link.socket-buffer"], name)
