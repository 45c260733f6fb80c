"""Driving it like QEMU: source, destination and link as separate programs, over QMP.

Every program here is a real `python -m emu.cli` process with its monitor on a unix socket;
migration channels go through real sockets (TCP between the link and the destination). Replies,
events and error texts are QEMU's own.
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

from emu.controller import Run
from emu.figures import integrity
from emu.net import channel
from emu.qmp.protocol import QmpClient, QmpError
from tests.conftest import PATIENCE, as_from_a_terminal, backend_sets, config
from tests.test_cleanup import alive, children, segments, wait_for

SETS = ["guest.ram=32MiB", "link.socket-buffer=1MiB", "emulator.time-scale=0.25",
        "workload.pattern=ab"] + backend_sets()
PREEMPT = [{"capability": "postcopy-preempt", "state": True},
           {"capability": "events", "state": True}]


class Program:
    """One `postcopy-emu` program, its monitor, and what it leaves behind."""

    def __init__(self, where: str, name: str, *args: str, env: dict | None = None) -> None:
        self.name = name
        self.qmp = f"unix:{where}/{name}.qmp"
        self.log_path = f"{where}/{name}.log"
        sets = [a for s in SETS for a in ("--set", s)]
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                # the command, then SETS, then the test's own --set, which win
                [sys.executable, "-m", "emu.cli", args[0], *sets, *args[1:], "--qmp", self.qmp,
                 "--trace"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, **(env or {})}, preexec_fn=as_from_a_terminal)
        self.kids: set[int] = set()
        self.client: QmpClient | None = None

    def connect(self) -> QmpClient:
        deadline = time.monotonic() + PATIENCE
        while True:
            try:
                self.client = QmpClient(self.qmp, timeout=PATIENCE)
                self.client.connect()
                return self.client
            except (FileNotFoundError, ConnectionRefusedError):
                assert self.proc.poll() is None, self.log()
                assert time.monotonic() < deadline, f"{self.name} did not start\n{self.log()}"
                time.sleep(0.05)

    def note_children(self) -> None:
        """Remember the program's processes (engine child, resource tracker) to check later
        that none outlives it."""
        self.kids |= set(children(self.proc.pid))

    def log(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def assert_gone(self) -> None:
        assert self.proc.wait(PATIENCE) == 0, self.log()
        assert wait_for(lambda: not any(alive(k) for k in self.kids)), \
            f"{self.name} left processes behind"
        assert not segments(self.proc.pid), f"{self.name} left segments in /dev/shm"

    def kill(self) -> None:
        """kill -9 the program alone: its engine child and resource tracker clean up."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def where():
    path = tempfile.mkdtemp(prefix="pqm")  # short: unix socket paths fit in 108 bytes
    programs: list[Program] = []
    yield path, programs
    for program in programs:
        print(program.log())  # shown when the test failed
        if program.client:
            program.client.close()
        program.kill()
    # the test's own folder: after a failure it may hold a killed program's leftovers
    shutil.rmtree(path, ignore_errors=True)


def start(where, name: str, *args: str, env: dict | None = None) -> Program:
    path, programs = where
    program = Program(path, name, *args, env=env)
    programs.append(program)
    return program


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def statuses(client: QmpClient, until: str, timeout: float = PATIENCE) -> list[str]:
    """The MIGRATION statuses a monitor announces, up to `until`."""
    seen = []
    while not seen or seen[-1] != until:
        seen.append(client.wait_event("MIGRATION", timeout)["data"]["status"])
    return seen


def error(client: QmpClient, command: str, **args) -> tuple[str, str]:
    with pytest.raises(QmpError) as info:
        client.cmd(command, **args)
    return info.value.cls, info.value.desc


def stranger(address: str, junk: bytes) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.connect(address)
    except OSError:
        sock.close()
        raise
    sock.sendall(junk)
    sock.settimeout(PATIENCE)
    return sock


def test_postcopy_preempt_with_pause_and_recovery_over_qmp(where):
    """QEMU's postcopy/preempt/recovery/plain, driven only through the two monitors."""
    path = where[0]
    incoming, relay = f"tcp:127.0.0.1:{free_port()}", f"unix:{path}/link.sock"
    link = start(where, "link", "link", "--listen", relay, "--connect", incoming)
    dst = start(where, "dst", "destination", "--incoming", "defer")
    src = start(where, "src", "source")
    s, d = src.connect(), dst.connect()
    link.connect()
    for side in (s, d):
        side.cmd("migrate-set-capabilities", capabilities=PREEMPT)
    d.cmd("migrate-incoming", uri=incoming)
    assert d.cmd("query-migrate")["socket-address"] == [
        {"type": "inet", "host": "127.0.0.1", "port": incoming.rsplit(":", 1)[1]}]
    # a stranger on the link's address is closed unheard, and disturbs nothing
    junk = stranger(f"{path}/link.sock", b"GET / HTTP/1.0\r\n\r\n")
    s.cmd("migrate", uri=relay)
    assert statuses(s, "active") == ["setup", "active"]
    assert error(s, "migrate-set-capabilities", capabilities=PREEMPT) == (
        "GenericError", "There's a migration process in progress")
    # QEMU's recovery test: slow the background stream so that the pause lands in postcopy
    s.cmd("migrate-set-parameters", max_postcopy_bandwidth=4096)
    s.cmd("migrate-start-postcopy")
    s.wait_event("STOP", PATIENCE)
    assert statuses(s, "postcopy-active") == ["device", "postcopy-active"]
    d.wait_event("RESUME", PATIENCE)
    assert s.cmd("query-status") == {"status": "finish-migrate", "running": False}
    assert d.cmd("query-status") == {"status": "running", "running": True}
    assert error(s, "migrate_cancel")[1] == "Postcopy migration in progress, cannot cancel."
    assert error(s, "cont")[1] == "Migration is not finalized yet"
    assert error(d, "x-query-integrity")[1].startswith("The memory check needs a completed")
    assert error(d, "migrate-recover", uri=incoming)[1] == \
        "Migrate recover can only be run when postcopy is paused."
    assert error(s, "migrate", uri=relay, resume=True)[1] == \
        "Cannot resume if there is no paused migration"

    # pause once the guest runs there: it faults, and the source serves its requests
    assert wait_for(lambda: s.cmd("query-migrate")["ram"]["postcopy-requests"] > 0)
    s.cmd("migrate-pause")
    assert statuses(s, "postcopy-paused") == ["postcopy-paused"]
    assert statuses(d, "postcopy-paused")[-2:] == ["postcopy-active", "postcopy-paused"]
    d.cmd("migrate-recover", uri=incoming)
    s.cmd("migrate", uri=relay, resume=True)
    # QEMU 7.1 (the default design) connects in postcopy-paused: no postcopy-recover-setup
    assert statuses(s, "postcopy-active") == ["postcopy-recover", "postcopy-active"]
    s.cmd("migrate-set-parameters", max_postcopy_bandwidth=0)
    assert statuses(d, "completed") == ["postcopy-recover", "postcopy-active", "completed"]
    assert statuses(s, "completed") == ["completed"]
    assert junk.recv(10) == b""

    out, into = s.cmd("query-migrate"), d.cmd("query-migrate")
    assert out["status"] == "completed" and out["ram"]["page-size"] == 4096
    assert out["ram"]["postcopy-requests"] > 0 and out["ram"]["remaining"] == 0, (out, into)
    assert out["total-time"] > 0 and "postcopy-latency" not in out
    faults = sum(into["postcopy-latency-dist"])
    assert into["status"] == "completed" and faults > 0 and into["postcopy-latency"] > 0
    assert len(into["postcopy-vcpu-blocktime"]) == 1 and into["postcopy-blocktime"] >= 0
    assert d.cmd("x-query-integrity")["ok"], d.cmd("x-query-integrity")
    assert link.client.cmd("x-query-link")["delivered-preempt"] > 0
    assert s.cmd("query-status")["status"] == "postmigrate"
    assert error(s, "migrate", uri=relay)[1] == \
        "Can't migrate the vm that was paused due to previous migration"

    for program in (src, dst, link):
        program.note_children()
        program.client.cmd("quit")
    for side in (s, d):
        assert side.wait_event("SHUTDOWN", PATIENCE)["data"] == {
            "guest": False, "reason": "host-qmp-quit"}
    for program in (src, dst, link):
        program.assert_gone()
    assert sorted(os.listdir(path)) == sorted(p.log_path.rsplit("/", 1)[1]
                                              for p in (src, dst, link))


def test_qmp_conversation_before_any_migration(where):
    src = start(where, "src", "source")
    dst = start(where, "dst", "destination", "--incoming", "defer")
    s, d = src.connect(), dst.connect()
    assert s.greeting["QMP"]["version"]["qemu"] == {"micro": 0, "minor": 1, "major": 7}
    assert s.cmd("query-status") == {"status": "running", "running": True}
    assert d.cmd("query-status") == {"status": "inmigrate", "running": False}
    s.cmd("stop")
    assert s.wait_event("STOP", PATIENCE) and s.cmd("query-status")["status"] == "paused"
    s.cmd("cont")
    assert s.wait_event("RESUME", PATIENCE) and s.cmd("query-status")["running"]
    assert s.cmd("query-migrate") == {} and d.cmd("query-migrate") == {}

    caps = {c["capability"]: c["state"] for c in s.cmd("query-migrate-capabilities")}
    assert caps == {"events": False, "postcopy-ram": True, "postcopy-blocktime": True,
                    "postcopy-preempt": False}
    s.cmd("migrate-set-capabilities", capabilities=PREEMPT + [
        {"capability": "xbzrle", "state": False}])
    caps = {c["capability"]: c["state"] for c in s.cmd("query-migrate-capabilities")}
    assert caps["postcopy-preempt"] and caps["events"]
    s.cmd("migrate-set-parameters", max_bandwidth=3_000_000, downtime_limit=1)
    assert s.cmd("query-migrate-parameters") == {
        "max-bandwidth": 3_000_000, "downtime-limit": 1, "max-postcopy-bandwidth": 0}
    s.cmd("migrate-set-parameters", max_bandwidth=-1)
    assert s.cmd("query-migrate-parameters")["max-bandwidth"] == (1 << 64) - 1

    for client, command, args, expected in [
        (s, "migrate-set-capabilities", {"capabilities": [
            {"capability": "postcopy-ram", "state": False}]},
         "Postcopy preempt requires postcopy-ram"),
        (s, "migrate-set-capabilities", {"capabilities": [{"capability": "foo", "state": True}]},
         "Parameter 'capability' does not accept value 'foo'"),
        (s, "migrate-set-capabilities", {"capabilities": [{"capability": "xbzrle",
                                                           "state": True}]},
         "Capability 'xbzrle' is not emulated by postcopy-emu (it emulates events, "
         "postcopy-ram, postcopy-blocktime, postcopy-preempt)"),
        (s, "migrate-set-capabilities", {"capabilities": [{"capability": "events"}]},
         "Parameter 'capabilities[0].state' is missing"),
        (s, "migrate-set-capabilities", {"capabilities": [{"capability": "events",
                                                           "state": "on"}]},
         "Invalid parameter type for 'capabilities[0].state', expected: boolean"),
        (s, "migrate-set-capabilities", {"capabilities": [{"capability": "events",
                                                           "state": True, "x": 1}]},
         "Parameter 'capabilities[0].x' is unexpected"),
        (s, "migrate-set-capabilities", {"capabilities": ["events"]},
         "Invalid parameter type for 'capabilities[0]', expected: object"),
        (s, "migrate-set-capabilities", {}, "Parameter 'capabilities' is missing"),
        (s, "migrate-set-parameters", {"downtime_limit": 2_000_001},
         "Parameter 'downtime_limit' expects an integer in the range of 0 to (2000 * 1000) ms"),
        (s, "migrate-set-parameters", {"max_bandwidth": "1G"},
         "Parameter 'max-bandwidth' expects uint64"),
        (s, "migrate-set-parameters", {"max_bandwith": 1},
         "Parameter 'max-bandwith' is unexpected"),
        (s, "migrate-pause", {},
         "migrate-pause is currently only supported during postcopy-active or postcopy-recover "
         "state"),
        (s, "migrate-start-postcopy", {},
         "Postcopy must be started after migration has been started"),
        (d, "migrate-recover", {"uri": "unix:/nowhere"},
         "Migrate recover can only be run when postcopy is paused."),
        (s, "migrate", {"uri": "unix:/nowhere", "resume": True},
         "Cannot resume if there is no paused migration"),
        (s, "migrate", {"uri": "rdma:10.0.0.1:4444"},
         "Parameter 'uri' expects a valid migration protocol"),
        (s, "migrate-incoming", {"uri": "unix:/nowhere"},
         "'-incoming' was not specified on the command line"),
        (d, "migrate", {"uri": "unix:/nowhere"}, "Guest is waiting for an incoming migration"),
        (d, "migrate-incoming", {"uri": "exec:cat"}, "unknown migration protocol: exec:cat"),
    ]:
        assert error(client, command, **args) == ("GenericError", expected), command
    assert error(s, "no-such-command") == (
        "CommandNotFound", "The command no-such-command has not been found")
    s.cmd("migrate_cancel")  # nothing to cancel: not an error, as in QEMU
    s.cmd("migrate-set-capabilities", capabilities=[
        {"capability": "postcopy-preempt", "state": False},
        {"capability": "postcopy-ram", "state": False}])
    assert error(s, "migrate-start-postcopy")[1] == \
        "Enable postcopy with migrate_set_capability before the start of migration"

    # a destination that cannot listen there starts nothing, and can be told again
    assert error(d, "migrate-incoming", uri="unix:/no/such/dir/in.sock")[1].startswith(
        "Failed to listen on unix:/no/such/dir/in.sock")
    d.cmd("migrate-incoming", uri=f"unix:{where[0]}/in.sock")
    assert d.cmd("query-migrate")["status"] == "setup"
    assert error(d, "migrate-incoming", uri=f"unix:{where[0]}/in.sock")[1] == \
        "The incoming migration has already been started"
    assert error(d, "migrate-set-capabilities", capabilities=PREEMPT)[1] == \
        "Postcopy preempt must be set before incoming starts"
    # the migration listener closes what does not say a migration hello, unheard
    for junk in (b"\x00" * 64, os.urandom(300)):
        assert stranger(f"{where[0]}/in.sock", junk).recv(10) == b""
    d.cmd("stop")  # during an incoming migration: the guest will not start (autostart off)
    assert d.cmd("query-status")["status"] == "inmigrate"

    for program in (src, dst):
        program.note_children()
    os.killpg(src.proc.pid, signal.SIGINT)  # Ctrl-C in the terminal
    assert src.proc.wait(PATIENCE) == 130 and "interrupted" in src.log()
    dst.proc.terminate()
    dst.assert_gone()
    assert "terminating on signal 15" in dst.log()
    assert not os.path.exists(f"{where[0]}/in.sock")
    assert wait_for(lambda: not any(alive(k) for k in src.kids))
    assert not segments(src.proc.pid)


def test_migrate_cancel_in_precopy(where):
    path = where[0]
    incoming, relay = f"unix:{path}/in.sock", f"unix:{path}/link.sock"
    link = start(where, "link", "link", "--listen", relay, "--connect", incoming)
    dst = start(where, "dst", "destination", "--incoming", incoming)
    src = start(where, "src", "source", "--trace", "migrate_set_*")  # and its state changes
    s, d = src.connect(), dst.connect()
    link.connect()
    s.cmd("migrate-set-capabilities", capabilities=PREEMPT[1:])
    d.cmd("migrate-set-capabilities", capabilities=PREEMPT[1:])  # events: allowed any time
    s.cmd("stop")  # a paused guest migrates too: it dirties nothing
    s.cmd("migrate", uri=relay)
    assert statuses(s, "active") == ["setup", "active"]
    assert error(s, "migrate", uri=relay)[1] == "There's a migration process in progress"
    assert statuses(d, "active")[-1] == "active"  # the destination has its main channel
    with pytest.raises(ConnectionRefusedError):  # and, every channel in, listens no more
        stranger(f"{path}/in.sock", channel.MAIN_HELLO)
    s.cmd("migrate_cancel")
    assert statuses(s, "cancelled") == ["cancelling", "cancelled"]
    assert statuses(d, "failed") == ["failed"]
    assert s.cmd("query-migrate") == {"status": "cancelled"}
    assert s.cmd("query-status") == {"status": "paused", "running": False}
    assert error(s, "migrate", uri=relay)[1].startswith(
        "postcopy-emu runs one outgoing migration per source program")
    for program in (src, dst, link):
        program.note_children()
        program.client.cmd("quit")
    for program in (src, dst, link):
        program.assert_gone()
    # --trace PATTERN: QEMU's trace point, with the emulated time the source's child saw
    assert re.search(r"\[ *[\d.]+ ms\] source: migrate_set_state new_state=cancelling\n",
                     src.log()), src.log()
    assert "migrate_set_state" not in dst.log()  # a bare --trace: state changes only


def test_the_link_monitor(where):
    path = where[0]
    link = start(where, "link", "link", "--listen", f"unix:{path}/link.sock",
                 "--connect", f"unix:{path}/in.sock")
    lnk = link.connect()
    assert lnk.cmd("x-query-link")["delivered-main"] == 0
    assert error(lnk, "x-link-cut", channel="backup")[1] == \
        "Parameter 'channel' does not accept value 'backup'"
    assert error(lnk, "x-link-connect", uri="exec:cat")[1] == "unknown migration protocol: exec:cat"
    lnk.cmd("x-link-connect", uri=f"unix:{path}/elsewhere.sock")
    lnk.cmd("x-link-corrupt", channel="preempt")
    link.note_children()
    lnk.cmd("quit")
    link.assert_gone()
    assert not os.path.exists(f"{path}/link.sock")


def test_a_killed_program_takes_its_engine_with_it(where):
    dst = start(where, "dst", "destination", "--incoming", f"unix:{where[0]}/in.sock",
                env={"TMPDIR": where[0]})
    dst.connect()
    dst.note_children()  # the engine child listens already, its front, the resource tracker
    assert len(dst.kids) >= 3
    assert [n for n in os.listdir(where[0]) if n.startswith("postcopy-emu-front-")]
    dst.kill()
    assert wait_for(lambda: not any(alive(k) for k in dst.kids)), "orphaned engine process"
    assert wait_for(lambda: not segments(dst.proc.pid)), "segments left in /dev/shm"
    assert not [n for n in os.listdir(where[0]) if n.startswith("postcopy-emu-front-")], \
        "the front's private folder outlived its program"


def test_monitors_stay_on_loopback_unless_told(where):
    out = subprocess.run([sys.executable, "-m", "emu.cli", "source", "--qmp", "tcp:0.0.0.0:0"],
                         capture_output=True, text=True, timeout=PATIENCE)
    assert out.returncode == 2 and "non-loopback" in out.stderr


def test_the_replayed_memory_check_sees_what_the_source_held():
    """x-query-integrity's check (the destination alone) agrees with the check that reads
    both RAMs, and names a corrupted page."""
    cfg = config(workload__pattern="random", guest__vcpus="2")
    with Run(cfg) as run:
        run.wait()
        assert run.ok, run.errors
        dst = run.ram("destination")
        report = run.reports["destination"]
        assert integrity.check_replayed(cfg, dst, run.pages().dst, report)["ok"]
        dst[77 * 4096 + 2000] ^= 1
        result = integrity.check_replayed(cfg, dst, run.pages().dst, report)
        assert not result["ok"] and result["first-bad"] == [77]


# ---- a source connected straight to a destination, as two QEMUs are ----

RTT_MS = 17  # so that one rtt (and a few ms more) and two fall in different latency buckets


def rtt_bucket(rtt_ms: float) -> int:
    """The postcopy-latency-dist bucket ([2^N us, 2^(N+1) us)) a latency of `rtt_ms` is in."""
    return int(np.log2(rtt_ms * 1000))


def pair(where, incoming: str, via_link: bool) -> tuple[Program, Program, str]:
    """A destination and a source, with or without a `link` program between: the address the
    source migrates to. The destination's private folder is made in the test's own folder
    (TMPDIR), so that the test sees it removed."""
    path = where[0]
    # random pages: nearly every fault is a page the source must be asked for
    rtt = ("--set", f"link.rtt={RTT_MS}ms", "--set", "workload.pattern=random")
    target = incoming
    if via_link:
        target = f"unix:{path}/link.sock"
        link = start(where, "link", "link", "--listen", target, "--connect", incoming, *rtt)
        # up before the destination starts: the link's emulated clock runs well ahead of the
        # destination's, which must not delay what it delivers (it did, by that lead, when
        # the two programs happened to start that far apart)
        link.connect()
    dst = start(where, "dst", "destination", "--incoming", "defer", *rtt, env={"TMPDIR": path})
    src = start(where, "src", "source", *rtt)
    for side in (src, dst):
        side.connect().cmd("migrate-set-capabilities", capabilities=PREEMPT)
    return src, dst, target


def finish(where, programs: list[Program]) -> None:
    """quit every program; nothing of theirs stays behind, in the test's folder either."""
    for program in programs:
        program.note_children()
        if program.client is None:
            program.connect()
        program.client.cmd("quit")
    for program in programs:
        program.assert_gone()
    assert sorted(os.listdir(where[0])) == sorted(p.log_path.rsplit("/", 1)[1] for p in programs)


@pytest.mark.parametrize("via_link", [False, True], ids=["direct", "through-link"])
def test_the_same_qmp_script_with_or_without_a_link(where, via_link):
    """postcopy-preempt driven over QMP with the source connected straight to the destination
    (the emulated link then runs inside the destination program) or through a `link`
    program: the same commands, memory intact, and the link's rtt counted once."""
    incoming = f"unix:{where[0]}/mig.sock"
    src, dst, target = pair(where, incoming, via_link)
    s, d = src.client, dst.client
    d.cmd("migrate-incoming", uri=incoming)
    s.cmd("migrate", uri=target)
    assert statuses(s, "active") == ["setup", "active"]
    s.cmd("migrate-start-postcopy")
    assert statuses(s, "completed") == ["device", "postcopy-active", "completed"]
    assert statuses(d, "completed")[-2:] == ["postcopy-active", "completed"]
    assert d.cmd("x-query-integrity")["ok"], d.cmd("x-query-integrity")
    into = d.cmd("query-migrate")
    dist = into["postcopy-latency-dist"]
    # a page the source is asked for crosses the link twice (request, then page): most faults
    # take one rtt and a little more; a link emulated twice would put every one at two rtts
    # (a busy machine may stall one now and then: a tenth is allowed there); the others found
    # their page already on its way
    one = rtt_bucket(RTT_MS)
    assert rtt_bucket(2 * RTT_MS) == one + 1
    assert len(dist) > one and dist[one] > sum(dist) / 2, dist
    assert sum(dist[one + 1:]) <= sum(dist) / 10, dist
    assert s.cmd("query-migrate")["ram"]["postcopy-requests"] > 0
    finish(where, where[1])


def test_a_direct_migration_recovers_on_a_new_address(where):
    """QEMU's postcopy/recovery with no `link` program: migrate-pause, migrate-recover on a
    new address, migrate resume to it, through the destination's own emulated link."""
    path = where[0]
    src, dst, _ = pair(where, f"unix:{path}/mig.sock", via_link=False)
    s, d = src.client, dst.client
    d.cmd("migrate-incoming", uri=f"unix:{path}/mig.sock")
    s.cmd("migrate", uri=f"unix:{path}/mig.sock")
    assert statuses(s, "active") == ["setup", "active"]
    s.cmd("migrate-set-parameters", max_postcopy_bandwidth=4096)  # the pause lands in postcopy
    s.cmd("migrate-start-postcopy")
    assert statuses(s, "postcopy-active") == ["device", "postcopy-active"]
    assert wait_for(lambda: s.cmd("query-migrate")["ram"]["postcopy-requests"] > 0)
    s.cmd("migrate-pause")
    assert statuses(s, "postcopy-paused") == ["postcopy-paused"]
    assert statuses(d, "postcopy-paused")[-2:] == ["postcopy-active", "postcopy-paused"]
    port = free_port()  # the new address is TCP: a TCP connection is handed over as well
    d.cmd("migrate-recover", uri=f"tcp:127.0.0.1:{port}")
    assert d.cmd("query-migrate")["socket-address"] == [
        {"type": "inet", "host": "127.0.0.1", "port": str(port)}]
    s.cmd("migrate", uri=f"tcp:127.0.0.1:{port}", resume=True)
    # QEMU 7.1 (the default design) connects in postcopy-paused: no postcopy-recover-setup
    assert statuses(s, "postcopy-active") == ["postcopy-recover", "postcopy-active"]
    s.cmd("migrate-set-parameters", max_postcopy_bandwidth=0)
    assert statuses(d, "completed") == ["postcopy-recover", "postcopy-active", "completed"]
    assert statuses(s, "completed") == ["completed"]
    assert d.cmd("x-query-integrity")["ok"], d.cmd("x-query-integrity")
    # every channel in: the destination listens no more, as QEMU
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5)
    finish(where, [src, dst])
