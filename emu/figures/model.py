"""The analytical page-fault latency model (docs/concepts.md, "The latency model"), with its
inputs read off this emulator's mechanism.

One fault costs L = rtt + software + queued + rest + page + shared, each a time:

- vanilla:                  L = RTT + c + (S + r) / D + P / B
- preempt, break-huge off:  L = RTT + c + r / D + (P + min(P, S)) / B
- preempt (break-huge on):  L = RTT + c + r / D + (P + min(P, S)) / B, with a smaller r
- preempt-full (8.0):       L = RTT + c + (P + min(P, S)) / B

B is link.bandwidth, RTT link.rtt, P guest.page-size. What the other letters are here:

D, the pace of main's receiver (main_drain()): B, unless the listen thread takes longer to
place a record than the link to bring it.

S, the backlog ahead of the urgent page on main. The link holds at most link.socket-buffer
bytes of one connection, queued at the bottleneck or on the wire (channel.py's credits), and a
record enters only when it fits whole, so a full window holds n = floor(window / record)
records (record = emulator.chunk plus its header). Of those, B * RTT/2 bytes are already on the
wire, and their time is the second half of RTT: S = n * record - B * RTT/2.

r, the rest of what the migration thread must write on main before it looks at the request
queue again; a request arrives at a random point of it, so on average half a unit U. U is one
record (emulator.chunk) for 4 KiB pages, whose runs share records; for huge pages it is the whole
host page (vanilla, break-huge off), or one record of it with break-huge, which checks the queue
between records. T/B (break-huge on, T = 4 KiB) is this term for QEMU, whose thread checks
before every 4 KiB piece: it is the second mode of QEMU 7.1's histogram, the migration thread
blocked in write() on a full main socket. Here the write granularity is emulator.chunk, not T.
With link.write-wakeup K, a thread blocked on a full main sleeps until K more bytes than its
record have drained, then writes records back to back (looking at the queue between them)
until main is full again: it looks at the queue once per K + record bytes drained, so
r = max(U, K + record) / 2 for a request arriving at a random moment (see Arrivals below for
back-to-back faults), and the request finds main holding only what is left below the wake-up
mark, W - K (a huge page sent whole ends anywhere in a wake-up's records: W - K/2).

shared: with preempt the urgent page crosses the bottleneck beside main, at half the bandwidth
while main has bytes waiting, so main adds min(P, S) / B. The migration thread goes back to main
right after writing the urgent page and keeps it full, so this is P / B whenever S >= P.

c, the software cost: the emulator's own work per fault (fault thread, return-path thread,
migration thread, relay, placement, waking the vCPU) takes about SOFTWARE_COST_S of real time,
which is SOFTWARE_COST_S * emulator.time-scale of emulated time. Pass software_cost to model
another machine, or 0 for the network alone.

max-postcopy-bandwidth: like QEMU 7.1/7.2, the source lets rate x 100 ms through at full speed
at the start of each 100 ms window, then sleeps (ram_save.Pacer, source._rate_limit). So main
is full while the migration thread is blocked in that burst (the formula above), then drains
what the socket holds while the thread sleeps. A request made while it sleeps waits, with 4 KiB
pages, until the window ends (QEMU's gate in qemu_savevm_state_iterate(): r = B x the rest of
the window, half of the sleep on average) and then goes first; with huge pages the thread sleeps
inside a host page, and break-huge serves it at once (r = 0), vanilla or break-huge off after
the rest of the page (r = P/2). A cap small enough that one window's bytes fit in the socket
never blocks the thread. The model averages the formula over these phases, weighted by their
duration: the latency of a request that arrives at a random time (back-to-back: see Arrivals).

preempt-full (migration.design 8.0 or 10.1 with preempt): the return-path thread sends the page
as soon as it reads the request, so there is no wait for the migration thread's next look (r = 0,
in every phase of a capped stream too: the gate and the sleep are the migration thread's). What
is left is the bitmap_mutex it shares with the migration thread, which holds it only to claim
pages (microseconds, not modelled), and main's share of the link (min(P, S) / B). The save costs
move from the migration thread to the return-path thread: the same sum in cpu_time().

Arrivals: r = U / 2 and the phases assume requests arriving at random points of the main
stream, which is what a workload with gaps between its faults gives. A vCPU faulting back to
back (workload.pattern=random: in postcopy nearly every touch misses) instead sends each request
a fixed time X after the look that sent its previous page, and waits for the first look after
that (see _rest): with X within one period between looks, the latency is that period. When X
spans more than three periods, its jitter spreads the phase and U / 2 holds again.
A vCPU faulting back to back also fits more faults into the quick phases of a capped stream:
a phase of share s and latency L holds s / L of its faults, and the model weighs phases so;
with 4 KiB pages its one fault per window made while the thread sleeps waits for the next
window, from a time X after the last page left (_window_waits).

A vCPU walking its slice in order (workload.pattern sequential or ab) asks for no page once
its first request moved the scan next to it: it follows the stream (_stream_wait), except in
preempt-full, whose urgent pages leave the scan where it was.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from emu.config import Config
from emu.cpu import Costs
from emu.figures import timescale
from emu.migration import versions, wire
from emu.migration.layout import zone_batchsize
from emu.migration.ram import TARGET_PAGE
from emu.migration.ram_save import Pacer
from emu.migration.workload import SLICED
from emu.units import format_duration, format_rate, format_size

MODES = ("vanilla", "preempt-no-break-huge", "preempt")  # QEMU 7.1's, as predict_all() gives
FULL = "preempt-full"  # QEMU 8.0's preempt (migration.design 8.0 or 10.1)
MODE_TITLES = {
    "vanilla": "vanilla postcopy",
    "preempt-no-break-huge": "postcopy-preempt, break-huge off",
    "preempt": "postcopy-preempt, break-huge on",
    FULL: "postcopy-preempt, 8.0 preempt-full",
}
# term -> what it is, in the order of the sum
TERMS = {
    "rtt": "RTT: the request out, the page back",
    "software": "c: the emulator's own work, x time-scale",
    "queued": "S/D: the main backlog ahead (vanilla), at its receiver's pace",
    "rest": "r/D: until the migration thread next looks at the queue",
    "page": "P/B: the page itself",
    "shared": "min(P,S)/B: main's share of the link (preempt)",
    "cpu": "t: QEMU's threads' CPU time on the way (cpu.*)",
    "stream": "the stream ahead of a vCPU that follows it (sliced patterns)",
}
# Measured: the emulator's real time per fault beyond the link's own delays, with 4 KiB pages,
# preempt and an idle main, on an idle 2-core machine with the relay waking on time: 0.55 ms
# at time-scale 0.05, 0.40 ms at 0.1 and 0.2, 0.33 ms at 0.5 and 1. 0.4 ms fits the
# time-scales that give exact figures (0.05 to 0.2) within 10 us of emulated time.
SOFTWARE_COST_S = 400e-6
# A back-to-back request coming back within this many cycles keeps a phase the model can tell;
# later, a small error in X (where the page lands among records, the software cost) could put
# it anywhere in the cycle. Measured: locked at 1, 2 and 3 cycles (4K preempt, 1G and 2M pages
# at 1 and 10 Gbit/s), spread at 6 and more (4K vanilla).
LOCKED_CYCLES = 3
DRAIN_STEPS = 100  # points at which the draining phase of a capped stream is sampled


class ModelError(ValueError):
    """A scenario the model has nothing to say about (no postcopy: no page faults)."""


@dataclass(frozen=True)
class Inputs:
    """The model's inputs for one request: bytes, bytes/s and seconds."""

    bandwidth: float  # B
    rtt: float  # RTT
    page_size: int  # P
    backlog: float  # S
    rest: float  # r
    software: float  # c, emulated seconds
    drain: float = 0.0  # D, bytes/s main's receiver takes (0: the link's B)


def latency_terms(mode: str, x: Inputs) -> dict[str, float]:
    """Section 8's formula: each term of the sum in seconds, for one of MODES."""
    if mode not in MODE_TITLES:
        raise ModelError(f"unknown mode {mode!r} (modes: {', '.join(MODE_TITLES)})")
    b = x.bandwidth
    d = x.drain or b  # main's backlog and the thread blocked on it go at its receiver's pace
    vanilla = mode == "vanilla"
    return {
        "rtt": x.rtt,
        "software": x.software,
        "queued": x.backlog / d if vanilla else 0.0,
        "rest": x.rest / d,
        "page": x.page_size / b,
        "shared": 0.0 if vanilla else min(x.page_size, x.backlog) / b,
    }


def mode_of(cfg: Config) -> str:
    """Which of MODES the scenario runs; ModelError without postcopy."""
    if not cfg["migration.postcopy-ram"]:
        raise ModelError("migration.postcopy-ram is false: precopy only has no page faults")
    if not cfg["migration.postcopy-preempt"]:
        return "vanilla"
    if versions.preempt_full(cfg):
        return FULL
    if cfg["migration.x-postcopy-preempt-break-huge"]:
        return "preempt"
    return "preempt-no-break-huge"


def _record(cfg: Config) -> int:
    """Payload bytes of one background write: runs of small pages fill a whole chunk."""
    chunk = cfg["emulator.chunk"]
    return chunk if cfg.page_size == TARGET_PAGE else min(chunk, cfg.page_size)


def _on_wire(cfg: Config, payload: int) -> int:
    """A write's bytes on the wire, its records' headers included."""
    return wire.pages_bytes(payload // TARGET_PAGE, wire.record_pages(cfg.page_size))


def _unit(cfg: Config, mode: str) -> int:
    """What the migration thread writes on main between two looks at the request queue."""
    if cfg.page_size == TARGET_PAGE or mode == "preempt":
        return _record(cfg)
    return cfg.page_size


def _held(cfg: Config, mode: str) -> int:
    """Bytes main holds in the link when the urgent page follows: whole records below the mark
    where a blocked migration thread wakes up."""
    record = _on_wire(cfg, _record(cfg))
    wakeup = cfg["link.write-wakeup"]
    mark = cfg["link.socket-buffer"] - (wakeup if _unit(cfg, mode) == _record(cfg) else wakeup / 2)
    return max(1, int(mark // record)) * record


def _back_to_back(cfg: Config) -> bool:
    """Each vCPU faults again as soon as its page arrives: touches of random pages nearly all
    miss in postcopy (workload.pattern=random)."""
    return cfg["workload.pattern"] == "random"


def _rest(cfg: Config, mode: str, backlog: float, software: float) -> float:
    """r while main is full. The thread looks at the queue after each unit, and at most once
    per wake-up (write-wakeup + one record) when it sleeps on a full main: once per `cycle`
    bytes drained. A request arriving at a random moment waits half a cycle on average.

    A vCPU faulting back to back sends its next request a fixed time X after the look that
    sent its last page (the page's way over, a round trip, the software cost, one touch), and
    it waits for the first look after that: k cycles - X, k = ceil(X / cycle). Within one
    cycle the latency is the cycle whatever X is; within two (a 1 GiB page sent whole: the
    request comes back just after the thread started the next one) it is two. Over more than
    LOCKED_CYCLES, half a cycle on average again."""
    cycle = max(_unit(cfg, mode), cfg["link.write-wakeup"] + _record(cfg))
    if _back_to_back(cfg):
        x = _rest_x(cfg, mode, backlog, software)
        k = math.ceil(x / cycle)
        if k <= LOCKED_CYCLES:
            return k * cycle - x
    return cycle / 2


def _rest_x(cfg: Config, mode: str, backlog: float, software: float) -> float:
    """X in bytes at link speed: from the look that sent a back-to-back vCPU's page to its
    next request at the source (the page's way over, a round trip, the software cost, one
    touch)."""
    b, page = cfg["link.bandwidth"], cfg.page_size
    ahead = backlog if mode == "vanilla" else min(page, backlog)
    return b * (cfg["link.rtt"] + software + cfg["workload.touch-cost"]) + page + ahead


def _busy_rest(cfg: Config, mode: str, backlog: float, software: float) -> float:
    """r while main is full, with the migration thread's CPU time per record (cpu.save-page,
    cpu.write, cpu.write-byte): c a record, a share rho = c B / record of the time. Woken on a
    full main, the thread no longer refills it at once: it writes records for T_b while the
    link drains, looking at the queue after each, then sleeps T_s, the wake-up cycle's drain
    (_rest's cycle / B): the period is T = T_s / (1 - rho), T_b = T - T_s.

    At random moments a request waits T_s / 2 if it lands in the sleep, c / 2 in the busy
    part. A vCPU faulting back to back sends its next request X after the look that served
    the last (_rest's x / B): within the busy part it is served at the next look, so one cycle
    serves m = floor(T_b / (X + c / 2)) + 1 requests and the last waits for the next wake-up:
    X + wait is T / m on average. Huge pages sent whole (unit > record) look only between host
    pages, whatever the CPU time: _rest as it is. rho >= 1: never blocked, a look per record."""
    costs = Costs.from_config(cfg)
    record = _record(cfg)
    c = costs.save(record // TARGET_PAGE, _on_wire(cfg, record))
    b = cfg["link.bandwidth"]
    rho = c * b / _on_wire(cfg, record)
    if rho <= 0 or _unit(cfg, mode) > record:
        return _rest(cfg, mode, backlog, software)
    if rho >= 1:
        return b * c / 2
    t_s = max(_unit(cfg, mode), cfg["link.write-wakeup"] + record) / b
    period = t_s / (1 - rho)
    t_b = period - t_s
    if not _back_to_back(cfg):
        return b * (t_s * t_s / 2 + t_b * c / 2) / period
    x = _rest_x(cfg, mode, backlog, software) / b
    if x >= period:  # spans cycles: _rest's locked or random cases, on the longer period
        k = math.ceil(x / period)
        return b * ((k * period - x) if k <= LOCKED_CYCLES else period / 2)
    m = math.floor(t_b / (x + c / 2)) + 1
    return b * max(0.0, period / m - x)


def _phases(cfg: Config, mode: str, software: float) -> list[tuple[float, float, float]]:
    """(share of the time, S, r) of each state main can be in when a request arrives; the
    first is main full, with the migration thread blocked writing it."""
    bandwidth = cfg["link.bandwidth"]
    on_wire = bandwidth * cfg["link.rtt"] / 2
    held = _held(cfg, mode)
    backlog = max(0.0, held - on_wire)
    full = (backlog, _busy_rest(cfg, mode, backlog, software))
    if not _capped(cfg):
        phases = [(1.0, *full)]
    else:
        blocked, drained = _window(cfg, mode)
        phases = [(blocked / Pacer.WINDOW, *full), *_asleep(cfg, mode, blocked, drained, on_wire)]
    if mode == FULL:  # no look to wait for: the return-path thread sends it at once
        return [(share, s, 0.0) for share, s, _ in phases]
    return phases


def _capped(cfg: Config) -> bool:
    return 0 < cfg["migration.max-postcopy-bandwidth"] < cfg["link.bandwidth"]


def _window(cfg: Config, mode: str) -> tuple[float, float]:
    """A capped window: how long the migration thread is blocked on a full main while it
    writes the window's budget (seconds), and the bytes main holds when it stops."""
    burst = cfg["migration.max-postcopy-bandwidth"] * Pacer.WINDOW
    held = _held(cfg, mode)
    return max(0.0, burst - held) / cfg["link.bandwidth"], min(burst, held)


def _asleep(cfg: Config, mode: str, blocked: float, drained: float,
            on_wire: float) -> list[tuple[float, float, float]]:
    """(share, S, r) while the migration thread sleeps over budget, from `blocked` to the
    window's end, main draining meanwhile. With 4 KiB pages it sleeps in migration_thread():
    woken by a request, it meets qemu_savevm_state_iterate()'s gate, so the request waits
    until the window ends (r = B x that wait) and its page then goes first, behind what main
    still holds then. With huge pages it sleeps inside a host page: break-huge serves the
    request at once; otherwise the rest of the page goes first, half a page on average."""
    bandwidth = cfg["link.bandwidth"]
    sleep = Pacer.WINDOW - blocked
    if cfg.page_size == TARGET_PAGE:
        at_start = max(0.0, drained - bandwidth * sleep - on_wire)
        return [(sleep / Pacer.WINDOW / DRAIN_STEPS, at_start,
                 bandwidth * sleep * (1 - (k + 0.5) / DRAIN_STEPS)) for k in range(DRAIN_STEPS)]
    rest = 0.0 if mode == "preempt" else _unit(cfg, mode) / 2
    step = drained / bandwidth / Pacer.WINDOW / DRAIN_STEPS
    phases = [(step, max(0.0, (k + 0.5) / DRAIN_STEPS * drained - on_wire), rest)
              for k in range(DRAIN_STEPS)]
    return [*phases, (sleep / Pacer.WINDOW - step * DRAIN_STEPS, 0.0, rest)]


def _window_waits(cfg: Config, mode: str, one: Inputs,
                  full: tuple[float, float]) -> list[tuple[float, float, float]] | None:
    """(faults per window, S, r) for a vCPU faulting back to back under a cap, 4 KiB pages;
    None elsewhere. It faults n = blocked / L times while main is full, then once more
    while the thread sleeps: that request waits for the next window, a time X after the look
    that sent the last page (the page's way, a round trip, the software cost, the threads'
    CPU time, one touch), and its page goes first. So about one page per window once the
    burst fits the socket."""
    if mode == FULL or not (_back_to_back(cfg) and _capped(cfg) and cfg.page_size == TARGET_PAGE):
        return None  # (preempt-full: no window to wait for)
    blocked, drained = _window(cfg, mode)
    b = one.bandwidth
    cpu = cpu_time(cfg, mode, full[0])
    latency_full = cpu + sum(latency_terms(mode, replace(one, backlog=full[0],
                                                         rest=full[1])).values())
    x = one.page_size / b + one.rtt + one.software + cpu + cfg["workload.touch-cost"]
    wait = max(0.0, Pacer.WINDOW - blocked - x)
    at_start = max(0.0, drained - b * (Pacer.WINDOW - blocked) - b * one.rtt / 2)
    return [(blocked / latency_full, *full), (1.0, at_start, b * wait)]


def main_drain(cfg: Config) -> float:
    """D, the bytes per second main's receiver takes: the link's B, or less when the listen
    thread places a record of small pages in more time than the link takes to bring it
    (cpu.place-*): the window is the receiver's (emu/net/link.py), so main's backlog then
    drains at the thread's pace. Huge pages are read as their records come and placed once
    whole, which the window's bytes in flight cover (a gap the model leaves: a placement
    longer than the window takes to cross, 1 GiB pages at the defaults, stalls main)."""
    b = cfg["link.bandwidth"]
    if cfg.page_size != TARGET_PAGE:
        return b
    record = _record(cfg)
    place = Costs.from_config(cfg).place(record // TARGET_PAGE, TARGET_PAGE)
    return min(b, _on_wire(cfg, record) / place) if place > 0 else b


def cpu_time(cfg: Config, mode: str, backlog: float) -> float:
    """t, the CPU time of QEMU's threads (the cpu.* keys, emu/cpu.py) one fault waits for, in
    seconds, with S = `backlog` bytes ahead on main: the fault thread's per request, the
    return-path thread's per message, the migration thread's on the urgent page's first record
    (the rest of a huge page goes while the link carries the first: the link is slower), and the
    placement of the page by the thread of its channel. In vanilla with a backlog, the listen
    thread is still placing the background unit the urgent page arrived right behind (a record of
    small pages, or a huge page) for what that takes beyond the urgent page's own P / B; the
    preempt thread has nothing else to do. Not here: a request arriving while the migration
    thread is busy with a background record waits for the rest of it (a few us a record at the
    defaults: small next to r / B, which covers the record's way over the link)."""
    costs = Costs.from_config(cfg)
    page, b = cfg.page_size, cfg["link.bandwidth"]
    record = _record(cfg)
    save = costs.save_record(page, record)
    t = costs.fault_request + costs.return_path_message + save + costs.place(1, page)
    if backlog > 0 and mode == "vanilla":
        ahead = costs.place(max(1, record // page), page)
        t += max(0.0, ahead - page / b)
    return t


def _follows(cfg: Config, mode: str) -> bool:
    """A vCPU walking its slice in order behind a request that moved the scan next to it
    (every mode but preempt-full, whose return-path thread has a scan position of its own),
    on a stream that never sleeps (a cap's windows are not modelled for it)."""
    return cfg["workload.pattern"] in SLICED and mode != FULL and not _capped(cfg)


def _stream_wait(cfg: Config) -> float | None:
    """The mean fault of a vCPU that follows the stream (docs/concepts.md, "The guest's
    layout"). It eats a record's pages as soon as the record is in, then waits for the next:
    rec x (page time - touch). With workload.prefault-threads N its slice is runs of the guest
    kernel's batch, one run in N of the stream on average, so once a run a fault waits for
    the (N - 1) x batch pages of the other threads' runs the scan sends before its next one,
    while they are within main's window; None when they are not (the next run is then
    requested: an urgent page, as the other patterns')."""
    rec = wire.record_pages(cfg.page_size)  # a huge page is placed once all of it is in
    if cfg.page_size == TARGET_PAGE:
        rec = min(rec, max(1, cfg["emulator.chunk"] // TARGET_PAGE))
    page_time = wire.pages_bytes(rec, rec) / rec / cfg["link.bandwidth"]
    fast = rec * max(0.0, page_time - cfg["workload.touch-cost"])
    threads = cfg["workload.prefault-threads"]
    if threads == 1:
        return fast
    batch = zone_batchsize(cfg["guest.ram"] // TARGET_PAGE)
    gap = (threads - 1) * batch
    if wire.pages_bytes(gap, rec) > cfg["link.socket-buffer"]:
        return None
    faults_per_run = max(1.0, batch / rec)
    return (gap * page_time + (faults_per_run - 1) * fast) / faults_per_run


def predict(cfg: Config, software_cost: float = SOFTWARE_COST_S) -> dict[str, Any]:
    """The predicted mean page-fault latency of the scenario, in us, and its terms.

    {"mode", "latency-us", "terms-us": {term: us}, "inputs": {...}}; see TERMS. software_cost
    is the emulator's real time per fault (seconds), charged x emulator.time-scale (auto: the
    scale the rule picks, emu/figures/timescale.py, without running a calibration).
    """
    cfg, _ = timescale.resolve(cfg, measure=False)
    mode = mode_of(cfg)
    one = Inputs(cfg["link.bandwidth"], cfg["link.rtt"], cfg.page_size, 0.0, 0.0,
                 software_cost * cfg["emulator.time-scale"], main_drain(cfg))
    in_time = _phases(cfg, mode, one.software + cpu_time(cfg, mode, 0.0))
    per_window = _window_waits(cfg, mode, one, in_time[0][1:])
    phases = per_window or in_time
    each = [{**latency_terms(mode, replace(one, backlog=s, rest=r)),
             "cpu": cpu_time(cfg, mode, s)} for _, s, r in phases]
    weights = [share for share, _, _ in phases]
    if _back_to_back(cfg) and not per_window:
        # a vCPU that is always faulting sees share / L faults in a phase of latency L
        weights = [w / sum(t.values()) for w, t in zip(weights, each, strict=True)]
    weights = [w / sum(weights) for w in weights]

    def mean(values) -> float:
        return sum(w * v for w, v in zip(weights, values, strict=True))

    terms = {name: mean(t.get(name, 0.0) for t in each) * 1e6 for name in TERMS}
    stream = _stream_wait(cfg) if _follows(cfg, mode) else None
    if stream is not None:  # no page requested: the stream's own pace
        terms = {name: 0.0 for name in TERMS} | {"software": one.software * 1e6,
                                                  "stream": stream * 1e6}
    backlog = mean(s for _, s, _ in phases)
    rest = mean(r for _, _, r in phases)
    return {
        "mode": mode,
        "latency-us": round(sum(terms.values()), 3),
        "terms-us": {name: round(us, 3) for name, us in terms.items()},
        "inputs": {
            "bandwidth": one.bandwidth,
            "rtt": one.rtt,
            "page-size": one.page_size,
            "backlog": backlog,  # mean S
            "rest": rest,  # mean r
            "drain": one.drain,  # D
            "main-full": in_time[0][0],  # share of the time the migration thread is blocked on main
            "software-cost": one.software,
            "socket-buffer": cfg["link.socket-buffer"],
            "chunk": cfg["emulator.chunk"],
            "max-postcopy-bandwidth": cfg["migration.max-postcopy-bandwidth"],
            "time-scale": cfg["emulator.time-scale"],
        },
    }


def predict_all(cfg: Config, software_cost: float = SOFTWARE_COST_S) -> dict[str, dict]:
    """predict() for each of MODES, with the scenario's link, guest and emulator settings."""
    out = {}
    for mode in MODES:
        sets = [
            "migration.design=7.1",  # the modes of 7.1 (break-huge is a 7.1 property)
            "migration.postcopy-ram=true",
            f"migration.postcopy-preempt={mode != 'vanilla'}",
            f"migration.x-postcopy-preempt-break-huge={mode == 'preempt'}",
        ]
        out[mode] = predict(cfg.with_overrides(sets), software_cost)
    return out


def format_prediction(pred: dict[str, Any]) -> str:
    """A readable table of the terms of one predict() result."""
    x = pred["inputs"]
    scale, unit = (1e3, "ms") if pred["latency-us"] >= 1e4 else (1.0, "us")
    cap = x["max-postcopy-bandwidth"]
    lines = [
        f"predicted page-fault latency, {MODE_TITLES[pred['mode']]}",
        f"  link {format_rate(x['bandwidth'])}, rtt {format_duration(x['rtt'])}, "
        f"socket buffer {format_size(x['socket-buffer'])}; page {format_size(x['page-size'])}, "
        f"chunk {format_size(x['chunk'])}, time-scale {x['time-scale']:g}",
        f"  background {'cap ' + format_rate(cap) if cap else 'unlimited'}: main full "
        f"{x['main-full']:.0%} of the time; mean S = {x['backlog']:.0f} B, "
        f"r = {x['rest']:.0f} B",
        "",
    ]
    width = max(len(text) for text in TERMS.values())
    for name, text in TERMS.items():
        lines.append(f"  {name:<9}{text:<{width}} {pred['terms-us'][name] / scale:10.3f} {unit}")
    lines.append(f"  {'total':<9}{'':<{width}} {pred['latency-us'] / scale:10.3f} {unit}")
    if pred["terms-us"]["stream"]:
        lines += ["  for a vCPU that follows the stream (its pattern walks its slice in order, and",
                  "  its first request moved the scan next to it): compare with a run's average",
                  "  over all its faults"]
        return "\n".join(lines)
    channel = "main" if pred["mode"] == "vanilla" else "preempt"
    lines += [f"  for faults whose page goes out as an urgent page, on {channel}: compare with a",
              f"  run's average for {channel}; a page already in flight on main when requested",
              "  waits for main, whatever the mode"]
    return "\n".join(lines)
