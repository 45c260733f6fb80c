"""The standalone programs: `postcopy-emu source`, `destination` and `link`.

Like two QEMUs and the network between them, each side runs as its own program, driven over
its own QMP monitor (emu/qmp/monitor.py), and the migration channels are unix or TCP sockets given
as QEMU URIs: the source connects to the link, which forwards each connection to the
destination's migrate-incoming address. Each program is a small controller that owns its
shared memory and its one engine child (source, destination or network, the same code
`postcopy-emu run` uses); a side spawns its child only when its configuration is final, at
migrate or migrate-incoming, since capabilities may change over QMP until then.

Each program has its own clock, started at emulator.time-scale when the program starts: the
emulated times one program reports are its own, not comparable with another's (the link stamps
a frame's arrival in real time for that reason, channel.py). Run the three at the same time
scale, or bandwidths and delays mean different things on each side.

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

import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from functools import partial

from emu import backend, engines, signals
from emu.config import Config
from emu.engines import Child, Shared
from emu.events import Bound, Died, Error, Event, Link, Ready, Trace
from emu.figures import timescale
from emu.net import uri
from emu.qmp.monitor import Monitor, serve_link
from emu.qmp.protocol import QmpError, QmpServer

QUIT_GRACE = 0.1  # real seconds for the reply to quit to go out before the monitor closes


class EngineError(RuntimeError):
    pass


class Engine:
    """One standalone program's engine child, the shared memory it works on (emu/engines.py),
    and the program's clock, started at once. Events from the child go to on_event, from a
    thread of their own.

    A destination's engine comes with its front, an engine of role network on the same
    clock and memory, started and stopped with it."""

    def __init__(self, role: str, cfg: Config, host: Engine | None = None,
                 trace: tuple[str, ...] = ()) -> None:
        """host: the engine whose clock and memory this one works on (a destination's);
        trace: QEMU -trace patterns of the trace points its child sends."""
        self.role = role
        self.trace = trace
        self.on_event: Callable[[Event], None] = lambda event: None
        self.hosted = host is not None
        if host:
            self.shared = host.shared
        else:
            roles = (role, "network") if role == "destination" else (role,)
            self.shared = Shared(cfg, roles)  # a guest that does not fit stops here
            # three programs can not calibrate in agreement: auto runs in real time, as QEMU
            self.shared.clock.start(timescale.numeric_scale(cfg))
        self.clock = self.shared.clock
        self.board = self.shared.boards[role]
        self.front = Engine("network", cfg, self, trace) if role == "destination" else None
        self.private: str | None = None  # the front's folder, removed by this very path
        self.child: Child | None = None
        self.ready = threading.Event()
        self.errors: list[str] = []

    @property
    def spawned(self) -> bool:
        return self.child is not None

    def spawn(self, cfg: Config, *args) -> None:
        if self.front:
            args = (*args, self._spawn_front(cfg))
        # the janitor of the program's segments, unless it works on its host's
        child = self.shared.spawn(self.role, cfg, *args, janitor=not self.hosted,
                                  trace=self.trace)
        self.child = child
        threading.Thread(target=self._read, args=(child,), name=f"{self.role}-events",
                         daemon=True).start()
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
        if self.child is not None:
            self.child.send(*command)

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready.wait(0.05):
            if self.errors or time.monotonic() > deadline:
                raise EngineError(self.errors[-1] if self.errors
                                  else f"the {self.role} process did not start")

    def stop_child(self) -> None:
        if self.child is not None:
            engines.stop([self.child])
            self.child = None
            self.ready.clear()
        if self.front:  # after the destination: what it still says is not about the link
            self.front.stop_child()
        if self.private:
            shutil.rmtree(self.private, ignore_errors=True)
            self.private = None

    def close(self) -> None:
        """Stop the child and unlink the segments: safe to call twice, not cut short."""
        with signals.held():
            self.stop_child()
            if not self.hosted:
                self.shared.close()

    def _read(self, child: Child) -> None:
        """The child's events, to on_event; its death, if it was not asked to stop."""
        while True:
            try:
                event = child.recv()
            except (EOFError, OSError):
                if not child.stopping:
                    event = Died(self.role, child.death())
                    self.errors.append(event.why)
                    self.on_event(event)
                return
            match event:
                case Ready():
                    self.ready.set()
                case Error():
                    self.errors.append(str(event))
            self.on_event(event)


class Program:
    """What each standalone program does around its work: say things on stderr, and run
    until quit, SIGTERM or Ctrl-C. trace: None, or the QEMU -trace patterns of --trace
    (none: only the state changes and connections)."""

    def __init__(self, name: str, trace: tuple[str, ...] | None) -> None:
        self.name = name
        self.tracing = trace is not None
        self.trace_patterns = trace or ()
        self.done = threading.Event()

    def say(self, text: str) -> None:
        print(f"{self.name}: {text}", file=sys.stderr, flush=True)

    def log(self, text: str, always: bool = False) -> None:
        if self.tracing or always:
            self.say(text)

    def quit(self) -> None:
        # the monitor closes when done is set: let the reply to quit go out first
        threading.Timer(QUIT_GRACE, self.done.set).start()

    def wait(self) -> None:
        while not self.done.wait(0.2):
            pass


def _run(name: str, args, body: Callable[[Program], int]) -> int:
    """Run a program's body with SIGTERM and SIGHUP turned into a clean exit, as QEMU does;
    Ctrl-C goes on to the command line, which says it was interrupted."""
    program = Program(name, args.trace)
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
    return _run(f"postcopy-emu {role}", args, partial(_side, role, args, cfg))


def _side(role: str, args, cfg: Config, program: Program) -> int:
    chosen = None
    if role == "destination":  # emulator.backend=auto chosen before the engine starts
        cfg, chosen = backend.resolve(cfg)
    # first: a guest that does not fit stops here, with one line
    engine = Engine(role, cfg, trace=program.trace_patterns)
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
        if chosen is not None:  # once it is up: a refusal before stays its one line
            program.say(f"emulator.backend: {chosen.describe()}")
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
    return _run("postcopy-emu link", args, partial(_link, args, cfg))


def _link(args, cfg: Config, program: Program) -> int:
    try:
        uri.parse(args.connect)
        uri.check_listen(args.listen)  # the network process listens there once started
    except (ValueError, OSError) as err:
        program.say(str(err))
        return 2
    engine = Engine("network", cfg, trace=program.trace_patterns)
    server = None
    if args.qmp:
        server = _monitor_server(program, args.qmp, args.allow_remote)
        if server is None:
            engine.close()
            return 2
    died = threading.Event()
    bound: list[uri.Pin] = []

    def on_event(event: Event) -> None:
        _link_event(program, event, bound)
        if isinstance(event, Died):  # nothing to relay without it: the program ends, says so
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


def _link_event(program: Program, event: Event, bound: list | None = None) -> None:
    """What a network child says, for its program. bound: where to keep the socket files the
    network process made, to remove them at the end (None: a front's, in a folder removed
    whole)."""
    match event:
        case Bound(file=file) if bound is not None:
            bound.append(uri.Pin(file))
        case Link(what, channel, t):
            program.log(f"[{t * 1e3:10.3f} ms] {channel} connection {what}")
        case Trace(t=t):
            program.log(f"[{t * 1e3:10.3f} ms] {event}")
        case Error(message=message):
            program.say(f"error: {message}")
        case Died(why=why):
            program.say(why)
