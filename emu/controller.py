"""The controller: starts a run's processes, drives the migration, and cleans everything up.

Used by the command line and by the window. It owns every shared-memory segment and every
child, assembled as every program assembles its engines (emu/engines.py); stop() (also on
error, a signal or a dead child) ends the children and unlinks the segments, so nothing
outlives a run. Before anything exists, start() checks that the run's shared memory fits in
/dev/shm and in the machine's memory. What the children say (emu/events.py) is read in one
place, Run._event.
"""

from __future__ import annotations

import bisect
import math
import shutil
import tempfile
import time
from multiprocessing.connection import wait as wait_connections
from typing import NamedTuple

import numpy as np

from emu import backend, engines, signals
from emu.clock import Clock
from emu.config import Config
from emu.engines import ROLES, Child, Shared
from emu.events import (
    Bound,
    Died,
    Error,
    Event,
    Exit,
    Link,
    Listening,
    Paused,
    Ready,
    Refused,
    Report,
    StateChanged,
    StateRefused,
    Trace,
)
from emu.faults import Fault
from emu.migration.states import FINAL

# Real seconds an event may take from the process that stamped it to the log: the events of
# three processes cross three pipes, so a later one can be read first.
EVENT_DELAY_S = 0.25
RUN_DIR_PREFIX = "postcopy-emu-"  # the run's socket directory, in the system's temporary one
DEATH_GRACE = 3.0  # real seconds the survivors of a dead child have to say what it did to them


class RunError(RuntimeError):
    pass


class Pages(NamedTuple):
    """The page states the run's engines publish, one byte per host page (emu/migration/ram.py),
    and when each page arrived on the destination (emulated s)."""

    dst: np.ndarray
    src: np.ndarray
    arrival: np.ndarray

    def copy(self) -> Pages:
        return Pages(self.dst.copy(), self.src.copy(), self.arrival.copy())


class EventLog:
    """Every notable event of a run by its emulated time, for readers that show them as they
    come (--trace, the window's event log) and for the report. An entry is (t, what): what is
    a line of text, or a Trace (its str() is the line).

    Events arrive out of order (each child has its own pipe), so the part of the log no
    reader has seen yet is kept sorted by time; equal times keep their order of arrival. An
    event is released to readers once the horizon (the time before which every event has
    arrived) has passed it."""

    def __init__(self) -> None:
        self.entries: list[tuple[float, str | Trace]] = []
        self._released = 0  # how many entries readers may have seen

    def note(self, t: float, what: str | Trace) -> None:
        at = bisect.bisect_right(self.entries, t, lo=self._released, key=lambda entry: entry[0])
        self.entries.insert(at, (t, what))

    def since(self, seen: int, horizon: float = math.inf) -> tuple[list, int]:
        """The entries from number `seen` on up to the horizon, and the number to pass next
        time."""
        while self._released < len(self.entries) and self.entries[self._released][0] <= horizon:
            self._released += 1
        return self.entries[seen:self._released], self._released

    def in_order(self) -> list[tuple[float, str | Trace]]:
        """The whole log by time, an entry that came later than its horizon included."""
        return sorted(self.entries, key=lambda entry: entry[0])


class Run:
    """One migration: its three engine children on one shared memory (emu/engines.py), the
    commands that drive it, and what they say, read by one dispatcher (_event)."""

    def __init__(self, cfg: Config, faults: list[Fault] = (),
                 recover_after: float | None = 0.2, trace: tuple[str, ...] = ()) -> None:
        """faults: what to break during postcopy; recover_after: emulated seconds after a
        pause before recovering (migrate-recover + migrate resume), None = leave it paused;
        trace: QEMU -trace patterns of the trace points the children log. A time-scale of
        auto is chosen here (emu/figures/timescale.py), before any process starts, and so is
        a backend of auto (emu/backend.py: self.backend says which, and why)."""
        from emu.figures import timescale

        self.cfg, self.backend = backend.resolve(timescale.resolve(cfg)[0])
        self.trace = tuple(trace)
        self.pending_faults = list(faults)
        self.injected: list[dict] = []
        self.recover_after = recover_after
        self.recover_at: float | None = None
        self.recoveries = 0
        self.postcopy_start: float | None = None
        # every notable event, for --trace, the window and the report: see note() and events()
        self.log = EventLog()
        self.listening: str | None = None
        self.tmpdir = tempfile.mkdtemp(prefix=RUN_DIR_PREFIX)
        self.link_uri = f"unix:{self.tmpdir}/link.sock"
        self.shared: Shared | None = None  # made by start()
        self.children: dict[str, Child] = {}
        self.status = {"source": "none", "destination": "none"}
        self.states: dict[str, list[tuple[str, float]]] = {"source": [], "destination": []}
        self.reports: dict[str, dict] = {}
        self.errors: list[str] = []  # one line each
        self.tracebacks: list[str] = []  # of the errors that were bugs
        self.dead: set[str] = set()
        self.refused: list[tuple[str, str]] = []  # commands a side refused, with QEMU's words
        self._ready: set[str] = set()
        self._postcopy_asked = False
        self._death_deadline = math.inf  # once a child died: when to stop waiting for the rest

    # ---- life cycle ----

    def start(self) -> None:
        """Create segments, spawn source, destination and network, start the migration."""
        try:
            self.shared = Shared(self.cfg, ROLES)
            self._spawn()
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        self.clock.start(self.cfg["emulator.time-scale"])
        self.command("destination", "migrate-incoming", self._incoming_uri())
        self._wait_listening()
        self._delay_connects()
        self.command("source", "migrate", self.link_uri)

    def _delay_connects(self) -> None:
        """The delay faults: no event, a slow network from the start (emu/faults.py)."""
        for fault in [f for f in self.pending_faults if f.action == "delay"]:
            self.pending_faults.remove(fault)
            self.command("source", "x-delay-connect", fault.channel, fault.delay)
            self.injected.append({"action": "delay", "channel": fault.channel,
                                  "delay": fault.delay, "time": 0.0})
            self.note(self.clock.now(), f"fault injected: {fault.describe()}")

    def stop(self) -> None:
        """End the children, unlink the segments, remove the socket directory: safe to call
        twice, and a signal meanwhile waits until it is done (see emu.signals)."""
        with signals.held():
            engines.stop(self.children.values())
            self.children.clear()
            if self.shared is not None:
                self.shared.close()
            shutil.rmtree(self.tmpdir, ignore_errors=True)

    def __enter__(self) -> Run:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- running ----

    def command(self, role: str, *command) -> None:
        self.children[role].send(*command)

    def start_postcopy(self) -> bool:
        """migrate-start-postcopy, once: False when it was asked for already (by poll() at
        migration.switchover-after, or by hand)."""
        if self._postcopy_asked:
            return False
        self._postcopy_asked = True
        self.command("source", "migrate-start-postcopy")
        return True

    @property
    def postcopy_asked(self) -> bool:
        return self._postcopy_asked

    def set_scale(self, scale: float) -> None:
        """Emulated seconds per real second from now on; 0 freezes emulated time."""
        self.clock.set_scale(scale)

    @property
    def finished(self) -> bool:
        if self.dead:
            # let the survivors say what the loss did to them (failed, or paused in postcopy)
            settled = all(self.status[side] in FINAL + ("postcopy-paused",)
                          for side in self.status if side not in self.dead)
            return settled or time.monotonic() > self._death_deadline
        if self.errors:
            return True
        return len(self.reports) == 2 or self._done_before_pause

    @property
    def ok(self) -> bool:
        return not self.errors and (self._done_before_pause or all(
            s == "completed" for s in self.status.values()))

    @property
    def _done_before_pause(self) -> bool:
        """The destination completed, but a fault broke the link before its SHUT reached the
        source, which sits in postcopy-paused with nothing to recover (QEMU would too): the
        guest has all its memory on the destination."""
        return ("destination" in self.reports and self.status["destination"] == "completed"
                and self.status["source"] == "postcopy-paused")

    def poll(self, timeout: float = 0.05) -> None:
        """Take in what the children say, and act when it is time: migrate-start-postcopy,
        faults, recovery."""
        self._pump(timeout)
        now = self.clock.now()
        if self.status["source"] == "active" and now >= self.cfg["migration.switchover-after"]:
            self.start_postcopy()
        self._inject_due(now)
        if self.recover_at is not None and now >= self.recover_at:
            self.recover_at = None
            self.recover()
        limit = self.cfg["emulator.duration-limit"]
        if limit and now > limit and not self.finished:
            self.errors.append(f"not completed after emulator.duration-limit = {limit}s")

    def _pump(self, timeout: float) -> None:
        live = {child.conn: child for role, child in self.children.items()
                if role not in self.dead}
        for conn in wait_connections(list(live), timeout):
            child = live[conn]
            try:
                event = child.recv()
            except (EOFError, OSError):
                event = Died(child.role, child.death())
            self._event(event)

    def wait(self, progress=None, every: float = 0.5) -> None:
        next_progress = time.monotonic()
        while not self.finished:
            self.poll()
            if progress and time.monotonic() >= next_progress:
                progress(self)
                next_progress += every
        if progress:
            progress(self)

    # ---- state the window and the report read ----

    @property
    def clock(self) -> Clock:
        """The run's emulated clock, in its shared memory (once started)."""
        return self._memory().clock

    def board(self, role: str) -> dict[str, float]:
        """What `role`'s engine counts, now."""
        return self._memory().boards[role].snapshot()

    def boards(self) -> dict[str, dict[str, float]]:
        return {role: self.board(role) for role in ROLES}

    def faults(self, seen: int = 0) -> tuple[np.ndarray, int]:
        """The faults resolved from number `seen` on, and the number to pass next time."""
        return self._memory().ring.read_since(seen)

    @property
    def fault_count(self) -> int:
        return self._memory().ring.count

    def pages(self) -> Pages:
        """The page states as the engines publish them: views of the shared memory, valid
        until stop() (copy() them to keep them)."""
        shared = self._memory()
        return Pages(shared.states["destination"], shared.states["source"], shared.arrival)

    def requests(self) -> list[tuple[int, float]]:
        """The source's request queue: (host page, emulated time queued)."""
        return self._memory().requests()

    def ram(self, role: str) -> np.ndarray:
        """The guest RAM of the source or the destination, as bytes."""
        return self._memory().ram(role)

    def check_memory(self) -> dict | None:
        """The memory check (emu/figures/report.py), once the run has completed; None if it
        has not."""
        from emu.figures import report

        if not self.ok:
            return None
        return report.check_memory(self.cfg, self.ram("source"), self.ram("destination"),
                                   self.pages().dst, self.reports["destination"])

    def note(self, t: float, what: str | Trace) -> None:
        """Log an event that happened at emulated time t (see EventLog)."""
        self.log.note(t, what)

    def events(self, seen: int = 0, final: bool = False) -> tuple[list, int]:
        """The log's events from number `seen` on, for a reader that shows them as they come
        (--trace, the window's event log), and the number to pass next time. An event is
        handed out once EVENT_DELAY_S has passed since its time, so that every earlier event
        has arrived and the reader shows them in time order; all of them once the run is over
        (or final)."""
        horizon = math.inf
        if not (final or self.finished):
            horizon = self.clock.now() - EVENT_DELAY_S * self.clock.scale
        return self.log.since(seen, horizon)

    def events_in_order(self) -> list[tuple[float, str | Trace]]:
        """The whole log by time, an event that came later than EVENT_DELAY_S included."""
        return self.log.in_order()

    # ---- internals ----

    def _memory(self) -> Shared:
        if self.shared is None:
            raise RunError("the run has not started")
        return self.shared

    def _spawn(self) -> None:
        # the network child is the janitor: it unlinks the segments if we are killed, and
        # removes the run directory (by its exact path), the last process to use it
        plan = {"network": (True, (self.link_uri, self._incoming_uri(), self.tmpdir)),
                "destination": (False, ()), "source": (False, ())}
        for role, (janitor, args) in plan.items():
            self.children[role] = self.shared.spawn(role, self.cfg, *args, janitor=janitor,
                                                    trace=self.trace)

    def _incoming_uri(self) -> str:
        """Where the destination listens: a new address for every recovery, as in QEMU."""
        return f"unix:{self.tmpdir}/incoming-{self.recoveries}.sock"

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 60
        while len(self._ready) < len(self.children):
            if time.monotonic() > deadline:
                raise RunError("the emulator's processes did not start within 60 s")
            self._pump(0.1)
            if self.errors:
                raise RunError(self.errors[0])

    def _wait_listening(self, timeout: float = 10.0) -> bool:
        """Wait for the destination's "listening" (True) or its refusal (False)."""
        self.listening = None
        refused = len(self.refused)
        deadline = time.monotonic() + timeout
        while self.listening is None and not self.errors and len(self.refused) == refused:
            if time.monotonic() > deadline:
                raise RunError("the destination did not listen")
            self._pump(0.02)
        return self.listening is not None

    # ---- faults and recovery ----

    def inject(self, fault: Fault) -> None:
        now = self.clock.now()
        if fault.action == "pause":
            self.command("source", "migrate-pause")
        else:
            self.command("network", fault.action, fault.channel)
        self.injected.append({"action": fault.action, "channel": fault.channel,
                              "at": fault.at, "time": round(now, 6)})
        self.note(now, f"fault injected: {fault.describe()}")

    def recover(self) -> None:
        """migrate-recover on the destination (a new address), then migrate resume."""
        self.recoveries += 1
        address = self._incoming_uri()
        self.command("destination", "migrate-recover", address)
        if not self._wait_listening():
            return  # refused (not paused yet): poll() tries again after recover-after
        self.command("network", "target", address)
        self.command("source", "migrate-resume", self.link_uri)
        self.note(self.clock.now(), f"recovery {self.recoveries}: migrate-recover {address}")

    def _inject_due(self, now: float) -> None:
        if self.postcopy_start is None or self.status["destination"] in FINAL:
            return
        due = [f for f in self.pending_faults
               if not isinstance(f.at, str) and now >= self.postcopy_start + f.at]
        for fault in due:
            self.pending_faults.remove(fault)
            self.inject(fault)

    # ---- what the children say ----

    def _event(self, event: Event) -> None:
        """Every event of every child, read here and only here."""
        match event:
            case Ready(role):
                self._ready.add(role)
            case StateChanged(side, status, t):
                self._state(side, status, t)
            case StateRefused(t=t):
                self.note(t, str(event))
            case Trace(t=t):
                self.note(t, event)  # its str() is the line; the report keeps its fields
            case Link(what, channel, t):
                self.note(t, f"link: {channel} connection {what}")
            case Listening(uri):
                self.listening = uri
            case Paused(side, reason):
                self.note(self.clock.now(), f"{side} paused: {reason}")
            case Refused(command, message):
                self._refused(command, message)
            case Error():
                self.errors.append(str(event))
                if event.traceback:
                    self.tracebacks.append(event.traceback)
            case Report(side, report):
                self.reports[side] = report
            case Exit(role):
                if not self.finished:
                    self.errors.append(f"{role} process exited before the end")
            case Died(role, why):
                self._died(role, why)
            case Bound():
                pass  # in the run's directory, removed whole

    def _state(self, side: str, status: str, t: float) -> None:
        self.status[side] = status
        self.states[side].append((status, t))
        self.note(t, f"{side}: {status}")
        if side == "destination":
            # faults count from here: postcopy runs once the destination has switched over
            if status == "postcopy-active" and self.postcopy_start is None:
                self.postcopy_start = t
            return
        if status == "postcopy-paused" and self.recover_after is not None \
                and self.status["destination"] not in FINAL:
            self.recover_at = t + self.recover_after
        for fault in [f for f in self.pending_faults if f.at == status]:
            self.pending_faults.remove(fault)
            self.inject(fault)

    def _refused(self, command: str, message: str) -> None:
        now = self.clock.now()
        self.note(now, f"{command} refused: {message}")
        self.refused.append((command, message))
        if self.recover_after is not None:
            self.recover_at = now + self.recover_after

    def _died(self, role: str, why: str) -> None:
        self.dead.add(role)
        self._death_deadline = time.monotonic() + DEATH_GRACE
        if role != "network" and self.status["source"].startswith("postcopy"):
            why += (": postcopy had started, so the guest's memory was split between source "
                    "and destination; the guest cannot be saved")
        elif role == "destination":
            why += ": the migration failed; the guest keeps running on the source"
        self.errors.append(why)
        if role in self.status:
            self.status[role] = "failed"


def migrate(cfg: Config, progress=None, faults: list[Fault] = (),
            recover_after: float | None = 0.2, trace: tuple[str, ...] = (),
            at_end=None) -> dict:
    """Run one migration to the end and return its report (see report.build). at_end(run),
    if given, reads what else it needs (the page arrays, e.g.) before the processes go."""
    from emu.figures import report

    started = time.monotonic()
    run = None
    try:
        run = Run(cfg, faults, recover_after, trace)
        run.start()
        run.wait(progress)
        result = report.build(run, run.check_memory(), time.monotonic() - started)
        if at_end is not None:
            at_end(run)
        return result
    finally:
        if run is not None:
            run.stop()
