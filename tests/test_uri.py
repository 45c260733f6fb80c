"""Addresses and listeners: one parser, and nothing of anyone else's replaced or removed.

A unix listener takes a path only if nothing is there, or a stale socket (a connect to it is
refused) that this process bound itself; it removes only the socket file it bound, while that
is still the file it bound. The
programs delete only what they created, by the exact path they created.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile

import pytest

from emu.net import uri
from emu.qmp.protocol import QmpClient, QmpServer
from tests import test_qmp_migration as qm
from tests.test_cleanup import alive, children, wait_for

where = qm.where  # the programs' folder, and every program started in it, killed at the end


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


ipv6 = pytest.mark.skipif(not has_ipv6_loopback(), reason="this machine has no ::1")


@pytest.fixture
def folder():
    path = tempfile.mkdtemp(prefix="pcu")  # short: a unix socket path holds 107 bytes
    yield path
    shutil.rmtree(path)


def user_file(path: str) -> str:
    with open(path, "w") as f:
        f.write("the user's work")
    return path


def intact(path: str) -> bool:
    with open(path) as f:
        return f.read() == "the user's work"


def stale_socket(path: str) -> str:
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(path)  # closed without unlinking: what a killed listener leaves behind
    return path


def live_socket(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)
    s.listen()
    return s


def still_answers(listener: socket.socket) -> bool:
    """The other program's socket is still its own: a connect to the path reaches it."""
    with socket.socket(socket.AF_UNIX) as c:
        c.connect(listener.getsockname())
        conn, _ = listener.accept()
        conn.close()
    return True


# --- the parser ----------------------------------------------------------------------------------

@pytest.mark.parametrize("text, family, sockaddr", [
    ("unix:/run/x.sock", socket.AF_UNIX, "/run/x.sock"),
    ("unix:rel.sock", socket.AF_UNIX, "rel.sock"),
    ("tcp:127.0.0.1:4444", socket.AF_INET, ("127.0.0.1", 4444)),
    ("tcp::0", socket.AF_INET, ("127.0.0.1", 0)),
    ("tcp:[::1]:4444", socket.AF_INET6, ("::1", 4444)),
    ("tcp:[fe80::1]:65535", socket.AF_INET6, ("fe80::1", 65535)),
])
def test_one_parser_for_every_address(text, family, sockaddr):
    address = uri.parse(text)
    assert (address.family, address.sockaddr) == (family, sockaddr)


def test_query_migrate_socket_address_is_qemus():
    assert uri.parse("tcp:[::1]:4444").socket_address() == {
        "type": "inet", "host": "::1", "port": "4444"}
    assert uri.parse("unix:/a").socket_address() == {"type": "unix", "path": "/a"}


@pytest.mark.parametrize("text", ["foo", "unix:", "tcp:127.0.0.1", "tcp:127.0.0.1:http",
                                  "tcp:127.0.0.1:70000", "udp:127.0.0.1:1", "exec:cat"])
def test_what_is_no_address_says_what_is(text):
    with pytest.raises(uri.UnknownProtocol, match="expected unix:PATH or tcp:HOST:PORT"):
        uri.parse(text)


def test_a_nul_byte_and_a_path_too_long_are_named():
    with pytest.raises(ValueError, match=r"contains a NUL byte") as info:
        uri.parse("unix:/tmp/a\0b")
    assert not isinstance(info.value, uri.UnknownProtocol)
    assert uri.parse("unix:/" + "x" * 106).path  # 107 bytes: fits in sockaddr_un
    with pytest.raises(ValueError, match="is too long: 108 bytes.* at most 107"):
        uri.parse("unix:/" + "x" * 107)
    with pytest.raises(ValueError, match="too long: 301 bytes") as info:
        uri.parse("unix:/" + "é" * 150)  # bytes, not characters
    assert len(str(info.value)) < 400  # a long path is echoed cut


# --- unix listeners -----------------------------------------------------------------------------

def test_a_listener_leaves_a_file_that_is_not_a_socket_alone(folder):
    path = user_file(f"{folder}/file")
    os.symlink(path, f"{folder}/link")
    for target in (path, f"{folder}/link"):
        with pytest.raises(FileExistsError, match=f"{target} exists and is not a socket"):
            uri.listen(f"unix:{target}")
        with pytest.raises(FileExistsError):
            uri.check_listen(f"unix:{target}")
    assert intact(path) and os.path.islink(f"{folder}/link")


def test_a_live_socket_of_another_program_is_not_taken_over(folder):
    other = live_socket(f"{folder}/s")
    with other:
        with pytest.raises(OSError, match="Address already in use"):
            uri.listen(f"unix:{folder}/s")
        assert still_answers(other)


def test_a_stale_socket_of_someone_else_is_left_alone(folder):
    path = stale_socket(f"{folder}/s")
    with pytest.raises(FileExistsError, match=f"{path} is a socket nobody listens on, left by "
                                               f"another program: not removing it"):
        uri.listen(f"unix:{path}")
    assert os.path.lexists(path)


def test_a_stale_socket_of_its_own_is_reused(folder):
    """A recovery listens again where this process listened before."""
    path = f"{folder}/s"
    first = uri.listen(f"unix:{path}")
    pin = uri.bound_file(first)  # held, as a program holds what it bound until it removes it
    first.close()  # ours, and stale now
    with uri.listen(f"unix:{path}") as sock:
        assert uri.bound_file(sock).file.path == path
        with uri.connect(f"unix:{path}"):
            sock.accept()[0].close()
    pin.release()


def test_only_the_socket_file_it_bound_is_removed(folder):
    path = f"{folder}/s"
    for replacement in ("socket", "file"):
        sock = uri.listen(f"unix:{path}")
        sock.close()
        os.unlink(path)  # someone removed ours, and put something else there since
        if replacement == "socket":
            with live_socket(path) as other:
                uri.bound_file(sock).remove()
                assert still_answers(other)
        else:
            user_file(path)
            uri.bound_file(sock).remove()
            assert intact(path)
        os.unlink(path)
    sock = uri.listen(f"unix:{path}")
    sock.close()
    uri.Pin(uri.bound_file(sock).file).remove()  # another process's hold on it: the same
    assert not os.path.lexists(path)


def test_check_listen_keeps_nothing(folder):
    uri.check_listen(f"unix:{folder}/s")
    assert not os.listdir(folder)


@ipv6
def test_ipv6_loopback():
    with uri.listen("tcp:[::1]:0") as sock:
        address = uri.bound(sock)
        assert sock.family == socket.AF_INET6 and address.startswith("tcp:[::1]:")
        with uri.connect(address) as c:
            conn, _ = sock.accept()
            c.sendall(b"hi")
            assert conn.recv(2) == b"hi"
            conn.close()


# --- the QMP monitor ----------------------------------------------------------------------------

def test_the_qmp_monitor_listens_as_safely(folder):
    path = user_file(f"{folder}/file")
    with pytest.raises(FileExistsError):
        QmpServer(f"unix:{path}").start()
    assert intact(path)
    with live_socket(f"{folder}/live") as other:
        with pytest.raises(OSError, match="Address already in use"):
            QmpServer(f"unix:{folder}/live").start()
        assert still_answers(other)
    with pytest.raises(ValueError, match="too long"):
        QmpServer("unix:/" + "x" * 200)
    server = QmpServer(f"unix:{folder}/m.sock").start()
    os.unlink(f"{folder}/m.sock")
    with live_socket(f"{folder}/m.sock") as other:  # another monitor took the path
        server.close()
        assert still_answers(other)


@ipv6
def test_the_qmp_monitor_on_ipv6_loopback():
    with QmpServer("tcp:[::1]:0") as server:
        assert server.address.startswith("tcp:[::1]:")
        with QmpClient(server.address) as client:
            assert client.cmd("query-version")


# --- the programs -------------------------------------------------------------------------------

def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "emu.cli", *args], capture_output=True,
                          text=True, timeout=60)


def one_line_and_exit_2(out: subprocess.CompletedProcess, *words: str) -> None:
    assert out.returncode == 2, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    for word in words:
        assert word in out.stderr


def test_command_line_listeners_refuse_with_one_line(folder):
    path = user_file(f"{folder}/file")
    long = "unix:/" + "x" * 120
    with live_socket(f"{folder}/live") as other:
        for where_, words in ((f"unix:{path}", ("not a socket", path)),
                              (f"unix:{folder}/live", ("Address already in use",)),
                              (long, ("too long",))):
            one_line_and_exit_2(cli("destination", "--incoming", where_, "--qmp",
                                    f"unix:{folder}/q"), *words)
            one_line_and_exit_2(cli("link", "--listen", where_, "--connect", "tcp::1"), *words)
            one_line_and_exit_2(cli("source", "--qmp", where_), *words)
        assert still_answers(other)
    assert intact(path)
    assert sorted(os.listdir(folder)) == ["file", "live"]


def test_a_killed_link_leaves_the_users_folder_alone():
    """kill -9 of `postcopy-emu link` listening in a folder named like the controller's run
    directory: its network process removes its own socket, and nothing else."""
    folder = tempfile.mkdtemp(prefix="postcopy-emu-")
    try:
        work = user_file(f"{folder}/work.txt")
        link = subprocess.Popen(
            [sys.executable, "-m", "emu.cli", "link", "--listen", f"unix:{folder}/link.sock",
             "--connect", f"unix:{folder}/in.sock", "--qmp", f"unix:{folder}/q"],
            stderr=subprocess.PIPE, text=True, start_new_session=True)
        assert "relaying" in link.stderr.readline()
        kids = children(link.pid)
        link.send_signal(signal.SIGKILL)
        link.wait()
        assert wait_for(lambda: not any(alive(k) for k in kids)), "orphaned network process"
        assert intact(work)
        # its own socket went with its network process; the QMP socket with the killed program
        assert wait_for(lambda: not os.path.lexists(f"{folder}/link.sock"))
        assert sorted(os.listdir(folder)) == ["q", "work.txt"]
    finally:
        link.stderr.close()
        shutil.rmtree(folder)


def test_a_program_removes_its_socket_only_while_it_is_its_own(where):
    path = where[0]
    link = qm.start(where, "link", "link", "--listen", f"unix:{path}/link.sock",
                    "--connect", f"unix:{path}/in.sock")
    client = link.connect()
    link.note_children()
    os.unlink(f"{path}/link.sock")
    with live_socket(f"{path}/link.sock") as other:  # another program listens there now
        client.cmd("quit")
        link.assert_gone()
        assert still_answers(other)
    os.unlink(f"{path}/link.sock")


def test_migrate_incoming_and_migrate_recover_refuse_what_is_not_theirs(where):
    path = where[0]
    file = user_file(f"{path}/file")
    stale = stale_socket(f"{path}/stale.sock")  # a killed program's
    incoming, relay = f"{path}/in.sock", f"unix:{path}/link.sock"
    link = qm.start(where, "link", "link", "--listen", relay, "--connect", f"unix:{incoming}")
    dst = qm.start(where, "dst", "destination", "--incoming", "defer")
    src = qm.start(where, "src", "source")
    s, d = src.connect(), dst.connect()
    link.connect()
    for side in (s, d):
        side.cmd("migrate-set-capabilities", capabilities=qm.PREEMPT)
    other = live_socket(f"{path}/live")

    def refusals(command: str) -> None:
        live = f"{path}/live"
        for address, reason in (
                (f"unix:{file}", f"{file} exists and is not a socket: not replacing it"),
                (f"unix:{stale}", f"{stale} is a socket nobody listens on, left by another "
                                  f"program: not removing it (rm {stale} if it is yours)"),
                (f"unix:{live}", f"Failed to bind socket to {live}: Address already in use "
                                 "(another program listens on it)")):
            assert qm.error(d, command, uri=address) == (
                "GenericError", f"Failed to listen on {address}: {reason}")
        assert qm.error(d, command, uri="unix:/" + "x" * 107)[1].startswith(
            "UNIX socket path '/xxx")
        assert qm.error(d, command, uri=f"unix:{path}/a\0b")[1] == \
            f"address unix:{path}/a\\x00b contains a NUL byte"
        assert intact(file) and still_answers(other) and os.path.lexists(stale)

    with other:
        refusals("migrate-incoming")
        assert d.cmd("query-migrate") == {}  # nothing started
        d.cmd("migrate-incoming", uri=f"unix:{incoming}")
        assert d.cmd("query-migrate")["socket-address"] == [{"type": "unix", "path": incoming}]
        s.cmd("migrate", uri=relay)
        s.cmd("migrate-set-parameters", max_postcopy_bandwidth=4096)
        assert qm.statuses(s, "active")
        s.cmd("migrate-start-postcopy")
        assert qm.statuses(d, "postcopy-active")
        s.cmd("migrate-pause")
        assert qm.statuses(d, "postcopy-paused")
        refusals("migrate-recover")
        d.cmd("migrate-recover", uri=f"unix:{incoming}")  # our own, stale by now: reused
        s.cmd("migrate", uri=relay, resume=True)
        s.cmd("migrate-set-parameters", max_postcopy_bandwidth=0)
        assert qm.statuses(d, "completed")
        os.unlink(stale)  # the test's own
        for program in (src, dst, link):
            program.note_children()
            program.client.cmd("quit")
        for program in (src, dst, link):
            program.assert_gone()
        assert still_answers(other)
    assert intact(file)
    assert sorted(os.listdir(path)) == ["dst.log", "file", "link.log", "live", "src.log"]
    os.unlink(f"{path}/live")


@ipv6
def test_a_destination_listens_on_ipv6_loopback(where):
    dst = qm.start(where, "dst", "destination", "--incoming", "tcp:[::1]:0")
    address = dst.connect().cmd("query-migrate")["socket-address"]
    assert address[0]["host"] == "::1" and int(address[0]["port"]) > 0
    dst.note_children()
    dst.client.cmd("quit")
    dst.assert_gone()
