"""QEMU's own trace events, read back: which page each request was for and when it was served.

QEMU's "log" trace backend with `-msg timestamp=on` writes one line per event,
`TID@SECONDS.MICROSECONDS:name arguments`, the time from gettimeofday(), so the source's and
the destination's lines (two processes on one host) share one clock. The formats parsed here
are those of QEMU 7.2's migration/trace-events.

A request is followed through both processes by its host page: on the destination
`postcopy_ram_fault_thread_request` (the fault thread read the fault; its rb offset is
rounded down to the host page) and `postcopy_page_req_add` (the page joined the requested
tree and a request goes out), on the source `migrate_handle_rp_req_pages` (the return-path
thread read it), `ram_save_queue_pages` (it is queued) and `get_queued_page` (the migration
thread took it from the queue), then on the destination `postcopy_page_req_del` (the
UFFDIO_COPY that placed the page and woke the vCPU is done; the requested tree forgets the
page) and `postcopy_place_page` just after it.

Latency is fault-thread request to the vCPU's wake-up: req_del, or the same thread's next
fault if that comes first. On a loaded host the placing thread is often preempted by the vCPU
it has just woken, and req_del is traced up to a scheduler tick late (0.3 ms seen on 2
cores), while a thread cannot fault again before it is awake.
"""

from __future__ import annotations

import bisect
import re
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

# The events each side traces (-trace events=FILE; a trailing * is a glob in QEMU).
DESTINATION_EVENTS = (
    "postcopy_ram_fault_thread_request",
    "postcopy_page_req_add",
    "postcopy_page_req_del",
    "postcopy_place_page",
    "postcopy_place_page_zero",
    "postcopy_preempt_*",
    "postcopy_ram_incoming_cleanup_blocktime",
)
SOURCE_EVENTS = (
    "migrate_handle_rp_req_pages",
    "ram_save_queue_pages",
    "get_queued_page",
    "get_queued_page_not_dirty",
    "postcopy_preempt_*",
    "postcopy_start",
)
RATE_LIMIT_EVENTS = ("migration_rate_limit_pre", "migration_rate_limit_post")

_LINE = re.compile(r"^(\d+)@(\d+)\.(\d{6}):(\w+) ?(.*)$")
_HEX = r"(?:0x)?([0-9a-fA-F]+)"
# name -> (arguments' format, how to read each field: x hex, d decimal, s text)
_ARGS = {
    "postcopy_ram_fault_thread_request": (
        rf"Request for HVA={_HEX} rb=(\S+) offset={_HEX} pid=(\d+)", "xsxd"),
    "postcopy_page_req_add": (rf"new page req {_HEX} total (\d+)", "xd"),
    "postcopy_page_req_del": (rf"resolved page req {_HEX} total (\d+)", "xd"),
    "postcopy_place_page": (rf"host={_HEX}", "x"),
    "postcopy_place_page_zero": (rf"host={_HEX}", "x"),
    "migrate_handle_rp_req_pages": (rf"in (\S+) at {_HEX} len {_HEX}", "sxx"),
    "ram_save_queue_pages": (rf"(\S+): start: {_HEX} len: {_HEX}", "sxx"),
    "get_queued_page": (rf"(\S+)/{_HEX} page_abs={_HEX}", "sxx"),
    "get_queued_page_not_dirty": (rf"(\S+)/{_HEX} page_abs={_HEX}", "sxx"),
    "migration_rate_limit_pre": (r"(-?\d+)", "d"),
    "migration_rate_limit_post": (r"urgent: (\d+)", "d"),
    "postcopy_ram_incoming_cleanup_blocktime": (r"total blocktime (\d+)", "d"),
}
_FORMATS = {name: (re.compile(fmt), kinds) for name, (fmt, kinds) in _ARGS.items()}
_READ = {"x": lambda t: int(t, 16), "d": int, "s": str}


@dataclass(frozen=True)
class Event:
    time: float  # seconds since the epoch
    tid: int
    name: str
    args: tuple  # the format's fields, numbers as int, hex as int

    def __lt__(self, other: Event) -> bool:
        return self.time < other.time


def parse(lines: Iterable[str]) -> Iterator[Event]:
    """The trace lines that are events, parsed; other lines (QEMU's error reports) skipped."""
    for line in lines:
        m = _LINE.match(line.rstrip("\n"))
        if m is None:
            continue
        tid, sec, usec, name, rest = m.groups()
        fmt, kinds = _FORMATS.get(name, (None, ""))
        fields = fmt.match(rest) if fmt else None
        if fields:
            args = tuple(_READ[k](g) for k, g in zip(kinds, fields.groups(), strict=True))
        else:
            args = (rest,)
        yield Event(int(sec) + int(usec) / 1e6, int(tid), name, args)


def read(path: str) -> list[Event]:
    with open(path, errors="replace") as log:
        return list(parse(log))


@dataclass
class Request:
    """One page request, from the destination's fault thread to the page being placed.
    Times are seconds since the epoch; None where the trace has no such event."""

    host: int  # the destination's host address of the page (host page aligned)
    offset: int  # the page's offset in its RAMBlock
    hva: int  # the faulting address
    pid: int  # the faulting thread
    fault: float
    at_source: float | None = None  # migrate_handle_rp_req_pages
    unqueued: float | None = None  # get_queued_page
    already_sent: float | None = None  # get_queued_page_not_dirty: the stream sent it first
    resolved: float | None = None  # postcopy_page_req_del
    next_fault: float | None = None  # the same thread's next fault, if any

    @property
    def woken(self) -> float | None:
        """When the faulting thread was awake again, at the latest."""
        times = [t for t in (self.resolved, self.next_fault) if t is not None]
        return min(times) if self.resolved is not None else None

    @property
    def latency(self) -> float | None:
        return None if self.woken is None else self.woken - self.fault


@dataclass
class Fault:
    """One fault the destination's fault thread read (requested or not)."""

    time: float
    pid: int
    hva: int
    offset: int


@dataclass
class Trace:
    """Both sides' events, put together per request."""

    requests: list[Request] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    placed: list[float] = field(default_factory=list)  # every placement, requested or not
    rate_limit_sleeps: list[tuple[float, float, bool]] = field(default_factory=list)
    block_base: int | None = None  # host address of guest RAM offset 0 on the destination
    blocktime_ms: int | None = None  # postcopy_ram_incoming_cleanup_blocktime

    def latencies(self) -> list[float]:
        return [r.latency for r in self.requests if r.latency is not None]


def assemble(destination: list[Event], source: list[Event]) -> Trace:
    trace = Trace()
    pending: dict[int, Request] = {}  # host page -> request not yet resolved
    last_fault: dict[int, Fault] = {}  # fault thread tid -> its last fault
    for ev in sorted(destination):
        if ev.name == "postcopy_ram_fault_thread_request" and len(ev.args) == 4:
            hva, _rb, offset, pid = ev.args
            fault = Fault(ev.time, pid, hva, offset)
            trace.faults.append(fault)
            last_fault[ev.tid] = fault
        elif ev.name == "postcopy_page_req_add" and len(ev.args) == 2:
            fault = last_fault.pop(ev.tid, None)
            if fault is None:
                continue
            host = ev.args[0]
            trace.block_base = host - fault.offset
            pending[host] = Request(host, fault.offset, fault.hva, fault.pid, fault.time)
        elif ev.name in ("postcopy_place_page", "postcopy_place_page_zero"):
            trace.placed.append(ev.time)
        elif ev.name == "postcopy_page_req_del" and len(ev.args) == 2:
            request = pending.pop(ev.args[0], None)
            if request is not None:
                request.resolved = ev.time
                trace.requests.append(request)
        elif ev.name == "postcopy_ram_incoming_cleanup_blocktime" and len(ev.args) == 1:
            trace.blocktime_ms = ev.args[0] if isinstance(ev.args[0], int) else None
    trace.requests.extend(pending.values())
    trace.requests.sort(key=lambda r: r.fault)
    _next_faults(trace)
    _join_source(trace, sorted(source))
    return trace


def _next_faults(trace: Trace) -> None:
    by_thread: dict[int, list[float]] = defaultdict(list)
    for fault in trace.faults:
        by_thread[fault.pid].append(fault.time)
    for request in trace.requests:
        times = by_thread[request.pid]  # in time order, as trace.faults
        i = bisect.bisect_right(times, request.fault)
        request.next_fault = times[i] if i < len(times) else None


def _join_source(trace: Trace, source: list[Event]) -> None:
    """Give each request the source's times for its offset: the first of each event at or
    after the request's fault (offsets repeat only for pages requested twice)."""
    seen: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    sleep_start: float | None = None
    for ev in source:
        if ev.name == "migrate_handle_rp_req_pages" and len(ev.args) == 3:
            seen["at_source"][ev.args[1]].append(ev.time)
        elif ev.name == "get_queued_page" and len(ev.args) == 3:
            seen["unqueued"][ev.args[1]].append(ev.time)
        elif ev.name == "get_queued_page_not_dirty" and len(ev.args) == 3:
            seen["already_sent"][ev.args[1]].append(ev.time)
        elif ev.name == "migration_rate_limit_pre":
            sleep_start = ev.time
        elif ev.name == "migration_rate_limit_post" and sleep_start is not None:
            trace.rate_limit_sleeps.append((sleep_start, ev.time, bool(ev.args[0])))
            sleep_start = None
    for request in trace.requests:
        for attr, times in seen.items():
            later = [t for t in times.get(request.offset, ()) if t >= request.fault - 1e-6]
            if later:
                setattr(request, attr, min(later))

