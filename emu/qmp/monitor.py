"""QEMU's migration commands over QMP, for one side of a migration run as its own program.

`postcopy-emu source` and `postcopy-emu destination` each serve a QMP monitor (emu/qmp/protocol.py)
whose commands drive the side's one engine child (emu/qmp/programs.py) the way QEMU's monitor
drives its migration code: the argument names, reply shapes, events and error texts are QEMU's
(migration/migration.c, migration/options.c, system/runstate.c, qapi/migration.json). Both
programs answer every command, as QEMU is one binary: `migrate-incoming` on a source says
"'-incoming' was not specified on the command line", as QEMU would.

What the emulator does not model is said plainly: the capabilities it emulates are events,
postcopy-ram, postcopy-preempt and postcopy-blocktime (setting any other QEMU capability to true
is an error); `stop` and `cont` change the run state and emit STOP and RESUME as QEMU does, but
only reach the emulated vCPUs on the source before the switchover.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from emu import faults
from emu.config import Config
from emu.events import (
    Bound,
    Died,
    Error,
    Event,
    Listening,
    Paused,
    Refused,
    Report,
    StateChanged,
    StateRefused,
    Trace,
)
from emu.figures import integrity, report
from emu.migration import states
from emu.net import uri as uris
from emu.qmp.protocol import QmpError, QmpServer

# MigrationCapability of QEMU 7.1 (qapi/migration.json), in its order
QEMU_CAPABILITIES = (
    "xbzrle", "rdma-pin-all", "auto-converge", "zero-blocks", "compress", "events",
    "postcopy-ram", "x-colo", "release-ram", "block", "return-path", "pause-before-switchover",
    "multifd", "dirty-bitmaps", "postcopy-blocktime", "late-block-activate", "x-ignore-shared",
    "validate-uuid", "background-snapshot", "zero-copy-send", "postcopy-preempt")
# the capabilities the emulator models, and the configuration key each one sets
EMULATED = {"events": None, "postcopy-ram": "migration.postcopy-ram",
            "postcopy-blocktime": "migration.postcopy-blocktime",
            "postcopy-preempt": "migration.postcopy-preempt"}
PARAMETERS = ("max-bandwidth", "downtime-limit", "max-postcopy-bandwidth")
MAX_DOWNTIME_MS = 2000 * 1000  # MAX_MIGRATE_DOWNTIME
# migration_is_running() and migration_in_postcopy()
RUNNING = ("setup", "active", "device", "postcopy-device", "postcopy-active", "postcopy-paused",
           "postcopy-recover-setup", "postcopy-recover", "cancelling", "pre-switchover",
           "wait-unplug")
IN_POSTCOPY = ("postcopy-device", "postcopy-active", "postcopy-paused", "postcopy-recover-setup",
               "postcopy-recover")
LISTEN_TIMEOUT = 30.0  # real seconds for a freshly spawned child to listen (it imports numpy)


class Monitor:
    """The QMP commands of one side; `engine` is that side's standalone.Engine."""

    def __init__(self, role: str, cfg: Config, engine, on_quit: Callable[[], None],
                 log: Callable[..., None] = lambda text, always=False: None) -> None:
        """log(text, always=False): a line for stderr, shown with --trace or when `always`."""
        self.role = role
        self.cfg = cfg  # the scenario; capabilities change it when the child starts
        self.final_cfg = cfg
        self.engine = engine
        self.on_quit = on_quit
        self.log = log
        self.server: QmpServer | None = None
        self.caps = {"events": False, **{n: bool(cfg[k]) for n, k in EMULATED.items() if k}}
        self.params = {"max-bandwidth": int(cfg["migration.max-bandwidth"]),
                       "downtime-limit": round(cfg["migration.downtime-limit"] * 1000),
                       "max-postcopy-bandwidth": int(cfg["migration.max-postcopy-bandwidth"])}
        self.status = "none"  # this side's MigrationStatus (outgoing or incoming)
        self.runstate = "inmigrate" if role == "destination" else "running"
        self.autostart = True
        self.started_at = 0.0  # emulated time of migrate, on this program's clock
        self.error_desc: str | None = None
        self.listening: list[str] = []  # every address the destination listened on
        self.socket_files: list[uris.Pin] = []  # the unix sockets its child bound
        self.report: dict | None = None
        self.reported = threading.Event()
        self.integrity: dict | None = None
        self._outcomes: queue.SimpleQueue = queue.SimpleQueue()  # (error or None) per request
        self._lock = threading.Lock()
        engine.on_event = self.event

    def serve(self, server: QmpServer) -> None:
        self.server = server
        for name, handler, args, required in self._commands():
            server.register(name, handler, args, required)

    def close(self) -> None:
        self.engine.close()
        for pin in self.socket_files:  # once the child is gone: nobody listens there now
            pin.remove()

    def _commands(self) -> list[tuple]:
        uri = ({"uri": str}, {"uri"})
        commands = [
            ("query-status", self.query_status, None, ()),
            ("stop", self.stop, None, ()),
            ("cont", self.cont, None, ()),
            ("quit", self.quit, None, ()),
            ("migrate-set-capabilities", self.set_capabilities, {"capabilities": list},
             {"capabilities"}),
            ("query-migrate-capabilities", self.query_capabilities, None, ()),
            ("migrate-set-parameters", self.set_parameters, dict.fromkeys(PARAMETERS, object),
             ()),
            ("query-migrate-parameters", lambda: dict(self.params), None, ()),
            ("migrate", self.migrate, {"uri": str, "detach": bool, "resume": bool}, {"uri"}),
            ("migrate-incoming", self.migrate_incoming, *uri),
            ("migrate-recover", self.migrate_recover, *uri),
            ("migrate-start-postcopy", self.start_postcopy, None, ()),
            ("migrate-pause", self.pause, None, ()),
            ("migrate_cancel", self.cancel, None, ()),
            ("query-migrate", self.query_migrate, None, ()),
        ]
        if self.role == "destination":
            commands.append(("x-query-integrity", self.query_integrity, None, ()))
        return commands

    # ---- what the engine child says ----

    def event(self, event: Event) -> None:
        """An event from the engine child (its reader thread)."""
        match event:
            case StateChanged(side, status, t):
                self.log(f"[{t * 1e3:10.3f} ms] {side}: {status}")
                self._set_status(status)
            case StateRefused(t=t) | Trace(t=t):
                self.log(f"[{t * 1e3:10.3f} ms] {event}")
            case Bound(file=file):
                self.socket_files.append(uris.Pin(file))
            case Listening(uri):
                self.listening.append(uri)
                self._outcomes.put(None)
            case Refused(command, message):
                self.log(f"{command} refused: {message}")
                self._outcomes.put(message)
            case Error(message=message):
                self.error_desc = message  # query-migrate's error-desc once failed
                self.log(f"error: {event}", always=True)
                self._outcomes.put(message)
            case Paused(side, reason):
                self.log(f"{side} paused: {reason}")
            case Report(report=report):
                self.report = report
                self.reported.set()
            case Died(why=why):
                self.log(why, always=True)
                self.error_desc = self.error_desc or why  # a failure it told first stays why
                self._outcomes.put(why)
                if self.status not in ("completed", "failed", "cancelled"):
                    self._set_status("failed")

    def _set_status(self, status: str) -> None:
        with self._lock:
            if status == self.status:
                return
            self.status = status
        if self.caps["events"]:
            self._emit("MIGRATION", {"status": status})
        self._follow_runstate(status)

    def _follow_runstate(self, status: str) -> None:
        """The run state moves with the migration, as QEMU moves it."""
        if self.role == "source":
            if status == "device":
                self._set_runstate("finish-migrate")  # migration_stop_vm()
            elif status == "completed":
                self._set_runstate("postmigrate")
            elif status in ("failed", "cancelled") and self.runstate == "finish-migrate" \
                    and not self.engine.board.snapshot()["postcopy-package-loaded"]:
                # the guest goes on here, unless the destination said it runs it (10.2's
                # postcopy-device: migration_block_activate() fails, vm_start() is skipped)
                self._set_runstate("running")
        elif self.runstate == "inmigrate" and status in ("postcopy-active", "completed"):
            # POSTCOPY_RUN (or the end of a precopy migration) starts the guest here
            self._set_runstate("running" if self.autostart else "paused")

    def _set_runstate(self, state: str) -> None:
        was, self.runstate = self.runstate, state
        if was == "running" and state != "running":
            self._emit("STOP")
        elif state == "running" and was != "running":
            self._emit("RESUME")

    def _emit(self, name: str, data: dict | None = None) -> None:
        if self.server:
            self.server.emit(name, data)

    # ---- the guest ----

    def query_status(self) -> dict:
        return {"status": self.runstate, "running": self.runstate == "running"}

    def stop(self) -> None:
        if self.runstate == "inmigrate":
            self.autostart = False  # the guest stays paused when the migration is done
        elif self.runstate == "running":
            self._set_runstate("paused")
            self._guest("stop")

    def cont(self) -> None:
        if self.runstate == "finish-migrate":
            raise QmpError("Migration is not finalized yet")
        if self.runstate == "inmigrate":
            self.autostart = True
            return
        self._set_runstate("running")
        self._guest("cont")

    def _guest(self, command: str) -> None:
        """stop and cont reach the source's vCPUs; the engine ignores them after switchover."""
        if self.role == "source" and self.engine.spawned:
            self.engine.send(command)

    def quit(self) -> None:
        self._emit("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})
        self.on_quit()

    # ---- capabilities and parameters ----

    def set_capabilities(self, capabilities: list) -> None:
        if self._outgoing in RUNNING:
            raise QmpError("There's a migration process in progress")
        new = dict(self.caps)
        for name, state in [_capability(i, item) for i, item in enumerate(capabilities)]:
            if name in EMULATED:
                new[name] = state
            elif state:
                raise QmpError(f"Capability '{name}' is not emulated by postcopy-emu "
                               f"(it emulates {', '.join(EMULATED)})")
        if new["postcopy-preempt"] and not new["postcopy-ram"]:
            raise QmpError("Postcopy preempt requires postcopy-ram")
        if self._incoming_started and new["postcopy-preempt"] != self.caps["postcopy-preempt"]:
            raise QmpError("Postcopy preempt must be set before incoming starts")
        self.caps = new

    def query_capabilities(self) -> list[dict]:
        return [{"capability": name, "state": self.caps[name]}
                for name in QEMU_CAPABILITIES if name in EMULATED]

    def set_parameters(self, **given: Any) -> None:
        values = {name.replace("_", "-"): value for name, value in given.items()}
        values = {name: _uint64(name, value) for name, value in values.items()}
        if values.get("downtime-limit", 0) > MAX_DOWNTIME_MS:
            # QEMU's stringify() of MAX_MIGRATE_DOWNTIME prints the expression itself
            raise QmpError("Parameter 'downtime_limit' expects an integer in the range of 0 "
                           "to (2000 * 1000) ms")
        self.params.update(values)
        rates = {k: float(v) for k, v in values.items() if k != "downtime-limit"}
        if rates and self.role == "source" and self.engine.spawned:
            self.engine.send("migrate-set-parameters", rates)

    # ---- migration ----

    def migrate(self, uri: str, detach: bool = False, resume: bool = False) -> None:
        """`detach` is accepted and ignored, as QEMU does."""
        if resume:
            if self._outgoing != "postcopy-paused":
                raise QmpError("Cannot resume if there is no paused migration")
            _check_uri(uri, "Parameter 'uri' expects a valid migration protocol")
            self.engine.send("migrate-resume", uri)
            return
        self._migrate_prepare()
        _check_uri(uri, "Parameter 'uri' expects a valid migration protocol")
        self._spawn()
        if self.runstate != "running":
            self.engine.send("stop")
        self.engine.send("migrate-set-parameters",
                         {k: float(v) for k, v in self.params.items() if k != "downtime-limit"})
        self.started_at = self.engine.clock.now()
        self._set_status("setup")
        self.engine.send("migrate", uri)
        if not self.caps["postcopy-ram"]:
            _thread("convergence", self._converge)

    def _migrate_prepare(self) -> None:
        """migrate_prepare()'s checks, in its order."""
        if self._outgoing in RUNNING:
            raise QmpError("There's a migration process in progress")
        if self.runstate == "inmigrate":
            raise QmpError("Guest is waiting for an incoming migration")
        if self.runstate == "postmigrate":
            raise QmpError("Can't migrate the vm that was paused due to previous migration")
        if self.role != "source":
            raise QmpError("postcopy-emu migrates from a source program only: start one to "
                           "migrate this guest onward")
        if self.engine.spawned:
            raise QmpError(f"postcopy-emu runs one outgoing migration per source program "
                           f"(this one is {self.status}): start a new source to migrate again")

    def _converge(self) -> None:
        """Without postcopy-ram the engine has no convergence test of its own: stop and copy
        after migration.switchover-after of precopy, as `postcopy-emu run` does."""
        at = self.started_at + self.cfg["migration.switchover-after"]
        while self.status in ("setup", "active"):
            if not self.engine.clock.sleep_until(at, 0.05):
                continue
            if self.status == "active":
                self.engine.send("migrate-start-postcopy")
                return
            time.sleep(0.01)

    def migrate_incoming(self, uri: str) -> None:
        if self._incoming_started:
            raise QmpError("The incoming migration has already been started")
        if self.runstate != "inmigrate":
            raise QmpError("'-incoming' was not specified on the command line")
        _check_uri(uri, f"unknown migration protocol: {uri}")
        self._spawn()
        error = self._request("migrate-incoming", uri)
        if error:
            # nothing was started: a later migrate-incoming starts afresh, as in QEMU
            self.engine.stop_child()
            with self._lock:
                self.status = "none"
            raise QmpError(f"Failed to listen on {uri}: {error}")

    def migrate_recover(self, uri: str) -> None:
        if self._incoming != "postcopy-paused":
            raise QmpError("Migrate recover can only be run when postcopy is paused.")
        _check_uri(uri, f"unknown migration protocol: {uri}")
        error = self._request("migrate-recover", uri)
        if error:
            raise QmpError(f"Failed to listen on {uri}: {error}")

    def start_postcopy(self) -> None:
        if not self.caps["postcopy-ram"]:
            raise QmpError("Enable postcopy with migrate_set_capability before the start of "
                           "migration")
        if self._outgoing == "none":
            raise QmpError("Postcopy must be started after migration has been started")
        if self._outgoing in ("setup", "active"):  # later it is not an error: it would race
            self.engine.send("migrate-start-postcopy")

    def pause(self) -> None:
        if refusal := states.pause_refusal(self.status):
            raise QmpError(refusal)
        self.engine.send("migrate-pause")

    def cancel(self) -> None:
        if self._outgoing in IN_POSTCOPY:
            raise QmpError("Postcopy migration in progress, cannot cancel.")
        if self._outgoing in ("setup", "active"):
            self.engine.send("migrate_cancel")

    @property
    def _outgoing(self) -> str:
        return self.status if self.role == "source" else "none"

    @property
    def _incoming(self) -> str:
        return self.status if self.role == "destination" else "none"

    @property
    def _incoming_started(self) -> bool:
        return self.role == "destination" and self.engine.spawned

    def _spawn(self) -> None:
        """Start the engine child: the capabilities are final from here on."""
        sets = [f"{key}={str(self.caps[name]).lower()}" for name, key in EMULATED.items() if key]
        self.final_cfg = self.cfg.with_overrides(sets)
        self.error_desc = None  # a new engine runs a new migration
        self.engine.spawn(self.final_cfg)

    def _request(self, *command) -> str | None:
        """Send a command the child answers (listening, or a refusal); its error or None."""
        while not self._outcomes.empty():
            self._outcomes.get()  # what earlier commands left behind
        self.engine.send(*command)
        try:
            return self._outcomes.get(timeout=LISTEN_TIMEOUT)
        except queue.Empty:
            return f"the {self.role} did not answer {command[0]} within {LISTEN_TIMEOUT:.0f} s"

    # ---- what QEMU reports ----

    def query_migrate(self) -> dict:
        if self.role == "source":
            return self._source_info()
        return self._destination_info()

    def _source_info(self) -> dict:
        """fill_source_migration_info(): what each status shows."""
        status = self.status
        if status == "none":
            return {}
        if status in ("setup", "cancelled"):
            return {"status": status}
        if status == "failed":
            return {"status": status, "error-desc": self.error_desc or "unknown error"}
        board = self.engine.board.snapshot()
        if status != "completed":
            board["total-time"] = self.engine.clock.now() - self.started_at  # so far
        info = report.source_migration_info(self.final_cfg, status, board)
        if status != "completed":
            del info["downtime"]  # QEMU shows it once the migration has completed
        return info

    def _destination_info(self) -> dict:
        """fill_destination_migration_info(): the status, where it listens, and once completed
        with postcopy-blocktime, the blocktime and the fault latencies."""
        if self.status == "none":
            return {}
        info: dict = {"status": self.status}
        if self.listening:
            info["socket-address"] = [uris.parse(self.listening[-1]).socket_address()]
        if self.status == "failed":  # QEMU shows the incoming side's error too
            info["error-desc"] = self.error_desc or "unknown error"
        if self.status == "completed" and self.caps["postcopy-blocktime"] \
                and self.reported.wait(5):
            info.update(report.destination_postcopy_info(self.final_cfg, self.report["faults"]))
        return info

    def query_integrity(self) -> dict:
        """x-query-integrity: the memory check after an incoming migration
        (emu/figures/integrity.py, check_replayed)."""
        if self.status != "completed" or not self.reported.wait(5):
            raise QmpError(f"The memory check needs a completed incoming migration "
                           f"(status: {self.status})")
        if self.integrity is None:
            shared = self.engine.shared
            self.integrity = integrity.check_replayed(self.final_cfg, shared.ram("destination"),
                                                      shared.states["destination"], self.report)
        return self.integrity


# ---- the link's monitor ----

def serve_link(server: QmpServer, engine, on_quit: Callable[[], None]) -> None:
    """QMP on `postcopy-emu link`: break the network on purpose, or point it elsewhere. These
    are not QEMU commands, hence the x- prefix."""
    def action(name: str) -> Callable[[str], None]:
        def act(channel: str) -> None:
            if channel not in faults.CHANNELS:
                raise QmpError(f"Parameter 'channel' does not accept value '{channel}'")
            engine.send(name, channel)
        return act

    def connect(uri: str) -> None:
        _check_uri(uri, f"unknown migration protocol: {uri}")
        engine.send("target", uri)

    channel = ({"channel": str}, {"channel"})
    server.register("x-link-cut", action("cut"), *channel)
    server.register("x-link-corrupt", action("corrupt"), *channel)
    server.register("x-link-connect", connect, {"uri": str}, {"uri"})
    server.register("x-query-link", lambda: {k: int(v) if v.is_integer() else v
                                             for k, v in engine.board.snapshot().items()})
    server.register("quit", on_quit)


# ---- QEMU's argument checks ----

def _capability(i: int, item: object) -> tuple[str, bool]:
    """One MigrationCapabilityStatus, checked as QEMU's input visitor checks it."""
    where = f"capabilities[{i}]"
    if not isinstance(item, dict):
        raise QmpError(f"Invalid parameter type for '{where}', expected: object")
    for member, kind, kind_name in (("capability", str, "string"), ("state", bool, "boolean")):
        if member not in item:
            raise QmpError(f"Parameter '{where}.{member}' is missing")
        if not isinstance(item[member], kind):
            raise QmpError(f"Invalid parameter type for '{where}.{member}', expected: "
                           f"{kind_name}")
        if member == "capability" and item[member] not in QEMU_CAPABILITIES:
            raise QmpError(f"Parameter 'capability' does not accept value '{item[member]}'")
    for member in item:
        if member not in ("capability", "state"):
            raise QmpError(f"Parameter '{where}.{member}' is unexpected")
    return item["capability"], item["state"]


def _uint64(name: str, value: object) -> int:
    """QEMU's uint64 visitor: negative integers wrap around, for backward compatibility."""
    if isinstance(value, bool) or not isinstance(value, int) or not -(1 << 63) <= value < 1 << 64:
        raise QmpError(f"Parameter '{name}' expects uint64")
    return value % (1 << 64)


def _check_uri(uri: str, message: str) -> None:
    """`message` (QEMU's) for what is no migration address at all; what is wrong with the path
    or host of one that is (a NUL byte, a unix path too long), in its own words."""
    try:
        uris.parse(uri)
    except uris.UnknownProtocol:
        raise QmpError(message) from None
    except ValueError as err:
        raise QmpError(str(err)) from None


def _thread(name: str, target: Callable[[], None]) -> None:
    threading.Thread(target=target, name=name, daemon=True).start()
