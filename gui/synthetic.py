"""A made-up migration for the window: what gui.session.Session gives it, without processes.

The window reads a session's tick() Snapshot, its fault log, report and a few flags; this
class offers the same, fed by whoever drives it: the panel tests say what happens to which
page, bench/gui_frame.py makes up a busy postcopy frame after frame. The arrays have the
engine's shapes and codes, and the Snapshot is assembled with the session's own functions, so
the panels see what a real run would publish. No clock: emulated time moves when the driver
sets `now`. Plain Python, no Qt, like gui.session.
"""

from __future__ import annotations

import time

import numpy as np

from emu.config import Config
from emu.figures import metrics, report
from emu.figures import progress as guest_progress
from emu.migration import destination, source
from emu.migration import ram as R
from emu.net import link
from gui.session import (
    COMPLETED,
    FAILED,
    FINAL,
    RUNNING,
    FaultLog,
    Fidelity,
    Snapshot,
    Urgent,
    describe_page,
    snapshot_progress,
    where_urgent,
)

ON_DEMAND = {R.URGENT_MAIN: 0, R.URGENT_PREEMPT: 1}  # placed after a request -> channel code


class SyntheticSession:
    def __init__(self, cfg: Config, phase: str = RUNNING) -> None:
        self.cfg = cfg
        self.phase = phase
        self.now = 0.0  # emulated seconds
        self.dst = np.full(cfg.npages, R.MISSING, np.uint8)
        self.src = np.full(cfg.npages, R.UNSENT, np.uint8)
        self.arrival = np.zeros(cfg.npages)
        self.faults = FaultLog()
        self.report: dict | None = None
        self.integrity: dict | None = None  # the memory check, as soon as it exists
        self.status = {"source": "active", "destination": "active"}
        self.boards = {"source": dict.fromkeys(source.FIELDS, 0.0),
                       "destination": dict.fromkeys(destination.FIELDS, 0.0),
                       "network": dict.fromkeys(link.FIELDS, 0.0)}
        self.switchover: float | None = None
        self.can_start_postcopy = False
        self.paused = False
        self.scale = cfg["emulator.time-scale"]
        self.commands: list[tuple] = []  # what the window asked of the session, in order
        self._asked: dict[int, float] = {}  # page a vCPU is blocked on -> when it blocked
        self._queued: list[tuple[int, float]] = []  # the source's request queue
        self._new: list[np.ndarray] = []
        self._events: list[str] = []
        self.fidelity = Fidelity(cfg)  # judged as a Session judges, from the boards' lag

    @property
    def distorted(self):
        return self.fidelity.worst

    # ---- what happens to the pages ----

    def block(self, pages, at=None) -> None:
        """A vCPU touches missing *pages* and blocks on them, at *at* (emulated seconds, one
        for all or one per page; default now)."""
        pages = np.atleast_1d(pages)
        self.dst[pages] = R.REQUESTED
        times = np.broadcast_to(self.now if at is None else at, pages.shape)
        self._asked.update(zip(pages.tolist(), times.tolist(), strict=True))

    def queue(self, page: int) -> None:
        """The source's return-path thread queues the request for *page*."""
        self._queued.append((int(page), self.now))

    def send(self, pages, how: int) -> None:
        """The source sends *pages* (how: R.SENT_MAIN, R.SENT_URGENT_MAIN, R.SENT_PREEMPT)."""
        pages = np.atleast_1d(pages)
        self.src[pages] = how
        sent = set(pages.tolist())
        self._queued = [(p, t) for p, t in self._queued if p not in sent]

    def arrive(self, pages, state: int) -> None:
        """*pages* are placed now in destination *state*; a vCPU blocked on one wakes, and
        its fault joins the log (delivered on preempt if state is R.URGENT_PREEMPT)."""
        pages = np.atleast_1d(pages)
        self.dst[pages] = state
        self.arrival[pages] = self.now
        woken = [p for p in pages.tolist() if p in self._asked]
        if woken:
            rec = np.zeros(len(woken), metrics.FAULT_DTYPE)
            rec["page"] = woken
            rec["time"] = [self._asked.pop(p) for p in woken]
            rec["latency"] = self.now - rec["time"]
            rec["channel"] = ON_DEMAND.get(state, 0)
            self._new.append(rec)

    def log(self, text: str) -> None:
        """A line for the event log, as the run's own log gives them."""
        self._events.append(f"[{self.now:8.3f} s] {text}")

    def finish(self, ok: bool = True) -> None:
        """The run ends; the report has the figures of the boards and the fault log."""
        self.phase = COMPLETED if ok else FAILED
        self.status = dict.fromkeys(self.status, "completed" if ok else "failed")
        self._asked.clear()
        self._queued.clear()
        records = np.concatenate([self.faults.records, *self._new])  # the next tick's too
        self.integrity = {"ok": ok, "bad-pages": 0 if ok else 1,
                          "checked": f"{self.cfg.npages} pages, made up"}
        self.report = {
            "status": self.phase,
            "query-migrate": report.query_migrate(self.cfg, self.status["source"],
                                                  self.boards["source"], records),
            "integrity": self.integrity,
            "progress": guest_progress.from_board(self.boards["destination"],
                                                  self.cfg["guest.vcpus"], self.now, "completed"),
        }

    # ---- what the window calls, as on a Session ----

    def tick(self) -> Snapshot:
        new = np.concatenate(self._new) if self._new else np.zeros(0, metrics.FAULT_DTYPE)
        self._new = []
        self.faults.extend(new)
        running = self.phase == RUNNING
        if running:
            self.fidelity.update(self.boards["destination"],
                                 self.status["destination"].startswith("postcopy"),
                                 self.faults, 0 if self.paused else self.scale,
                                 time.monotonic())
        waiting = np.flatnonzero(self.dst == R.REQUESTED) if running else np.zeros(0, np.int64)
        urgent = (where_urgent(waiting, self.src, self._queued, self._asked, self.now)
                  if running else Urgent())
        events, self._events = self._events, []
        final = self.report if self.phase in FINAL else None
        return Snapshot(self.phase, self.now, dict(self.status), self.dst, self.src,
                        self.arrival, new, waiting, urgent, self.boards, events,
                        snapshot_progress(self.cfg, self.boards, self.now, final))

    def describe(self, page: int, code: int, arrival: np.ndarray) -> str:
        return describe_page(self.cfg, self.faults, page, code, arrival,
                             self._asked.get(page), self.now)

    def start_postcopy(self) -> bool:
        self.commands.append(("migrate-start-postcopy",))
        return self.can_start_postcopy

    def pause(self, paused: bool) -> None:
        self.paused = paused
        self.commands.append(("pause", paused))

    def set_scale(self, scale: float) -> None:
        self.scale = scale
        self.commands.append(("time-scale", scale))

    def stop(self) -> None:
        if self.phase not in FINAL:
            self.phase = FAILED
