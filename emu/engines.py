"""A program's engines: the shared memory they work on, and the children that run them.

`postcopy-emu run` (emu/controller.py) runs the three engines (source, destination, network)
on one shared memory; each standalone program (emu/qmp/programs.py) runs one, a destination
with its front. Both assemble them here, the one way:

- Shared: the segments of some roles (their names are in emu/shm.py), checked to fit before
  the first one is made, with views of what each holds: the clock, the boards, the page states.
- Shared.spawn: an engine child started with the segments' names, the terminal's signals held
  back until it ignores them, named after its role (emu/child.py sets its title). One child
  of a program is its janitor: it unlinks the segments if the program is killed, so while it
  lives the resource tracker must not (untrack), and once it is stopped the tracker is the one
  left to (track).
- stop: quit, then kill what has not ended after STOP_GRACE, a signal meanwhile waiting until
  it is done (signals.held); Child.death says, in one line, what became of one that went away
  unasked.
"""

from __future__ import annotations

import multiprocessing as mp
import signal
import threading
import time
from collections.abc import Iterable

import numpy as np

from emu import backend, shm, signals
from emu.board import Board
from emu.child import child_main
from emu.clock import Clock
from emu.config import Config
from emu.events import Event
from emu.figures.metrics import FaultRing
from emu.migration import destination, source
from emu.migration import ram as R
from emu.migration.page_requests import PageRequestQueue, read_published
from emu.net import link
from emu.shm import Segments
from emu.units import format_size

ROLES = ("source", "destination", "network")
# each role's engine, the module whose main() the child runs (looked up at spawn time)
BODIES = {"source": source, "destination": destination, "network": link}
BOARDS = {"source": (shm.SRC_BOARD, source.FIELDS),
          "destination": (shm.DST_BOARD, destination.FIELDS),
          "network": (shm.RELAY_BOARD, link.FIELDS)}
STATES = {"source": shm.SRC_STATES, "destination": shm.DST_STATES}
RAMS = {"source": shm.SRC_RAM, "destination": shm.DST_RAM}
STOP_GRACE = 3.0  # real seconds for the children to end after quit, before they are killed


def layout(role: str, cfg: Config) -> dict[str, tuple[int, bool]]:
    """The shared memory one engine child works on: name -> (bytes, allocated now). A guest
    RAM without emulator.payload is never written: it stays sparse."""
    npages, ram, payload = cfg.npages, cfg["guest.ram"], cfg["emulator.payload"]
    if role == "source":
        return {shm.SRC_RAM: (ram, payload), shm.SRC_STATES: (npages, True),
                shm.SRC_BOARD: (Board.nbytes(source.FIELDS), True),
                shm.SRC_QUEUE: (PageRequestQueue.nbytes(), True)}
    if role == "destination":
        return {shm.DST_RAM: (ram, payload), shm.DST_STATES: (npages, True),
                shm.DST_ARRIVAL: (8 * npages, True),
                shm.DST_BOARD: (Board.nbytes(destination.FIELDS), True),
                shm.FAULTS: (FaultRing.nbytes(destination.RING), True)}
    return {shm.RELAY_BOARD: (Board.nbytes(link.FIELDS), True)}


def plan(cfg: Config, roles: tuple[str, ...]) -> dict[str, tuple[int, bool]]:
    """Every segment of a program running these roles' engines, with its clock; checked
    with check_room() before the first one is made."""
    segments = {shm.CLOCK: (Clock.NBYTES, True)}
    for role in roles:
        segments.update(layout(role, cfg))
    return segments


def huge_page(cfg: Config) -> int:
    """The huge page size the destination's guest RAM is made of, 0 for a /dev/shm segment:
    under emulator.backend=userfaultfd with guest.page-size 2MiB or 1GiB it is a hugetlb memfd
    (shm.HugeSegment), as QEMU's -object memory-backend-memfd,hugetlb=on, because a huge page
    can fault and be placed whole only on hugetlbfs."""
    if cfg["emulator.backend"] == "userfaultfd" and cfg.page_size > R.TARGET_PAGE:
        return cfg.page_size
    return 0


def check_room(cfg: Config, roles: tuple[str, ...]) -> None:
    """shm.NoRoom, one line naming guest.ram, if these roles' shared memory does not fit
    with the backend the run will use (emulator.backend=auto chosen as the run chooses it)."""
    cfg = backend.resolve(cfg)[0]
    ram = format_size(cfg["guest.ram"])
    rams = sum(role != "network" for role in roles) if cfg["emulator.payload"] else 0
    what = {0: f"the page arrays of a {ram} guest", 1: f"a guest RAM of {ram} and its page arrays",
            2: f"two guest RAMs of {ram} and their page arrays"}[rams]
    on_huge = {shm.DST_RAM} if huge_page(cfg) else set()  # counted in huge pages instead
    shm.check_room((size for name, (size, allocated) in plan(cfg, roles).items()
                    if allocated and name not in on_huge), what)
    check_backend(cfg, roles)


def check_backend(cfg: Config, roles: tuple[str, ...]) -> None:
    """A ConfigError, one line saying why and what to change, if the destination's
    emulator.backend=userfaultfd cannot work on this machine (emu/backend.py: uffd.probe(),
    as QEMU's postcopy_ram_supported_by_host() at migrate-incoming; with huge pages, also
    fewer free than guest RAM needs)."""
    if "destination" in roles:
        backend.check(cfg)


class Shared:
    """The shared memory of one program's engines, made for their roles, and views of it.
    The clock is not started: the program starts it when emulated time should run."""

    def __init__(self, cfg: Config, roles: tuple[str, ...]) -> None:
        check_room(cfg, roles)  # a guest that does not fit stops here, with one line
        self.segments = Segments()
        try:
            for name, (size, allocated) in plan(cfg, roles).items():
                self.segments.create(name, size, allocated,
                                     huge_page(cfg) if name == shm.DST_RAM else 0)
        except BaseException:
            self.segments.close()
            raise
        names = self.segments.names()
        self.clock = Clock(self.buf(shm.CLOCK))
        self.boards = {role: Board(fields, self.buf(name))
                       for role, (name, fields) in BOARDS.items() if name in names}
        # page states by role: one byte per host page (emu/migration/ram.py)
        self.states = {role: np.ndarray((cfg.npages,), np.uint8, buffer=self.buf(name))
                       for role, name in STATES.items() if name in names}
        self.arrival = self.ring = self._queue = None
        if "destination" in roles:  # when each page arrived; every fault resolved
            self.arrival = np.ndarray((cfg.npages,), np.float64, buffer=self.buf(shm.DST_ARRIVAL))
            self.ring = FaultRing(self.buf(shm.FAULTS), destination.RING)
        if "source" in roles:
            self._queue = self.buf(shm.SRC_QUEUE)

    def buf(self, name: str) -> memoryview:
        return self.segments.buf(name)

    def ram(self, role: str) -> np.ndarray:
        """The guest RAM of `role`, as bytes."""
        return np.frombuffer(self.buf(RAMS[role]), np.uint8)

    def requests(self) -> list[tuple[int, float]]:
        """The source's request queue as it publishes it: (host page, time queued)."""
        return read_published(self._queue)

    def spawn(self, role: str, cfg: Config, *args, janitor: bool,
              trace: Iterable[str] = ()) -> Child:
        """Start `role`'s engine child on these segments; args go to its main() after cfg.
        trace: QEMU -trace patterns of the trace points it sends."""
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=child_main, name=f"postcopy-emu-{role}", daemon=True,
                           args=(role, BODIES[role].main, child, self.segments.names(), cfg,
                                 *args),
                           kwargs={"janitor": janitor, "trace_patterns": tuple(trace)})
        with signals.spawning():
            proc.start()
        child.close()
        if janitor:
            self.segments.untrack()  # it unlinks them if we are killed
        return Child(role, proc, parent, self if janitor else None)

    def close(self) -> None:
        """Unlink every segment: safe to call twice, and with views still alive."""
        self.segments.close()


class Child:
    """One engine child: its process, and the program's end of its control connection."""

    def __init__(self, role: str, proc: mp.Process, conn, janitor_of: Shared | None) -> None:
        self.role = role
        self.proc = proc
        self.conn = conn
        self.stopping = False  # asked to quit: its going away is no death
        self._janitor_of = janitor_of
        self._send_lock = threading.Lock()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def send(self, *command) -> None:
        """A command to the child; it reads them in order once it has started. One to a child
        that is gone is lost: what reads its events says it died."""
        with self._send_lock:
            try:
                self.conn.send(command)
            except OSError:
                pass

    def recv(self) -> Event:
        """The child's next event; EOFError or OSError once it is gone, or once stop closed
        the connection under a reader blocked here (multiprocessing then finds its handle
        gone and raises TypeError: the same end, said otherwise)."""
        try:
            return self.conn.recv()
        except TypeError:
            raise EOFError("the control connection was closed") from None

    def death(self) -> str:
        """What became of a child that went away unasked, in one line."""
        self.proc.join(2)  # its control connection closes as it dies: the exit status follows
        code = self.proc.exitcode
        if code is not None and code < 0:
            try:
                how = f"killed by {signal.Signals(-code).name}"
            except ValueError:
                how = f"killed by signal {-code}"
        else:
            how = "still running" if code is None else f"exit code {code}"
        return f"the {self.role} process died ({how})"

    def _end(self, deadline: float) -> None:
        self.proc.join(max(0.1, deadline - time.monotonic()))
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(2)
        with self._send_lock:
            self.conn.close()
        if self._janitor_of is not None:
            self._janitor_of.segments.track()  # nobody left to unlink them if we are killed


def stop(children: Iterable[Child], grace: float = STOP_GRACE) -> None:
    """End these children: quit to all, then wait `grace` real seconds in all and kill those
    still there. Safe to call twice; a signal meanwhile waits until it is done."""
    with signals.held():
        children = list(children)
        for child in children:
            child.stopping = True
            child.send("quit")
        deadline = time.monotonic() + grace
        for child in children:
            child._end(deadline)
