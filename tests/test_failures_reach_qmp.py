"""Every failure reaches QMP: a program's monitor says why, not only its stderr, and a link
whose engine died does not run on around it."""

import os
import signal

from emu.migration import wire
from emu.net import channel
from tests.test_cleanup import _cmdline, alive, children, segments, wait_for
from tests.test_qmp_migration import start, stranger, where  # noqa: F401 (a fixture)
from tests.wire_peer import closed, frame

QUERY_WAIT = 30


def engine_of(program, role: str) -> int:
    """The program's engine child of `role` (not its resource tracker, nor a destination's
    front), by the title each child carries."""
    def engines():
        return [k for k in children(program.proc.pid) if f"postcopy-emu: {role}" in _cmdline(k)]
    assert wait_for(engines)
    [pid] = engines()
    return pid


def failed(client) -> dict:
    assert wait_for(lambda: client.cmd("query-migrate")["status"] == "failed", QUERY_WAIT)
    return client.cmd("query-migrate")


def test_a_killed_destination_engine_is_in_error_desc(where):  # noqa: F811
    """Before: query-migrate said failed with no error-desc; the reason went to stderr."""
    incoming = f"{where[0]}/in.sock"
    dst = start(where, "dst", "destination", "--incoming", f"unix:{incoming}")
    d = dst.connect()
    assert d.cmd("query-migrate")["status"] == "setup"
    os.kill(engine_of(dst, "destination"), signal.SIGKILL)
    info = failed(d)
    assert info["error-desc"] == "the destination process died (killed by SIGKILL)", info
    dst.note_children()
    d.cmd("quit")
    dst.assert_gone()
    assert not os.path.exists(incoming)


def test_a_forged_device_state_is_in_error_desc(where):  # noqa: F811
    incoming = f"{where[0]}/in.sock"
    dst = start(where, "dst", "destination", "--incoming", f"unix:{incoming}")
    d = dst.connect()
    forged = [channel.MAIN_HELLO, wire.command(wire.MIG_CMD_OPEN_RETURN_PATH),
              wire.command(wire.MIG_CMD_POSTCOPY_LISTEN), wire.device_state({"vcpus": ["x"]}),
              wire.command(wire.MIG_CMD_POSTCOPY_RUN)]
    sock = stranger(incoming, b"".join(frame(p) for p in forged))
    info = failed(d)
    assert info["error-desc"] == (
        "load of migration failed: Invalid argument: device state: 'vcpus' must be the "
        "positions of the guest's 1 vCPU(s), integers from 0 to 4611686018427387904, "
        "got ['x']"), info
    assert closed(sock)
    dst.note_children()
    d.cmd("quit")
    dst.assert_gone()


def test_the_link_ends_when_its_engine_dies(where):  # noqa: F811
    """Before: the link program ran on around a dead engine, relaying nothing."""
    path = where[0]
    link = start(where, "link", "link", "--listen", f"unix:{path}/link.sock",
                 "--connect", f"unix:{path}/in.sock")
    link.connect()
    link.note_children()
    os.kill(engine_of(link, "network"), signal.SIGKILL)
    assert link.proc.wait(30) == 1, link.log()
    assert "the network process died (killed by SIGKILL)" in link.log()
    assert wait_for(lambda: not any(alive(k) for k in link.kids)), "processes left behind"
    assert not segments(link.proc.pid)
    assert not os.path.exists(f"{path}/link.sock")
