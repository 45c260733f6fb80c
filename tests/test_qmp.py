"""The QMP server and client over real sockets: QEMU's protocol, and QEMU's error wordings."""

import json
import os
import shutil
import signal
import socket
import tempfile
import threading
import time

import pytest

from emu import signals
from emu.qmp.protocol import QmpClient, QmpError, QmpServer

GREETING = (b'{"QMP": {"version": {"qemu": {"micro": 0, "minor": 1, "major": 7}, '
            b'"package": "postcopy-emu"}, "capabilities": []}}\r\n')
NEGOTIATE_FIRST = "Expecting capabilities negotiation with 'qmp_capabilities'"


@pytest.fixture
def sock_dir():
    # Short, because a unix socket path must fit in 108 bytes.
    path = tempfile.mkdtemp(prefix="qmp")
    yield path
    shutil.rmtree(path)


@pytest.fixture(params=["unix", "tcp"])
def server(request, sock_dir):
    address = f"unix:{sock_dir}/m.sock" if request.param == "unix" else "tcp:127.0.0.1:0"
    srv = QmpServer(address).start()
    yield srv
    srv.close()


@pytest.fixture
def client(server):
    with QmpClient(server.address) as c:
        yield c


class Raw:
    """A bare connection, for bytes no well-behaved client would send."""

    def __init__(self, address: str, negotiate: bool = False) -> None:
        if address.startswith("unix:"):
            self.sock = socket.socket(socket.AF_UNIX)
            self.sock.connect(address[5:])
        else:
            host, port = address[4:].rsplit(":", 1)
            self.sock = socket.create_connection((host, int(port)))
        self.sock.settimeout(2)
        self.file = self.sock.makefile("rb")
        self.greeting = self.file.readline()
        if negotiate:
            self.send(b'{"execute": "qmp_capabilities"}')
            assert self.reply() == {"return": {}}

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes:
        return self.file.readline()

    def reply(self) -> dict:
        return json.loads(self.line())

    def close(self) -> None:
        self.file.close()
        self.sock.close()


@pytest.fixture
def raw(server):
    conn = Raw(server.address, negotiate=True)
    yield conn
    conn.close()


def error(desc: str, cls: str = "GenericError", **extra) -> dict:
    return {"error": {"class": cls, "desc": desc}, **extra}


# --- Greeting and capabilities negotiation ------------------------------------------------------

def test_greeting_is_qemus_with_crlf(server):
    conn = Raw(server.address)
    assert conn.greeting == GREETING
    conn.close()


def test_version_is_configurable(sock_dir):
    version = {"qemu": {"micro": 2, "minor": 0, "major": 9}, "package": "v9.0.2"}
    with QmpServer(f"unix:{sock_dir}/v.sock", version=version) as srv:
        with QmpClient(srv.address) as c:
            assert c.greeting == {"QMP": {"version": version, "capabilities": []}}
            assert c.cmd("query-version") == version


def test_commands_wait_for_negotiation(server):
    with QmpClient(server.address) as c:
        pass
    c = QmpClient(server.address)
    c.connect(negotiate=False)
    for name in ("query-version", "no-such-command"):
        assert c.execute(name, id=1) == error(NEGOTIATE_FIRST, "CommandNotFound", id=1)
    assert c.execute("qmp_capabilities") == {"return": {}}
    assert c.cmd("query-version")["package"] == "postcopy-emu"
    assert c.execute("qmp_capabilities") == error(
        "Capabilities negotiation is already complete, command ignored", "CommandNotFound")
    c.close()


@pytest.mark.parametrize("enable, desc", [
    (["oob"], "Capability oob not available"),
    (["oob", "oob"], "Capability oob, oob not available"),
    (["bogus"], "Parameter 'null' does not accept value 'bogus'"),
    ([1], "Invalid parameter type for 'enable[0]', expected: string"),
    ("oob", "Invalid parameter type for 'enable', expected: array"),
])
def test_capabilities_this_server_does_not_offer(server, enable, desc):
    c = QmpClient(server.address)
    c.connect(negotiate=False)
    assert c.execute("qmp_capabilities", {"enable": enable}) == error(desc)
    assert c.execute("query-version") == error(NEGOTIATE_FIRST, "CommandNotFound")
    assert c.execute("qmp_capabilities", {"enable": []}) == {"return": {}}
    c.close()


def test_builtin_commands(client):
    names = [c["name"] for c in client.cmd("query-commands")]
    assert names == ["qmp_capabilities", "query-commands", "query-version"]
    assert client.cmd("query-version") == json.loads(GREETING)["QMP"]["version"]


# --- Requests ------------------------------------------------------------------------------------

@pytest.mark.parametrize("id_", [7, "abc", {"a": [1, None]}, [1, 2], None, 1.5])
def test_replies_echo_any_id(raw, id_):
    raw.send(json.dumps({"execute": "query-version", "id": id_}).encode())
    assert raw.reply()["id"] == id_
    raw.send(json.dumps({"execute": "nope", "id": id_}).encode())
    assert raw.reply() == error("The command nope has not been found", "CommandNotFound", id=id_)
    raw.send(b'{"execute": "query-version"}')
    assert "id" not in raw.reply()


def test_replies_end_with_crlf(raw):
    raw.send(b'{"execute": "query-version"}')
    assert raw.line().endswith(b"}\r\n")
    raw.send(b'{"execute": "nope"}')
    assert raw.line() == (b'{"error": {"class": "CommandNotFound", '
                          b'"desc": "The command nope has not been found"}}\r\n')


@pytest.mark.parametrize("data, reply", [
    # qapi/qmp-dispatch.c: the id is echoed once the input is an object
    (b'[1, 2]', error("QMP input must be a JSON object")),
    (b'"query-version"', error("QMP input must be a JSON object")),
    (b'{"arguments": {}, "id": 5}', error("QMP input lacks member 'execute'", id=5)),
    (b'{"execute": 1}', error("QMP input member 'execute' must be a string")),
    (b'{"execute": "query-version", "arguments": []}',
     error("QMP input member 'arguments' must be an object")),
    (b'{"execute": "query-version", "foo": 1, "id": 2}',
     error("QMP input member 'foo' is unexpected", id=2)),
    (b'{"exec-oob": "query-version"}', error("QMP input member 'exec-oob' is unexpected")),
    # qobject/json-parser.c and json-streamer.c: never an id
    (b'{"execute": }', error("JSON parse error, expecting value")),
    (b'}', error("JSON parse error, expecting value")),
    (b'{"execute" "x"}', error("JSON parse error, missing : in object pair")),
    (b'{"execute": "x" "id": 1}', error("JSON parse error, expected separator in dict")),
    (b'[1 2]', error("JSON parse error, expected separator in list")),
    (b'{1: 2}', error("JSON parse error, key is not a string in object")),
    (b'{"id": 1, "id": 2}', error("JSON parse error, duplicate key")),
    (b'{"execute": nul}', error("JSON parse error, invalid keyword 'nul'")),
    (b'{"execute": "\\q"}', error("JSON parse error, invalid escape sequence in string")),
    (b'{"execute": "\\uD800"}',
     error("JSON parse error, \\uD800 is not a valid Unicode character")),
    (b'{"execute": "\xc3("}', error("JSON parse error, invalid UTF-8 sequence in string")),
    (b'@', error("JSON parse error, stray '@'")),
    (b'01', error("JSON parse error, stray '01'")),
    (b'\xff', error("JSON parse error, stray '\ufffd'")),
])
def test_malformed_input_gets_qemus_error_and_the_next_request_works(raw, data, reply):
    raw.send(data + b'\n{"execute": "query-version", "id": "next"}\n')
    assert raw.reply() == reply
    assert raw.reply()["id"] == "next"


def test_qemu_json_extensions_and_large_numbers(raw):
    raw.send(b"{'execute': 'query-version', 'id': 'it\\'s \"quoted\"'}")
    assert raw.reply()["id"] == "it's \"quoted\""
    raw.send(b'{"execute": "query-version", "id": [18446744073709551615, 18446744073709551616]}')
    assert raw.reply()["id"] == [18446744073709551615, 18446744073709551616.0]
    raw.send(b'{"execute": "query-version", "id": "\\ud83d\\ude00 \\u00e9"}')
    assert raw.reply()["id"] == "\U0001F600 \u00e9"


def test_a_stray_byte_resynchronises_at_the_next_brace(raw):
    # QEMU's lexer skips to the next structural character: the request right after counts.
    raw.send(b'@@ junk{"execute": "query-version", "id": 3}')
    assert raw.reply() == error("JSON parse error, stray '@'")
    assert raw.reply()["id"] == 3


def test_requests_split_across_reads(raw):
    # split inside a key, inside a UTF-8 sequence and inside an escape
    for part in (b'{"exec', b'ute": "query-version", "id": "\xc3', b'\xa9 \\u00', b'e9"}'):
        raw.send(part)
        time.sleep(0.01)
    assert raw.reply()["id"] == "\u00e9 \u00e9"


def test_several_requests_in_one_read(raw):
    raw.send(b'{"execute": "query-version", "id": 1}{"execute": "nope", "id": 2}\r\n'
             b'{"execute": "query-version", "id": 3}')
    assert [raw.reply()["id"] for _ in range(3)] == [1, 2, 3]


# --- Registered commands -------------------------------------------------------------------------

DEMO_ARGS = {"uri": str, "resume": bool, "count": int, "rate": float, "blob": object,
             "name": (str, type(None)), "max-bandwidth": int}


@pytest.fixture
def demo(server):
    calls = []

    def handler(**kwargs):
        calls.append(kwargs)
        return kwargs

    server.register("demo", handler, DEMO_ARGS, required={"uri"})
    return calls


@pytest.mark.parametrize("args, desc", [
    ({}, "Parameter 'uri' is missing"),
    ({"bogus": 1}, "Parameter 'uri' is missing"),  # declared members are checked first
    ({"uri": "x", "bogus": 1}, "Parameter 'bogus' is unexpected"),
    ({"uri": 1}, "Invalid parameter type for 'uri', expected: string"),
    ({"uri": "x", "resume": 1}, "Invalid parameter type for 'resume', expected: boolean"),
    ({"uri": "x", "count": True}, "Invalid parameter type for 'count', expected: integer"),
    ({"uri": "x", "count": 1.5}, "Invalid parameter type for 'count', expected: integer"),
    ({"uri": "x", "rate": "1"}, "Invalid parameter type for 'rate', expected: number"),
    ({"uri": "x", "name": 3}, "Invalid parameter type for 'name', expected: string or null"),
])
def test_arguments_are_checked_before_the_handler_runs(client, demo, args, desc):
    with pytest.raises(QmpError) as e:
        client.cmd("demo", **args)
    assert (e.value.cls, e.value.desc) == ("GenericError", desc)
    assert demo == []


def test_handler_gets_keywords_and_returns_the_reply(client, demo):
    got = client.cmd("demo", uri="tcp:1:2", rate=3, name=None, blob=[1], max_bandwidth=5)
    assert demo == [{"uri": "tcp:1:2", "rate": 3, "name": None, "blob": [1], "max_bandwidth": 5}]
    assert got == demo[0]
    assert client.execute("query-version", {"x": 1}) == error("Parameter 'x' is unexpected")


def test_handler_results_and_errors(server, client):
    def cancel():
        raise QmpError("Postcopy migration in progress, cannot cancel.")

    def missing():
        raise QmpError("No such device", "DeviceNotFound")

    server.register("nothing", lambda: None)
    server.register("listing", lambda: [{"a": 1}])
    server.register("migrate_cancel", cancel)
    server.register("missing", missing)
    server.register("buggy", lambda: 1 // 0)
    server.register("unjsonable", lambda: {"x": object()})
    assert client.cmd("nothing") == {}
    assert client.cmd("listing") == [{"a": 1}]
    assert client.execute("migrate_cancel", id=4) == error(
        "Postcopy migration in progress, cannot cancel.", id=4)
    with pytest.raises(QmpError, match="No such") as e:
        client.cmd("missing")
    assert e.value.cls == "DeviceNotFound"
    assert client.execute("buggy") == error("Internal error: integer division or modulo by zero")
    assert client.execute("unjsonable", id=1)["error"]["desc"].startswith("Internal error")
    assert client.cmd("nothing") == {}  # the server took no harm


def test_register_refuses_what_it_could_not_check(server):
    with pytest.raises(ValueError, match="already registered"):
        server.register("query-version", lambda: None)
    with pytest.raises(ValueError, match="not declared"):
        server.register("a", lambda **k: None, {"x": int}, required={"y"})
    with pytest.raises(TypeError, match="argument types"):
        server.register("b", lambda **k: None, {"x": set})


def test_handlers_run_one_at_a_time(server):
    running, most = [0], [0]

    def slow():
        running[0] += 1
        most[0] = max(most[0], running[0])
        time.sleep(0.02)
        running[0] -= 1

    server.register("slow", slow)
    clients = [QmpClient(server.address) for _ in range(3)]
    threads = []
    for c in clients:
        c.connect()
        threads.append(threading.Thread(target=lambda c=c: [c.cmd("slow") for _ in range(2)]))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most == [1]
    for c in clients:
        c.close()


# --- Clients and events --------------------------------------------------------------------------

def test_two_clients_at_once(server):
    server.register("echo", lambda value: value, {"value": int}, required={"value"})
    with QmpClient(server.address) as a, QmpClient(server.address) as b:
        for i in range(5):
            assert (a.cmd("echo", value=i), b.cmd("echo", value=-i)) == (i, -i)


def test_events_reach_every_negotiated_client_only(server):
    with QmpClient(server.address) as a, QmpClient(server.address) as b:
        waiting = QmpClient(server.address)
        waiting.connect(negotiate=False)
        before = time.time()
        server.emit("MIGRATION", {"status": "setup"})
        for c in (a, b):
            event = c.wait_event("MIGRATION", timeout=2)
            assert (event["event"], event["data"]) == ("MIGRATION", {"status": "setup"})
            stamp = event["timestamp"]
            assert 0 <= stamp["microseconds"] < 1_000_000
            assert before - 1 <= stamp["seconds"] + stamp["microseconds"] / 1e6 <= time.time()
        # An event would have been queued before these replies: none was.
        waiting.cmd("qmp_capabilities")
        waiting.cmd("query-version")
        assert waiting.events() == []
        server.emit("STOP")
        assert waiting.wait_event("STOP", timeout=2).keys() == {"timestamp", "event"}
        waiting.close()


def test_events_arriving_during_a_command_are_kept(server, client):
    def migrate():
        server.emit("MIGRATION", {"status": "setup"})
        server.emit("MIGRATION", {"status": "active"})

    server.register("migrate", migrate)
    assert client.cmd("migrate") == {}
    server.emit("MIGRATION", {"status": "completed"})
    done = client.wait_event("MIGRATION", match={"data": {"status": "completed"}}, timeout=2)
    assert done["data"] == {"status": "completed"}
    assert [e["data"]["status"] for e in client.events()] == ["setup", "active"]
    with pytest.raises(TimeoutError):
        client.wait_event("MIGRATION", timeout=0.05)
    assert client.events(wait=0.01) == []


# --- Addresses and shutdown ----------------------------------------------------------------------

def test_close_disconnects_clients_and_removes_the_socket(sock_dir):
    path = f"{sock_dir}/m.sock"
    srv = QmpServer(f"unix:{path}").start()
    assert srv.address == f"unix:{path}" and os.path.exists(path)
    c = QmpClient(srv.address)
    c.connect()
    srv.close()
    assert not os.path.exists(path)
    with pytest.raises(ConnectionError):
        c.cmd("query-version")
    c.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("qmp-")]
    srv.close()  # twice is fine
    with pytest.raises(RuntimeError, match="starts once"):
        srv.start()


def test_a_signal_while_the_monitor_starts_leaves_it_closable(sock_dir, monkeypatch):
    """SIGTERM as start() starts its acceptor thread (a program told to stop at once): the
    program's clean-up still closes the monitor. Before: Stopped came out of Thread.start()
    before the thread ran, and close() failed to join it ("cannot join thread before it is
    started"), so the program ended with a traceback."""
    real_start = threading.Thread.start

    def signalled_start(thread):
        os.kill(os.getpid(), signal.SIGTERM)  # its handler runs here, in the main thread
        real_start(thread)
    monkeypatch.setattr(threading.Thread, "start", signalled_start)
    srv = QmpServer(f"unix:{sock_dir}/m.sock")
    with signals.stopping():
        with pytest.raises(signals.Stopped):
            srv.start()
        monkeypatch.setattr(threading.Thread, "start", real_start)
        srv.close()
    assert not os.path.exists(f"{sock_dir}/m.sock")
    assert not [t for t in threading.enumerate() if t.name.startswith("qmp-")]


def test_a_monitor_takes_over_no_file_it_did_not_make(sock_dir):
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(f"{sock_dir}/stale.sock")  # a killed program's
    stale.close()
    with pytest.raises(FileExistsError):
        QmpServer(f"unix:{sock_dir}/stale.sock").start()
    assert os.path.lexists(f"{sock_dir}/stale.sock")
    with open(f"{sock_dir}/file", "w"):
        pass
    with pytest.raises(FileExistsError):
        QmpServer(f"unix:{sock_dir}/file").start()
    assert os.path.exists(f"{sock_dir}/file")


@pytest.mark.parametrize("address", ["tcp:127.0.0.1:0", "tcp::0", "tcp:localhost:0"])
def test_tcp_port_zero_picks_a_free_port_on_loopback(address):
    with QmpServer(address) as srv:
        host, port = srv.address[4:].rsplit(":", 1)
        assert int(port) > 0 and host in ("127.0.0.1", "[::1]")
        with QmpClient(srv.address) as c:
            assert c.cmd("query-version")


def test_non_loopback_is_refused_unless_allowed():
    with pytest.raises(ValueError, match="non-loopback.*allow_remote=True"):
        QmpServer("tcp:0.0.0.0:0")
    with QmpServer("tcp:0.0.0.0:0", allow_remote=True) as srv:
        assert srv.address.startswith("tcp:0.0.0.0:")


@pytest.mark.parametrize("address", ["foo", "unix:", "tcp:127.0.0.1", "tcp:127.0.0.1:http",
                                     "tcp:127.0.0.1:70000", "udp:127.0.0.1:1"])
def test_bad_addresses(address):
    with pytest.raises(ValueError, match="expected unix:PATH or tcp:HOST:PORT"):
        QmpServer(address)
