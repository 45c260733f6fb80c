"""The controller: starts a run's processes, drives the migration, and cleans everything up.

Used by the command line and by the window. It owns every shared-memory segment and every
child; stop() (also on error, a signal or a dead child) ends the children and unlinks the
segments, so nothing outlives a run. Before anything exists, start() checks that the run's
shared memory fits in /dev/shm and in the machine's memory.
"""

from __future__ import annotations

import bisect
import multiprocessing as mp
import shutil
import tempfile
import time
from multiprocessing.connection import wait as wait_connections

import numpy as np

from emu import shm, signals
from emu.board import Board
from emu.child import child_main
from emu.clock import Clock
from emu.config import Config
from emu.faults import Fault
from emu.figures.metrics import FaultRing
from emu.migration import destination, source
from emu.migration.page_requests import PageRequestQueue
from emu.migration.states import FINAL, refusal_text
from emu.net import link
from emu.shm import Segments
from emu.units import format_size

ROLES = ("source", "destination", "network")

# Real seconds an event may take from the process that stamped it to the log: the events of
# three processes cross three pipes, so a later one can be read first.
EVENT_DELAY_S = 0.25
RUN_DIR_PREFIX = "postcopy-emu-"  # the run's socket directory, in the system's temporary one


class RunError(RuntimeError):
    pass


def layout(role: str, cfg: Config) -> dict[str, tuple[int, bool]]:
    """The shared memory one engine child works on: name -> (bytes, allocated now). A guest
    RAM without emulator.payload is never written: it stays sparse."""
    npages, ram, payload = cfg.npages, cfg["guest.ram"], cfg["emulator.payload"]
    if role == "source":
        return {"src-ram": (ram, payload), "src-states": (npages, True),
                "src-board": (Board.nbytes(source.FIELDS), True),
                "src-queue": (PageRequestQueue.nbytes(), True)}
    if role == "destination":
        return {"dst-ram": (ram, payload), "dst-states": (npages, True),
                "dst-arrival": (8 * npages, True),
                "dst-board": (Board.nbytes(destination.FIELDS), True),
                "faults": (FaultRing.nbytes(destination.RING), True)}
    return {"relay-board": (Board.nbytes(link.FIELDS), True)}


def plan(cfg: Config, roles: tuple[str, ...]) -> dict[str, tuple[int, bool]]:
    """Every segment of a program running these roles' engines, with its clock; checked
    with check_room() before the first one is made."""
    segments = {"clock": (Clock.NBYTES, True)}
    for role in roles:
        segments.update(layout(role, cfg))
    return segments


def check_room(cfg: Config, roles: tuple[str, ...]) -> None:
    """shm.NoRoom, one line naming guest.ram, if these roles' shared memory does not fit."""
    ram = format_size(cfg["guest.ram"])
    rams = sum(role != "network" for role in roles) if cfg["emulator.payload"] else 0
    what = {0: f"the page arrays of a {ram} guest", 1: f"a guest RAM of {ram} and its page arrays",
            2: f"two guest RAMs of {ram} and their page arrays"}[rams]
    shm.check_room((size for size, allocated in plan(cfg, roles).values() if allocated), what)


class Run:
    def __init__(self, cfg: Config, faults: list[Fault] = (),
                 recover_after: float | None = 0.2) -> None:
        """faults: what to break during postcopy; recover_after: emulated seconds after a
        pause before recovering (migrate-recover + migrate resume), None = leave it paused."""
        self.cfg = cfg
        self.pending_faults = list(faults)
        self.injected: list[dict] = []
        self.recover_after = recover_after
        self.recover_at: float | None = None
        self.recoveries = 0
        self.postcopy_start: float | None = None
        # every notable event, for --trace, the window and the report: see note() and events()
        self.log: list[tuple[float, str]] = []
        self._released = 0  # how many events of the log readers may have seen (events())
        self.listening: str | None = None
        self.tmpdir = tempfile.mkdtemp(prefix=RUN_DIR_PREFIX)
        self.link_uri = f"unix:{self.tmpdir}/link.sock"
        self.segments = Segments()
        self.children: dict[str, tuple[mp.Process, object]] = {}
        self.status = {"source": "none", "destination": "none"}
        self.states: dict[str, list[tuple[str, float]]] = {"source": [], "destination": []}
        self.reports: dict[str, dict] = {}
        self.errors: list[str] = []
        self.switched = False
        self.dead: set[str] = set()
        self.refused: list[tuple[str, str]] = []  # commands a side refused, with QEMU's words

    # ---- life cycle ----

    def start(self) -> None:
        """Create segments, spawn source, destination and network, start the migration."""
        try:
            check_room(self.cfg, ROLES)
            self._create_segments()
            self._spawn()
            self.segments.untrack()  # the network child unlinks them if we are killed
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        self.clock.start(self.cfg["emulator.time-scale"])
        self.command("destination", "migrate-incoming", self._incoming_uri())
        self._wait_listening()
        self.command("source", "migrate", self.link_uri)

    def stop(self) -> None:
        """End the children, unlink the segments, remove the socket directory: safe to call
        twice, and a signal meanwhile waits until it is done (see emu.signals)."""
        with signals.held():
            for _, conn in self.children.values():
                try:
                    conn.send(("quit",))
                except OSError:
                    pass
            deadline = time.monotonic() + 3
            while self.children:
                _, (proc, conn) = self.children.popitem()
                proc.join(max(0.1, deadline - time.monotonic()))
                if proc.is_alive():
                    proc.kill()
                    proc.join(2)
                conn.close()
            self.segments.close()
            shutil.rmtree(self.tmpdir, ignore_errors=True)

    def __enter__(self) -> Run:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- running ----

    def command(self, role: str, *command) -> None:
        self.children[role][1].send(command)

    @property
    def finished(self) -> bool:
        if self.dead:
            # let the survivors say what the loss did to them (failed, or paused in postcopy)
            settled = all(self.status[side] in FINAL + ("postcopy-paused",)
                          for side in self.status if side not in self.dead)
            return settled or time.monotonic() > self.death_deadline
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
        if (not self.switched and self.status["source"] == "active"
                and now >= self.cfg["migration.switchover-after"]):
            self.switched = True
            self.command("source", "migrate-start-postcopy")
        self._inject_due(now)
        if self.recover_at is not None and now >= self.recover_at:
            self.recover_at = None
            self.recover()
        limit = self.cfg["emulator.duration-limit"]
        if limit and now > limit and not self.finished:
            self.errors.append(f"not completed after emulator.duration-limit = {limit}s")

    def _pump(self, timeout: float) -> None:
        conns = self._live()
        for conn in wait_connections(list(conns), timeout):
            try:
                self._event(conn.recv())
            except (EOFError, OSError):
                self._died(conns[conn])

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

    def faults(self, seen: int = 0) -> tuple[np.ndarray, int]:
        return self.ring.read_since(seen)

    def board(self, role: str) -> dict[str, float]:
        return self.boards[role].snapshot()

    def note(self, t: float, text: str) -> None:
        """Log an event that happened at emulated time t. Events arrive out of order (each
        child has its own pipe), so the part of the log no reader has seen yet is kept sorted
        by time; equal times keep their order of arrival."""
        at = bisect.bisect_right(self.log, t, lo=self._released, key=lambda event: event[0])
        self.log.insert(at, (t, text))

    def events(self, seen: int = 0, final: bool = False) -> tuple[list[tuple[float, str]], int]:
        """The log's events from number `seen` on, for a reader that shows them as they come
        (--trace, the window's event log), and the number to pass next time. An event is
        handed out once EVENT_DELAY_S has passed since its time, so that every earlier event
        has arrived and the reader shows them in time order; all of them once the run is over
        (or final)."""
        if final or self.finished:
            self._released = len(self.log)
        else:
            horizon = self.clock.now() - EVENT_DELAY_S * self.clock.scale
            while self._released < len(self.log) and self.log[self._released][0] <= horizon:
                self._released += 1
        return self.log[seen:self._released], self._released

    def events_in_order(self) -> list[tuple[float, str]]:
        """The whole log by time, an event that came later than EVENT_DELAY_S included."""
        return sorted(self.log, key=lambda event: event[0])

    # ---- internals ----

    def _create_segments(self) -> None:
        cfg, seg = self.cfg, self.segments
        for name, (size, allocated) in plan(cfg, ROLES).items():
            seg.create(name, size, allocated)
        npages = cfg.npages
        self.clock = Clock(seg.buf("clock"))
        self.src_ram, self.dst_ram = seg.buf("src-ram"), seg.buf("dst-ram")
        self.src_states = np.ndarray((npages,), np.uint8, buffer=seg.buf("src-states"))
        self.dst_states = np.ndarray((npages,), np.uint8, buffer=seg.buf("dst-states"))
        self.dst_arrival = np.ndarray((npages,), np.float64, buffer=seg.buf("dst-arrival"))
        self.boards = {
            "source": Board(source.FIELDS, seg.buf("src-board")),
            "destination": Board(destination.FIELDS, seg.buf("dst-board")),
            "network": Board(link.FIELDS, seg.buf("relay-board")),
        }
        self.ring = FaultRing(seg.buf("faults"), destination.RING)
        self.queue_buf = seg.buf("src-queue")

    def _spawn(self) -> None:
        ctx = mp.get_context("spawn")
        names = self.segments.names()
        plan = {
            # the run directory by its exact path: removed if we are killed, by the network
            # process, the last to use it
            "network": (link.main, (self.link_uri, self._incoming_uri(), self.tmpdir)),
            "destination": (destination.main, ()),
            "source": (source.main, ()),
        }
        for role, (target, args) in plan.items():
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=child_main, name=f"postcopy-emu-{role}", daemon=True,
                               args=(role, target, child, names, self.cfg, *args),
                               kwargs={"janitor": role == "network"})
            with signals.spawning():
                proc.start()
            child.close()
            self.children[role] = (proc, parent)

    def _incoming_uri(self) -> str:
        """Where the destination listens: a new address for every recovery, as in QEMU."""
        return f"unix:{self.tmpdir}/incoming-{self.recoveries}.sock"

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

    def _wait_ready(self) -> None:
        ready: set[str] = set()
        deadline = time.monotonic() + 60
        while len(ready) < len(self.children):
            if time.monotonic() > deadline:
                raise RunError("the emulator's processes did not start within 60 s")
            conns = self._live()
            for conn in wait_connections(list(conns), 0.1):
                try:
                    event = conn.recv()
                except (EOFError, OSError):
                    self._died(conns[conn])
                    raise RunError(self.errors[-1]) from None
                if event[0] == "ready":
                    ready.add(event[1])
                else:
                    self._event(event)
            if self.errors:
                raise RunError(self.errors[0])

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

    def _live(self) -> dict:
        return {conn: role for role, (_, conn) in self.children.items() if role not in self.dead}

    def _event(self, event: tuple) -> None:
        kind = event[0]
        if kind == "state":
            self._state(*event[1:])
        elif kind == "state-refused":
            self.note(event[5], refusal_text(event))
        elif kind == "listening":
            self.listening = event[1]
        elif kind == "link":
            self.note(event[3], f"link: {event[2]} connection {event[1]}")
        elif kind == "paused":
            self.note(self.clock.now(), f"{event[1]} paused: {event[2]}")
        elif kind == "refused":
            self.note(self.clock.now(), f"{event[1]} refused: {event[2]}")
            self.refused.append((event[1], event[2]))
            if self.recover_after is not None:
                self.recover_at = self.clock.now() + self.recover_after
        elif kind == "error":
            self.errors.append(f"{event[1]}: {event[2].strip()}")
        elif kind == "report":
            self.reports[event[1]] = event[2]
        elif kind == "exit":
            if not self.finished:
                self.errors.append(f"{event[1]} process exited before the end")

    def _died(self, role: str) -> None:
        proc = self.children[role][0]
        self.dead.add(role)
        self.death_deadline = time.monotonic() + 3
        proc.join(1)
        why = f"{role} process died (exit code {proc.exitcode})"
        if role != "network" and self.status["source"].startswith("postcopy"):
            why += (": postcopy had started, so the guest's memory was split between source "
                    "and destination; the guest cannot be saved")
        elif role == "destination":
            why += ": the migration failed; the guest keeps running on the source"
        self.errors.append(why)
        if role in self.status:
            self.status[role] = "failed"


def migrate(cfg: Config, progress=None, faults: list[Fault] = (),
            recover_after: float | None = 0.2) -> dict:
    """Run one migration to the end and return its report (see report.build)."""
    from emu.figures import report

    started = time.monotonic()
    run = None
    try:
        run = Run(cfg, faults, recover_after)
        run.start()
        run.wait(progress)
        checked = None
        if run.ok:
            checked = report.check_memory(
                cfg, np.frombuffer(run.src_ram, np.uint8), np.frombuffer(run.dst_ram, np.uint8),
                run.dst_states, run.reports["destination"])
        return report.build(run, checked, time.monotonic() - started)
    finally:
        if run is not None:
            run.stop()
