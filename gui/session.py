"""One migration as the window sees it: started without blocking the caller, polled from a
timer, and read into a Snapshot of what the processes publish.

Plain Python, no Qt (like a napari model): the window owns a Session, calls tick() from its
QTimer and hands the Snapshot to its widgets. A Session runs one migration; the window makes
a new one for the next run.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field

import numpy as np

from emu.config import Config
from emu.controller import EVENT_DELAY_S, Pages, Run
from emu.events import Trace
from emu.faults import Fault
from emu.faults import from_config as scenario_faults
from emu.figures import metrics, report, timescale
from emu.figures import progress as guest_progress
from emu.migration import ram as R
from gui import pagemap
from gui.record import Recorder

# Phases of a session, in order; "completed" and "failed" are final.
IDLE, STARTING, RUNNING, CHECKING, COMPLETED, FAILED = (
    "idle", "starting", "running", "checking", "completed", "failed")
FINAL = (COMPLETED, FAILED)
BUCKETS = 40  # log2 latency buckets kept: 2^40 us is 12 days
# How a page in each present display state came.
ARRIVED_HOW = {R.PRECOPY: "in the precopy stream", R.BACKGROUND: "in the background stream",
               R.URGENT_MAIN: "on the main channel", R.URGENT_PREEMPT: "on the preempt channel"}
RECOVER_AFTER = 0.2  # emulated s in postcopy-paused before recovering, as the command line
# Trace-point lines in the event log: at most TRACE_LINES per TRACE_WINDOW_S of emulated time
# (one 100 ms rate-limit window), the rest counted in one line, so that a request a
# millisecond cannot bury the state changes
TRACE_LINES = 6
PUMP_POLLS = 500  # Run.poll() calls a tick at most: each reads one message per child
TRACE_WINDOW_S = 0.1


def trace_line(trace: Trace) -> str:
    """A trace point's line for the narrow event log: as --trace prints it, without what
    every line would repeat (the one RAM block's name; the byte offset of a page named)."""
    fields = {k: v for k, v in trace.fields.items()
              if k != "rbname" and not (k == "offset" and "page" in trace.fields)}
    return str(Trace(trace.role, trace.name, trace.t, fields))


class TraceLimiter:
    """Which trace-point lines the event log shows: the first `lines` of each `window` of
    emulated time; the others are counted by name and told in one line once the window is
    over. Lines come in time order, but for one that reached the controller late (a busy
    machine): it counts in the window open then, so no window shows more than `lines`."""

    def __init__(self, lines: int = TRACE_LINES, window: float = TRACE_WINDOW_S) -> None:
        self.lines = lines
        self.window = window
        self._index: int | None = None  # the open window's number
        self._next = -math.inf  # the first number a new window may take
        self._shown = 0
        self._held: Counter[str] = Counter()  # the lines held back, by trace point
        self._last = 0.0  # the time of the last one

    def add(self, t: float, trace: Trace) -> list[tuple[float, str]]:
        """The lines to show for *trace* at *t*: the last window's summary, if it ended, and
        the trace's own line unless this window has had its share."""
        out = self.close(t)
        if self._index is None:  # a line late for a window already told counts in the next
            self._index, self._shown = max(math.floor(t / self.window), self._next), 0
        if self._shown < self.lines:
            self._shown += 1
            return out + [(t, trace_line(trace))]
        self._held[trace.name] += 1
        self._last = t
        return out

    def close(self, now: float) -> list[tuple[float, str]]:
        """The summary of the current window if it has ended by *now* (math.inf: at the end
        of the run), as [(the last line it held back, text)]: in time order with the rest."""
        if self._index is None or now < (self._index + 1) * self.window:
            return []
        out = self.held()
        self._index, self._next = None, self._index + 1
        return out

    def before(self, t: float) -> list[tuple[float, str]]:
        """The lines to show before another event's line at *t*: what was held back so far
        (the window stays open, its share spent), so the log stays in time order."""
        return self.close(t) + self.held()

    def held(self) -> list[tuple[float, str]]:
        """The lines held back in the open window so far, told in one line, and forgotten."""
        held, self._held = self._held, Counter()
        if not held:
            return []
        start = self._index * self.window
        names = ", ".join(f"{name} ×{n}" for name, n in held.most_common())
        return [(self._last, f"… {held.total()} more trace points in {start:.1f}-"
                             f"{start + self.window:.1f} s ({names})")]


class FaultLog:
    """Every resolved fault of one run, with the running log2 histogram per channel and the
    latencies kept sorted, so summary() costs the same at the end of a long run as at the
    start. extend() does not: merging a tick's latencies into the sorted array copies it, 8
    bytes per fault so far (measured: 0.4 ms a tick at 100 000 faults, 2.6 ms at a million)."""

    def __init__(self) -> None:
        self._buf = np.zeros(1024, metrics.FAULT_DTYPE)
        self.count = 0
        self.dist = np.zeros((len(metrics.CHANNELS), BUCKETS), np.int64)
        self._sorted = np.zeros(0)  # every latency so far, ascending
        self._sum = 0.0

    @property
    def records(self) -> np.ndarray:
        return self._buf[:self.count]

    def extend(self, new: np.ndarray) -> None:
        if not len(new):
            return
        if self.count + len(new) > len(self._buf):
            grown = np.zeros(max(2 * len(self._buf), self.count + len(new)), metrics.FAULT_DTYPE)
            grown[:self.count] = self.records
            self._buf = grown
        self._buf[self.count:self.count + len(new)] = new
        self.count += len(new)
        for channel in range(len(metrics.CHANNELS)):
            counts = metrics.latency_dist(new["latency"][new["channel"] == channel])[:BUCKETS]
            self.dist[channel, :len(counts)] += np.asarray(counts, np.int64)
        lat = np.sort(new["latency"])
        self._sorted = np.insert(self._sorted, np.searchsorted(self._sorted, lat), lat)
        self._sum += float(lat.sum())

    def summary(self) -> dict:
        """count, avg-us, p50-us, p99-us, max-us, as metrics.summarize gives them."""
        if not self.count:
            return {"count": 0, "avg-us": 0.0, "p50-us": 0.0, "p99-us": 0.0, "max-us": 0.0}
        us = self._sorted * 1e6
        return {"count": self.count, "avg-us": round(self._sum * 1e6 / self.count, 1),
                "p50-us": round(_quantile(us, 0.5), 1), "p99-us": round(_quantile(us, 0.99), 1),
                "max-us": round(float(us[-1]), 1)}


def _quantile(ascending: np.ndarray, q: float) -> float:
    """numpy.percentile's default (linear) on data already sorted: no pass over the data."""
    pos = q * (len(ascending) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ascending) - 1)
    return float(ascending[lo] + (ascending[hi] - ascending[lo]) * (pos - lo))


LAG_WINDOW_S = 1.0  # real seconds of frames the live lag is averaged over
LAG_MIN_FRAMES = 10  # fewer frames than this in the window say nothing either way


@dataclass(frozen=True)
class Distortion:
    """The emulator fell behind the link's schedule by more than the figures allow
    (timescale.lag_bound): each latency shown is too high by about `lag`."""

    lag: float  # emulated s: how late the recent frames reached the destination, on average
    latency: float  # the latencies it is compared with: the median so far, else the model's
    scale: float  # the time scale it ran at
    faithful: float  # the fastest scale at which they would be faithful (timescale.suggest)

    def text(self) -> str:
        """In words a newcomer reads right."""
        ms = timescale.short_duration
        speed = (f"at {self.faithful:g}x or slower they are faithful"
                 if self.faithful > timescale.MIN_SCALE else
                 f"{self.faithful:g}x, the slowest, comes closest to faithful")
        return (f"figures distorted: the emulator is {ms(self.lag)} behind the link's "
                f"schedule, more than {timescale.FIDELITY:.0%} of the {ms(self.latency)} "
                f"latencies shown, so each is that much too high; {speed}")


class Fidelity:
    """Whether the figures of one run are faithful, from the destination's cumulative lag
    counters: the recent lag (the last LAG_WINDOW_S of real time) against the latencies
    shown. `now` is the distortion at the last update, `worst` the largest one seen while
    faults were measured (postcopy): a run distorted once keeps the mark."""

    def __init__(self, cfg: Config) -> None:
        self._frames_per_s = cfg["link.bandwidth"] / cfg["emulator.chunk"]
        self._predicted = timescale.predicted_latency(cfg)
        self._samples: deque[tuple[float, float, float]] = deque()  # (real s, frames, lag)
        self.now: Distortion | None = None
        self.worst: Distortion | None = None

    def update(self, dst: dict[str, float], postcopy: bool, log: FaultLog, scale: float,
               real_now: float) -> None:
        if scale <= 0:  # paused: no frames are due, nothing changes
            return
        self._samples.append((real_now, dst["rx-frames"], dst["rx-lag-sum"]))
        while len(self._samples) > 2 and self._samples[1][0] <= real_now - LAG_WINDOW_S:
            self._samples.popleft()
        (_, frames0, lag0), (_, frames1, lag1) = self._samples[0], self._samples[-1]
        latency = log.summary()["p50-us"] * 1e-6 if log.count else self._predicted
        if frames1 - frames0 < LAG_MIN_FRAMES or not latency:
            return
        self.now = self.judge((lag1 - lag0) / (frames1 - frames0), latency, scale)
        if postcopy and self.now and (self.worst is None or self.now.lag > self.worst.lag):
            self.worst = self.now

    def judge(self, lag: float, latency: float, scale: float) -> Distortion | None:
        if lag <= timescale.lag_bound(latency):
            return None
        return Distortion(lag, latency, scale,
                          timescale.suggest(scale, lag, latency, self._frames_per_s))

    def final(self, health: dict, latency_us: float) -> None:
        """The report's verdict on the whole run (emulator_health): when it says the run fell
        behind, its figures (the average lag, the final median) are the ones to show."""
        if not health["keeping-up"]:
            self.worst = Distortion(health["lag-avg-us"] * 1e-6, latency_us * 1e-6,
                                    health["time-scale"], health["faithful-time-scale"])


@dataclass
class Urgent:
    """Pages a vCPU waits for, by where they are; each entry is (host page, age in s)."""

    queued: list[tuple[int, float]] = field(default_factory=list)  # source's request queue
    main: list[tuple[int, float]] = field(default_factory=list)  # sent urgently on main
    preempt: list[tuple[int, float]] = field(default_factory=list)  # sent on preempt
    # already on main in the background stream when the vCPU touched it: no channel helps
    background: list[tuple[int, float]] = field(default_factory=list)
    # neither queued nor sent: the request itself is still on the return path
    asking: list[tuple[int, float]] = field(default_factory=list)

    @property
    def in_flight(self) -> list[tuple[int, float]]:
        return self.main + self.preempt + self.background


@dataclass
class Snapshot:
    """What the window shows after one tick. Arrays are the run's own (shared memory while
    it runs, copies once it has ended): read them, never keep them past the next tick."""

    phase: str
    now: float  # emulated seconds
    status: dict[str, str]
    dst: np.ndarray | None
    src: np.ndarray | None
    arrival: np.ndarray | None
    new_faults: np.ndarray
    waiting: np.ndarray  # pages a vCPU is blocked on (destination state "requested")
    urgent: Urgent
    boards: dict[str, dict[str, float]]
    events: list[str]  # event-log lines new since the last tick
    # the guest's progress on the destination (emu/figures/progress.py): so far while the run
    # goes on, the report's once it has one; None before the guest resumed there
    progress: dict | None = None


def snapshot_progress(cfg: Config, boards: dict, now: float, final: dict | None) -> dict | None:
    """The Snapshot's progress: the report's, else what the destination publishes."""
    if final is not None and "progress" in final:
        return final["progress"]
    if "destination" not in boards:
        return None
    return guest_progress.from_board(boards["destination"], cfg["guest.vcpus"], now)


class Session:
    def __init__(self, cfg: Config, record: str | os.PathLike[str] | None = None,
                 faults: list[Fault] | None = None, recover_after: float | None = RECOVER_AFTER,
                 trace: tuple[str, ...] = ()) -> None:
        """record: a file to record the run in (gui/record.py); faults, recover_after and
        trace as emu.controller.Run takes them (faults default to the scenario's)."""
        cfg, _ = timescale.resolve(cfg, measure=False)  # auto: the slider's start, at once
        self.cfg = cfg
        self.run: Run | None = None
        self.recorder = Recorder(record, cfg) if record is not None else None
        self._run_args = (faults, recover_after, tuple(trace))
        self.phase = IDLE
        self.faults = FaultLog()
        self.report: dict | None = None  # emu.figures.report.build() once the run has ended
        # the memory check's result as soon as it exists, before the rest of the report
        self.integrity: dict | None = None
        self.scale = cfg["emulator.time-scale"]
        self.paused = False
        self._worker: threading.Thread | None = None
        self._worker_error: BaseException | None = None
        self._events: list[str] = []
        self._log_seen = 0  # entries of Run.log already in the event log
        self._traces = TraceLimiter()
        self._errors_seen = 0
        self._asked: dict[int, float] = {}  # requested page -> emulated time it was asked for
        self._started_real = 0.0
        self._final: Pages | None = None  # the page states once the run has ended
        self._final_boards: dict[str, dict[str, float]] = {}
        self._now = self._prev_now = 0.0
        self.fidelity = Fidelity(cfg)

    @property
    def distorted(self) -> Distortion | None:
        """Why this run's figures are not faithful (the worst moment), or None."""
        return self.fidelity.worst

    # ---- commands ----

    def start(self) -> None:
        """Spawn the run's processes in a thread: it takes about a second, the window must
        stay responsive meanwhile."""
        if self.phase != IDLE:
            raise RuntimeError(f"session already {self.phase}")
        cfg = self.cfg.with_overrides([f"emulator.time-scale={self.scale}"])
        # a scenario's [[faults]] break channels during postcopy; the run recovers from them
        # as `postcopy-emu run` does by default
        faults, recover_after, trace = self._run_args
        faults = scenario_faults(cfg) if faults is None else faults
        self.run = Run(cfg, faults, recover_after, trace)
        self.phase = STARTING
        self._started_real = time.monotonic()
        self._log("starting source, destination and network processes")
        self._log(f"emulator.backend: {self.run.backend.describe()}")  # auto's choice, and why
        self._background(self.run.start)

    def start_postcopy(self) -> bool:
        """migrate-start-postcopy now, instead of at migration.switchover-after."""
        if not self.can_start_postcopy or not self.run.start_postcopy():
            return False
        self._log("migrate-start-postcopy (by hand)")
        return True

    @property
    def can_start_postcopy(self) -> bool:
        return (self.phase == RUNNING and not self.run.postcopy_asked
                and self.cfg["migration.postcopy-ram"] and self.run.status["source"] == "active")

    @property
    def switchover(self) -> float | None:
        """Emulated time the source stopped the guest (status "device"), if it has."""
        if self.run is None:
            return None
        return next((t for status, t in self.run.states["source"] if status == "device"), None)

    def set_scale(self, scale: float) -> None:
        """Emulated seconds per real second; applies at once to a running migration."""
        self.scale = scale
        if self.phase == RUNNING and not self.paused:
            self.run.set_scale(scale)

    def pause(self, paused: bool) -> None:
        """Freeze emulated time (scale 0): every process waits, nothing is lost."""
        if self.phase != RUNNING or paused == self.paused:
            return
        self.paused = paused
        self.run.set_scale(0 if paused else self.scale)
        self._log("paused" if paused else f"resumed at time-scale {self.scale:g}")

    def stop(self) -> None:
        """End every process and free every segment; safe to call at any time, twice. A run
        that had already ended keeps its result."""
        if self._worker is not None:
            self._worker.join()  # start() or the memory check: both end on their own
        if self.phase == STARTING:
            self._started()
        if self.phase == CHECKING:
            self._checked()
        if self.phase == RUNNING:
            self._log_run(final=True)  # what the run logged until now, before it goes
        if self.run is not None:
            self.run.stop()
        if self.phase == RUNNING:
            self.phase = FAILED
            self._log("stopped")
        if self.recorder is not None:
            self.recorder.close(self)  # what was recorded until now, if the run did not end

    # ---- the timer's side ----

    def tick(self) -> Snapshot:
        """Read what changed since the last tick; call it 20-30 times a second."""
        new = np.zeros(0, metrics.FAULT_DTYPE)
        if self.phase == STARTING and not self._worker_busy():
            self._started()
        if self.phase == RUNNING:
            new = self._poll()
        if self.phase == CHECKING and not self._worker_busy():
            self._checked()
        snap = self._snapshot(new)
        if self.recorder is not None:
            self.recorder.add(snap, self)
            if snap.phase in FINAL:
                self.recorder.close(self)
        return snap

    def _worker_busy(self) -> bool:
        return self._worker is not None and self._worker.is_alive()

    def _started(self) -> None:
        self._worker = None
        if self._worker_error is not None:
            self._end(FAILED, f"start: {self._worker_error}")
        else:
            self.phase = RUNNING
            if self.scale != self.run.cfg["emulator.time-scale"]:
                self.run.set_scale(self.scale)  # the slider moved while we started

    def _poll(self) -> np.ndarray:
        run = self.run
        self._pump()
        self._prev_now, self._now = self._now, run.clock.now()
        self._log_run()
        new, _ = run.faults(self.faults.count)
        self.faults.extend(new)
        self.fidelity.update(run.board("destination"),
                             run.status["destination"].startswith("postcopy"), self.faults,
                             0 if self.paused else self.scale, time.monotonic())
        if run.finished:
            self._log_run()
            self.phase = CHECKING
            self._final = run.pages().copy()
            self._final_boards = run.boards()
            self._background(self._check)
        return new

    def _pump(self) -> None:
        """Run.poll() takes one message per child: a run that traces sends one a request or
        more, so poll again while they come, lest they queue in the pipes (late for the event
        log) and a child block writing its trace points. At most PUMP_POLLS a tick."""
        run = self.run
        for _ in range(PUMP_POLLS):
            before = len(run.log.entries)
            run.poll(timeout=0)
            if len(run.log.entries) == before:
                break

    def _check(self) -> None:
        """The memory check and the report, off the timer: 0.1 s per 256 MiB of guest."""
        run = self.run
        self.integrity = run.check_memory()
        self.report = report.build(run, self.integrity, time.monotonic() - self._started_real)

    def _checked(self) -> None:
        self._worker = None
        ok = self.report is not None and self.report["status"] == "completed"
        if self.report is not None:
            self.fidelity.final(self.report["emulator"], self.report["latency"]["p50-us"])
            integrity = self.report["integrity"]
            self._log(f"memory check: {report.integrity_text(integrity)}")
        error = self._worker_error
        self._end(COMPLETED if ok else FAILED, error and f"report: {error}")

    def _end(self, phase: str, error: str | None = None) -> None:
        """The run is over: what it said, then the session's own error, if any."""
        self._log_errors()
        if error:
            self._log(f"error: {error}")
        self.run.stop()  # processes and segments go now; the copies in _final stay
        self.phase = phase
        self._log(f"run {phase}")

    def _background(self, target) -> None:
        def body() -> None:
            try:
                target()
            except BaseException as err:  # reported by the next tick
                self._worker_error = err

        self._worker_error = None
        self._worker = threading.Thread(target=body, name="session-worker", daemon=True)
        self._worker.start()

    # ---- snapshots ----

    def _snapshot(self, new: np.ndarray) -> Snapshot:
        run = self.run
        dst = src = arrival = None
        boards = self._final_boards
        if self._final is not None:
            dst, src, arrival = self._final
        elif self.phase in (RUNNING, CHECKING):
            dst, src, arrival = run.pages()
            if self.recorder is not None:  # the frame drawn is the frame recorded
                dst, src, arrival = self.recorder.copy_pages((dst, src, arrival))
            boards = run.boards()
        events, self._events = self._events, []
        status = dict(run.status) if run else {"source": "none", "destination": "none"}
        waiting = np.zeros(0, np.int64)
        if dst is not None and self.phase == RUNNING:
            waiting = np.flatnonzero(dst == R.REQUESTED)
        final = self.report if self.phase in FINAL else None
        return Snapshot(self.phase, self._now, status, dst, src, arrival, new, waiting,
                        self._urgent(waiting, src), boards, events,
                        snapshot_progress(self.cfg, boards, self._now, final))

    def _urgent(self, waiting: np.ndarray, src: np.ndarray | None) -> Urgent:
        if self.phase != RUNNING:
            self._asked.clear()
            return Urgent()
        queued = self.run.requests()
        # Ages: the source stamps each queued request. The destination does not publish when
        # it faulted, so a page first seen elsewhere was asked for between the last tick and
        # this one: take the middle.
        first_seen = (self._prev_now + self._now) / 2
        asked = {int(p): self._asked.get(int(p), first_seen) for p in waiting}
        asked.update((p, t) for p, t in queued if p in asked)
        self._asked = asked
        return where_urgent(waiting, src, queued, asked, self._now)

    # ---- the event log ----

    def _log(self, text: str, t: float | None = None) -> None:
        t = self._now if t is None else t
        if self.phase == RUNNING:  # among the run's events, in time order
            self.run.note(t, text)
        else:
            self._show(text, t)

    def _show(self, text: str, t: float) -> None:
        self._events.append(f"[{t:8.3f} s] {text}")

    def _log_run(self, final: bool = False) -> None:
        """The run's own log: state changes, link events, faults injected, recovery."""
        self._log_errors()  # first, so that a final read shows them too
        new, self._log_seen = self.run.events(self._log_seen, final)
        for t, what in new:
            if isinstance(what, Trace):
                lines = self._traces.add(t, what)
            else:  # the trace lines held back before it: said first
                lines = self._traces.before(t) + [(t, what)]
            for at, text in lines:
                self._show(text, at)
        over = final or self.run.finished  # then every event is out: the last window ends
        # the horizon Run.events() released up to: a window before it is complete
        horizon = math.inf if over else self._now - EVENT_DELAY_S * self.run.clock.scale
        for at, text in self._traces.close(horizon):
            self._show(text, at)

    def _log_errors(self) -> None:
        for error in self.run.errors[self._errors_seen:]:
            self._log(f"error: {error}")
        self._errors_seen = len(self.run.errors)

    # ---- one page, for the bitmap's hover text ----

    def describe(self, page: int, code: int, arrival: np.ndarray) -> str:
        """One line about host page *page*, shown in display state *code* (the hover text)."""
        return describe_page(self.cfg, self.faults, page, code, arrival,
                             self._asked.get(page), self._now)


def where_urgent(waiting: np.ndarray, src: np.ndarray, queued: list[tuple[int, float]],
                 asked: dict[int, float], now: float) -> Urgent:
    """Where each page a vCPU waits for (*waiting*) is: in the source's request queue
    (*queued*: page, time queued), sent (*src*: the source's page states), or neither: its
    request is still on the return path. Ages count from *asked* (page -> emulated time its
    vCPU blocked), else from the time the request was queued."""
    urgent = Urgent(queued=[(p, now - asked.get(p, t)) for p, t in queued])
    in_queue = {p for p, _ in queued}
    for page in waiting.tolist():
        if page in in_queue:
            continue
        entry = (page, now - asked[page])
        if src[page] == R.SENT_URGENT_MAIN:
            urgent.main.append(entry)
        elif src[page] == R.SENT_PREEMPT:
            urgent.preempt.append(entry)
        elif src[page] == R.SENT_MAIN:
            urgent.background.append(entry)
        else:
            urgent.asking.append(entry)
    return urgent


def describe_page(cfg: Config, faults: FaultLog, page: int, code: int, arrival: np.ndarray,
                  blocked_since: float | None, now: float) -> str:
    """One line about host page *page*, shown in display state *code*: how and when it
    arrived, how long each vCPU that faulted on it waited, and, if one is blocked on it
    since *blocked_since*, for how long."""
    text = f"page {page} (guest address 0x{page * cfg.page_size:x}): "
    text += pagemap.legend(cfg["migration.postcopy-preempt"])[code]
    if code in ARRIVED_HOW:
        text += f", arrived at {arrival[page]:.4f} s {ARRIVED_HOW[code]}"
    recs = faults.records
    for rec in recs[recs["page"] == page][:4]:
        text += (f"; vCPU {rec['vcpu']} faulted on it at {rec['time']:.4f} s and waited "
                 f"{_ms(rec['latency'])}")
    if blocked_since is not None and code not in ARRIVED_HOW:
        text += f"; a vCPU has been blocked on it for {_ms(now - blocked_since)}"
    return text


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f} ms" if seconds < 1 else f"{seconds:.3f} s"
