"""The QMP monitor against clients that do not play by the rules, over real sockets: what one
client can make the monitor hold, compute and send stays bounded, and the others are served."""

import json
import shutil
import tempfile
import threading
import time

import pytest

from emu.qmp import protocol as qmp
from emu.qmp.protocol import QmpClient, QmpServer
from tests.test_qmp import Raw, error

BIG = 64 << 10  # bytes of the reply to "big"
NEXT = b'{"execute": "query-version", "id": "next"}'


@pytest.fixture(params=["unix", "tcp"])
def server(request):
    folder = tempfile.mkdtemp(prefix="qmp")  # short: a unix socket path fits in 108 bytes
    address = f"unix:{folder}/m.sock" if request.param == "unix" else "tcp:127.0.0.1:0"
    srv = QmpServer(address).start()
    yield srv
    srv.close()
    shutil.rmtree(folder)


def vm_rss() -> int:
    """This process's resident memory in bytes (the server runs in it)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) << 10 for line in f if line.startswith("VmRSS:"))


def answered(address: str) -> bool:
    with QmpClient(address) as c:
        return c.cmd("query-version")["package"] == "postcopy-emu"


def settle(count, deadline: float = 10.0) -> int:
    """count() once it has stopped changing for half a second."""
    end, last, since = time.monotonic() + deadline, count(), time.monotonic()
    while time.monotonic() < end and time.monotonic() - since < 0.5:
        time.sleep(0.05)
        if count() != last:
            last, since = count(), time.monotonic()
    return last


def replies_until_closed(conn: Raw, most: int = 10) -> list[dict]:
    """The replies before the server closes the connection, `most` of them at most."""
    conn.sock.settimeout(10)
    replies = []
    while len(replies) < most and (line := conn.line()):
        replies.append(json.loads(line))
    return replies


def send_in_background(conn: Raw, data: bytes) -> threading.Thread:
    def send():
        try:
            conn.sock.sendall(data)
        except OSError:
            pass  # the server closed the connection before it took everything

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


# --- Backpressure --------------------------------------------------------------------------------

def test_a_client_that_pipelines_without_reading_is_held_back(server):
    calls = []
    server.register("big", lambda: calls.append(1) or "x" * BIG)
    greedy = Raw(server.address, negotiate=True)
    before = vm_rss()
    greedy.send(b'{"execute": "big"}' * 1000)  # 64 MiB of replies, if they were all made
    executed = settle(lambda: len(calls))
    grown = vm_rss() - before
    assert answered(server.address)  # the others are still served meanwhile
    # QMP_REQ_QUEUE_LEN_MAX replies queued, plus what the kernel's socket buffers hold
    assert qmp.QMP_REQ_QUEUE_LEN_MAX <= executed < 200
    assert grown < 24 << 20
    greedy.close()


def test_a_client_that_leaves_events_unread_is_dropped(server):
    idle = Raw(server.address, negotiate=True)
    event = {"pad": "x" * 1000}
    for _ in range(5000):  # 5 MB of events
        server.emit("X-PAD", event)
    received = replies_until_closed(idle, most=5000)
    assert 0 < len(received) < 5000  # what the kernel had taken, then the end
    assert all(e["event"] == "X-PAD" for e in received)
    idle.close()
    assert answered(server.address)


def test_too_many_clients_are_refused(server):
    clients = [QmpClient(server.address) for _ in range(qmp.MAX_CLIENTS)]
    for c in clients:
        c.connect()
    extra = QmpClient(server.address)
    with pytest.raises(ConnectionError, match="Too many QMP clients: at most 16 are served"):
        extra.connect()
    extra.close()
    assert clients[0].cmd("query-version")  # the ones already in are not disturbed
    clients.pop().close()
    deadline = time.monotonic() + 10  # the server notices the departure in its own time
    while True:
        try:
            clients.append(QmpClient(server.address))
            clients[-1].connect()
            break
        except ConnectionError:
            clients.pop().close()
            assert time.monotonic() < deadline
            time.sleep(0.05)
    for c in clients:
        c.close()


# --- Bounded requests ----------------------------------------------------------------------------

def test_the_6_mib_array_gets_one_error_and_the_end(server):
    conn = Raw(server.address, negotiate=True)
    sender = send_in_background(conn, b"[" + b"1," * (3 << 20) + b'1]{"execute": "query-status"}')
    assert replies_until_closed(conn) == [error("JSON token count limit exceeded")]
    sender.join()
    conn.close()
    assert answered(server.address)


@pytest.mark.parametrize("request_, desc", [
    (b'{"execute": "query-version", "id": "' + b"x" * (2 << 20) + b'"}',
     "JSON token size limit exceeded"),
    (b'{"execute": "query-version", "id": ' + b"[" * 64 + b"]" * 64 + b"}",
     "JSON nesting depth limit exceeded"),
    (b'{"execute": "query-version", "id": [' + b"1," * 40000 + b"1]}",
     "JSON token count limit exceeded"),
], ids=["size", "nesting", "count"])
def test_an_oversized_request_closes_the_client_with_an_error(server, request_, desc):
    conn = Raw(server.address, negotiate=True)
    sender = send_in_background(conn, request_ + b'{"execute": "query-version"}')
    assert replies_until_closed(conn) == [error(desc)]
    sender.join()
    conn.close()
    assert answered(server.address)


def test_the_deepest_allowed_id_is_echoed(server):
    conn = Raw(server.address, negotiate=True)
    deepest = b"[" * (qmp.MAX_NESTING - 1) + b"]" * (qmp.MAX_NESTING - 1)
    conn.send(b'{"execute": "query-version", "id": ' + deepest + b"}")
    assert json.dumps(conn.reply()["id"]).encode().replace(b" ", b"") == deepest
    conn.close()


# --- One error per malformed value ---------------------------------------------------------------

@pytest.mark.parametrize("data, errors", [
    # a stray token inside a value: the rest of the value is skipped, brackets and all
    (b'{"execute": @, "id": [1, 2, {"a": @}]}', ["stray '@'"]),
    (b"[" + b"@," * 5000 + b"@]", ["stray '@'"]),
    (b'{"execute": "a\tb", "id": 1}', ["stray '\"a\t'"]),
    # qmp-spec.rst: a control character resets the parser, inside a value or not
    (b'{"execute": "query-version", "arguments": {\x01', ["stray '\x01'"]),
    (b'{"execute": @, "arguments": {\x01', ["stray '@'", "stray '\x01'"]),
    (b'{"execute": "abc\n', ["stray '\"abc\n'"]),
], ids=["object", "array", "tab", "reset", "reset while skipping", "newline"])
def test_a_malformed_value_gets_one_error(server, data, errors):
    conn = Raw(server.address, negotiate=True)
    conn.send(data + NEXT)
    for desc in errors:
        assert conn.reply() == error(f"JSON parse error, {desc}")
    assert conn.reply() == {"return": server.version, "id": "next"}
    conn.close()


# --- Numbers -------------------------------------------------------------------------------------

def strict(line: bytes) -> dict:
    """The JSON of `line`, refusing what is not JSON although Python writes it (Infinity)."""
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")
    return json.loads(line, parse_constant=refuse)


@pytest.mark.parametrize("number", [b"1e999", b"-1e999", b"1" + b"0" * 400, b"9" * 5000],
                         ids=["1e999", "-1e999", "400 digits", "5000 digits"])
def test_a_number_out_of_range_is_refused_not_echoed_as_infinity(server, number):
    conn = Raw(server.address, negotiate=True)
    conn.send(b'{"execute": "query-version", "id": ' + number + b"}" + NEXT)
    assert strict(conn.line()) == error("JSON parse error, number out of range")
    assert strict(conn.line())["id"] == "next"
    conn.close()


def test_a_handler_returning_infinity_gets_an_internal_error(server):
    server.register("inf", lambda: {"rate": float("inf")})
    conn = Raw(server.address, negotiate=True)
    conn.send(b'{"execute": "inf", "id": 1e308}')
    reply = strict(conn.line())
    assert reply["error"]["desc"].startswith("Internal error") and reply["id"] == 1e308
    conn.close()
