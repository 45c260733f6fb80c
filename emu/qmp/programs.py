"""The standalone programs: `postcopy-emu source`, `destination` and `link`.

Like two QEMUs and the network between them, each side runs as its own program, driven over
its own QMP monitor (emu/qmp/monitor.py), and the migration channels are unix or TCP sockets given
as QEMU URIs: the source connects to the link, which forwards each connection to the
destination's migrate-incoming address. Each program is a small controller that owns its
shared memory and its one engine child (source, destination or network, the same code
`postcopy-emu run` uses); a side spawns its child only when its configuration is final, at
migrate or migrate-incoming, since capabilities may change over QMP until then.

Each program has its own clock, started at emulator.time-scale when the program starts: the
emulated times one program reports are its own, not comparable with another's. Run the three
at the same time scale, or bandwidths and delays mean different things on each side.

A destination program also runs a network child of its own, its front (link.py): a source
connected straight to it, with no `link` program in the path, goes through the front's
emulated link (the scenario's link.* settings), so the same QMP script works with or without
a `link` program, and a connection through one is not emulated twice.

Whatever way a program ends (quit, SIGTERM, SIGHUP, Ctrl-C, an error, or a signal during the
clean-up after quit), its child is stopped, its segments unlinked and its sockets removed; if
the program itself is killed, its child sees its control connection close, unlinks the
segments and exits (before the child starts, the resource tracker is the one left to unlink
them). Before any segment exists, the program checks that its shared memory fits.
"""

from __future__ import annotations

import multiprocessing as mp
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from functools import partial

from emu import controller, signals
from emu.board import Board
from emu.child import child_main
from emu.clock import Clock
from emu.config import Config
from emu.migration import destination, source
from emu.net import link, uri
from emu.qmp.monitor import Monitor, serve_link
from emu.qmp.protocol import QmpError, QmpServer
from emu.shm import Segments

BODIES = {"source": source.main, "destination": destination.main, "network": link.main}
BOARDS = {"source": ("src-board", source.FIELDS),
          "destination": ("dst-board", destination.FIELDS),
          "network": ("relay-board", link.FIELDS)}
QUIT_GRACE = 0.1  # real seconds for the reply to quit to go out before the monitor closes


class EngineError(RuntimeError):
    pass


def _create(role: str, cfg: Config) -> tuple[Segments, Clock]:
    """The shared memory of one program (a destination's with its front's board), checked to
    fit first, and its clock, started."""
    roles = (role, "network") if role == "destination" else (role,)
    controller.check_room(cfg, roles)  # a guest that does not fit stops here, with one line
    segments = Segments()
    try:
        for name, (size, allocated) in controller.plan(cfg, roles).items():
            segments.create(name, size, allocated)
        clock = Clock(segments.buf("clock"))
    except BaseException:
        segments.close()
        raise
    clock.start(cfg["emulator.time-scale"])
    return segments, clock


class Engine:
    """One standalone program's engine child, the shared memory it works on, and the
    program's clock. Events from the child go to on_event, from a thread of their own.

    A destination's engine comes with its front, an engine of role network on the same
    clock and memory, started and stopped with it."""

    def __init__(self, role: str, cfg: Config, host: Engine | None = None) -> None:
        """host: the engine whose clock and memory this one works on (a destination's)."""
        self.role = role
        self.on_event: Callable[[tuple], None] = lambda event: None
        self.shared = host is not None
        if host:
            self.segments, self.clock = host.segments, host.clock
        else:
            self.segments, self.clock = _create(role, cfg)
        name, fields = BOARDS[role]
        self.board = Board(fields, self.segments.buf(name))
        self.front = Engine("network", cfg, self) if role == "destination" else None
        self.private: str | None = None  # the front's folder, removed by this very path
        self.proc: mp.Process | None = None
        self.conn = None
        self.ready = threading.Event()
        self.errors: list[str] = []
        self._send_lock = threading.Lock()
        self._stopping = False

    @property
    def spawned(self) -> bool:
        return self.proc is not None

    def spawn(self, cfg: Config, *args) -> None:
        if self.front:
            args = (*args, self._spawn_front(cfg))
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        self.proc = ctx.Process(target=child_main, name=f"postcopy-emu-{self.role}",
                                daemon=True, args=(self.role, BODIES[self.role], child,
                                                   self.segments.names(), cfg, *args),
                                kwargs={"janitor": not self.shared})
        with signals.spawning():
            self.proc.start()
        if not self.shared:
            self.segments.untrack()  # the child unlinks them if we are killed
        child.close()
        self.conn, self._stopping = parent, False
        threading.Thread(target=self._read, args=(parent, self.proc),
                         name=f"{self.role}-events", daemon=True).start()
        if self.front:
            try:  # a source may connect as soon as the destination listens
                self.front.wait_ready()
            except EngineError:
                self.stop_child()
                raise

    def _spawn_front(self, cfg: Config) -> str:
        """Start the front, listening in a private folder for the connections the
        destination hands over; the address it listens at."""
        self.private = tempfile.mkdtemp(prefix="postcopy-emu-front-")
        address = f"unix:{self.private}/handover.sock"
        self.front.spawn(cfg, address, "", self.private)
        return address

    def send(self, *command) -> None:
        """A command to the child; it reads them in order once it has started."""
        with self._send_lock:
            try:
                self.conn.send(command)
            except (OSError, AttributeError):
                pass  # the child is gone (its reader says so) or was stopped

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready.wait(0.05):
            if self.errors or time.monotonic() > deadline:
                raise EngineError(self.errors[-1] if self.errors
                                  else f"the {self.role} process did not start")

    def stop_child(self) -> None:
        self._stop()
        if self.front:  # after the destination: what it still says is not about the link
            self.front.stop_child()
        if self.private:
            shutil.rmtree(self.private, ignore_errors=True)
            self.private = None

    def _stop(self) -> None:
        if self.proc is None:
            return
        with signals.held():
            self._stopping = True
            self.send("quit")
            self.proc.join(3)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join(2)
            with self._send_lock:
                self.conn.close()
                self.proc = self.conn = None
            if not self.shared:
                self.segments.track()  # no child left to unlink them if we are killed
            self.ready.clear()

    def close(self) -> None:
        """Stop the child and unlink the segments: safe to call twice, not cut short."""
        with signals.held():
            self.stop_child()
            self.segments.close()

    def _read(self, conn, proc) -> None:
        while True:
            try:
                event = conn.recv()
            except (EOFError, OSError):
                if conn is self.conn and not self._stopping:  # not one we stopped
                    why = self._death(proc)
                    self.errors.append(why)
                    self.on_event(("died", self.role, why))
                return
            if event[0] == "ready":
                self.ready.set()
            elif event[0] == "error":
                self.errors.append(event[2].strip().splitlines()[-1])
            self.on_event(event)

    def _death(self, proc) -> str:
        """What became of a child that went away unasked, in one line."""
        proc.join(2)  # its control connection closes as it dies: the exit status follows
        code = proc.exitcode
        if code is not None and code < 0:
            try:
                how = f"killed by {signal.Signals(-code).name}"
            except ValueError:
                how = f"killed by signal {-code}"
        else:
            how = "still running" if code is None else f"exit code {code}"
        return f"the {self.role} process died ({how})"


class Program:
    """What each standalone program does around its work: say things on stderr, and run
    until quit, SIGTERM or Ctrl-C."""

    def __init__(self, name: str, trace: bool) -> None:
        self.name = name
        self.trace = trace
        self.done = threading.Event()

    def say(self, text: str) -> None:
        print(f"{self.name}: {text}", file=sys.stderr, flush=True)

    def log(self, text: str, always: bool = False) -> None:
        if self.trace or always:
            self.say(text)

    def quit(self) -> None:
        # the monitor closes when done is set: let the reply to quit go out first
        threading.Timer(QUIT_GRACE, self.done.set).start()

    def wait(self) -> None:
        while not self.done.wait(0.2):
            pass


def _run(name: str, trace: bool, body: Callable[[Program], int]) -> int:
    """Run a program's body with SIGTERM and SIGHUP turned into a clean exit, as QEMU does;
    Ctrl-C goes on to the command line, which says it was interrupted."""
    program = Program(name, trace)
    with signals.stopping():
        try:
            return body(program)
        except signals.Stopped as stop:
            if stop.signum == signal.SIGINT:
                raise
            program.say(f"terminating on signal {stop.signum}")
            return 0


def _monitor_server(program: Program, address: str, allow_remote: bool) -> QmpServer | None:
    """The QMP monitor of --qmp, tried before anything starts; None once said why not."""
    try:
        server = QmpServer(address, allow_remote=allow_remote)
        uri.check_listen(address)
        return server
    except (ValueError, OSError) as err:
        program.say(str(err))
        return None


def run_side(role: str, args, cfg: Config) -> int:
    """`postcopy-emu source` / `postcopy-emu destination`."""
    return _run(f"postcopy-emu {role}", args.trace, partial(_side, role, args, cfg))


def _side(role: str, args, cfg: Config, program: Program) -> int:
    engine = Engine(role, cfg)  # first: a guest that does not fit stops here, with one line
    server = _monitor_server(program, args.qmp, args.allow_remote)
    if server is None:
        engine.close()
        return 2
    if engine.front:
        engine.front.on_event = partial(_link_event, program)
    monitor = Monitor(role, cfg, engine, program.quit, program.log)
    try:
        monitor.serve(server)
        incoming = getattr(args, "incoming", "defer")
        if incoming != "defer":
            monitor.migrate_incoming(incoming)  # -incoming URI: listening before QMP answers
        server.start()
        program.say(f"QMP monitor on {server.address}")
        program.wait()
        return 0
    except (QmpError, OSError) as err:  # where --incoming or --qmp cannot listen
        program.say(str(err))
        return 2
    finally:
        with signals.held():
            server.close()
            monitor.close()


def run_link(args, cfg: Config) -> int:
    """`postcopy-emu link`: the emulated network between a source and a destination."""
    return _run("postcopy-emu link", args.trace, partial(_link, args, cfg))


def _link(args, cfg: Config, program: Program) -> int:
    try:
        uri.parse(args.connect)
        uri.check_listen(args.listen)  # the network process listens there once started
    except (ValueError, OSError) as err:
        program.say(str(err))
        return 2
    engine = Engine("network", cfg)
    server = None
    if args.qmp:
        server = _monitor_server(program, args.qmp, args.allow_remote)
        if server is None:
            engine.close()
            return 2
    died = threading.Event()
    bound: list[uri.Pin] = []

    def on_event(event: tuple) -> None:
        _link_event(program, event, bound)
        if event[0] == "died":  # nothing to relay without it: the program ends, and says so
            died.set()
            program.done.set()
    engine.on_event = on_event
    try:
        engine.spawn(cfg, args.listen, args.connect)
        engine.wait_ready()
        if server:
            serve_link(server, engine, program.quit)
            server.start()
        monitor = f"; QMP monitor on {server.address}" if server else ""
        program.say(f"relaying {args.listen} -> {args.connect}{monitor}")
        program.wait()
        return 1 if died.is_set() else 0
    except (EngineError, OSError) as err:
        program.say(str(err))
        return 1
    finally:
        with signals.held():
            if server:
                server.close()
            engine.close()
            for pin in bound:  # once the network process is gone: nobody listens there now
                pin.remove()


def _link_event(program: Program, event: tuple, bound: list | None = None) -> None:
    """bound: where to keep the socket files the network process made, to remove them at the
    end (None: a front's, in a folder removed whole)."""
    if event[0] == "bound" and bound is not None:
        bound.append(uri.Pin(event[2]))
    elif event[0] == "link":
        program.log(f"[{event[3] * 1e3:10.3f} ms] {event[2]} connection {event[1]}")
    elif event[0] == "error":
        program.say(f"error: {event[2].strip().splitlines()[-1]}")
    elif event[0] == "died":
        program.say(event[2])
