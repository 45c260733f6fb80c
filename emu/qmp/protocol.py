"""QMP, the QEMU Machine Protocol: the monitor a management tool drives the emulator with.

The wire protocol follows QEMU's docs/interop/qmp-spec.rst: a greeting, capabilities
negotiation, one JSON object per request, `{"return": ...}` or `{"error": ...}` replies and
timestamped asynchronous events, each line ended by CRLF. Input is read the way QEMU reads it
(qobject/json-lexer.c, json-streamer.c, json-parser.c): values may be split across reads or
packed several to a read, single-quoted strings are accepted, and a lexical error resynchronises
at the next structural or control character. Every error text is QEMU's own, so that a client
written against QEMU sees the same answers here; the comment at each names the QEMU file.

What one client can make the monitor hold is bounded, as in QEMU's monitor/qmp.c: a request's
size and nesting, the replies it leaves unread before the monitor stops reading it, the events
it leaves unread before it is dropped, and the number of clients. Unlike QEMU, a malformed
value gets one error, not one per token, and a number is never echoed as a non-finite one.

    server = QmpServer("unix:/tmp/emu.qmp.protocol")
    server.register("migrate", migrate, {"uri": str, "resume": bool}, required={"uri"})
    server.start()
    server.emit("MIGRATION", {"status": "setup"})
    ...
    server.close()
"""

from __future__ import annotations

import contextvars
import ipaddress
import json
import logging
import math
import queue
import select
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from emu import signals
from emu.net import uri

DEFAULT_VERSION: dict = {
    "qemu": {"micro": 0, "minor": 1, "major": 7},
    "package": "postcopy-emu",
}
# QMPCapability (qapi/control.json) knows only "oob"; like a QEMU monitor without an I/O
# thread, this server offers none of them.
KNOWN_CAPABILITIES = ("oob",)

# The limits of qobject/json-streamer.c on one request, lowered: a token held here costs a
# Python tuple and bytes (about 100 bytes, QEMU's about 20), no command takes more than a few
# KiB, and Python's json encoder recurses once per level when it echoes an id. A request over
# a limit is answered with QEMU's error and ends the connection: where it ends is unknown.
MAX_TOKEN_SIZE = 1 << 20  # QEMU: 64 MiB
MAX_TOKEN_COUNT = 1 << 16  # QEMU: 2 Mi
MAX_NESTING = 1 << 6  # QEMU: 1024
# monitor/monitor-internal.h: the requests a client may have waiting before its monitor stops
# reading it. Here a request waits while its reply cannot be queued behind this many unread
# ones, so a client that sends and never reads makes the monitor hold no more than that.
QMP_REQ_QUEUE_LEN_MAX = 8
MAX_UNREAD = 1 << 20  # bytes of replies and events a client leaves unread before it is dropped
MAX_CLIENTS = 16  # connected at a time; one more is told so and disconnected
LINGER = 1.0  # seconds to read (and discard) input after an error that ends the connection

_log = logging.getLogger(__name__)


class QmpError(Exception):
    """An error reply: `cls` is QEMU's error class, `desc` its human-readable message."""

    def __init__(self, desc: str, cls: str = "GenericError") -> None:
        super().__init__(desc)
        self.desc = desc
        self.cls = cls

    def body(self) -> dict:
        return {"class": self.cls, "desc": self.desc}


# --- JSON input, as QEMU's lexer, streamer and parser see it ----------------------------------

def _row(other: tuple[str, bool], *moves: tuple[bytes, str]) -> tuple[dict, tuple[str, bool]]:
    """One state of the lexer: the bytes that move to a next state (consumed), and what any
    other byte does: (state or token kind, consumed). Later moves override earlier ones."""
    table = {c: (state, True) for chars, state in moves for c in chars}
    return table, other


_ERROR = ("error", True)  # the offending byte belongs to the stray token, as in QEMU
_TEXT = bytes(range(0x20, 0xFE))  # what may appear in a string: no controls, no 0xFE/0xFF
_DIGITS = b"0123456789"
_STRUCTURAL = b"{}[]:,"
# qobject/json-lexer.c's table. Token kinds are the structural characters themselves and the
# upper-case names; a token ended by lookahead leaves its last byte unconsumed.
_LEX: dict[str, tuple[dict, tuple[str, bool]]] = {
    "start": _row(_ERROR, (b'"', "dq"), (b"'", "sq"), (b"0", "zero"), (_DIGITS[1:], "digits"),
                  (b"-", "sign"), (bytes(range(0x61, 0x7B)), "keyword"),
                  (b" \t\r\n", "start"), *((bytes([c]), chr(c)) for c in _STRUCTURAL)),
    # After a stray token, skip to a byte where input plausibly starts again.
    "recovery": _row(("start", False),
                     (bytes(c for c in _TEXT + b"\t" if c not in _STRUCTURAL), "recovery")),
    "dq": _row(_ERROR, (_TEXT, "dq"), (b"\\", "dq_esc"), (b'"', "STRING")),
    "dq_esc": _row(_ERROR, (_TEXT, "dq")),
    "sq": _row(_ERROR, (_TEXT, "sq"), (b"\\", "sq_esc"), (b"'", "STRING")),
    "sq_esc": _row(_ERROR, (_TEXT, "sq")),
    "zero": _row(("INTEGER", False), (_DIGITS, "error"), (b".", "mantissa")),
    "digits": _row(("INTEGER", False), (_DIGITS, "digits"), (b"eE", "exp_e"), (b".", "mantissa")),
    "sign": _row(_ERROR, (b"0", "zero"), (_DIGITS[1:], "digits")),
    "mantissa": _row(_ERROR, (_DIGITS, "mantissa_digits")),
    "mantissa_digits": _row(("FLOAT", False), (_DIGITS, "mantissa_digits"), (b"eE", "exp_e")),
    "exp_e": _row(_ERROR, (b"+-", "exp_sign"), (_DIGITS, "exp_digits")),
    "exp_sign": _row(_ERROR, (_DIGITS, "exp_digits")),
    "exp_digits": _row(("FLOAT", False), (_DIGITS, "exp_digits")),
    "keyword": _row(("KEYWORD", False), (bytes(range(0x61, 0x7B)), "keyword")),
}


class _Lexer:
    """Bytes in, (kind, text) tokens out to `emit`; kind "error" is a stray token."""

    def __init__(self, emit: Callable[[str, bytes], None]) -> None:
        self._emit = emit
        self._state = "start"
        self._token = bytearray()

    def char(self, c: int) -> None:
        consumed = False
        while not consumed:
            moves, other = _LEX[self._state]
            nxt, consumed = moves.get(c, other)
            if consumed:
                self._token.append(c)
            if nxt not in _LEX:
                self._emit(nxt, bytes(self._token))
                nxt = "recovery" if nxt == "error" else "start"
            if nxt in ("start", "recovery"):
                self._token.clear()
            self._state = nxt
        if len(self._token) > MAX_TOKEN_SIZE:
            self._token.clear()
            self._state = "start"
            self._emit("oversize", b"")


# A lexical error on one of these bytes resets the streamer even inside a value: it is how
# docs/interop/qmp-spec.rst tells a client to force the parser into a known-good state (an
# ASCII control other than tab, or 0xFE or 0xFF, where json-lexer.c's recovery stops too).
_RESYNC = frozenset(c for c in range(0x20) if c != 0x09) | {0xFE, 0xFF}


class _Streamer:
    """Groups tokens into whole values, as qobject/json-streamer.c does: a value ends when its
    braces and brackets balance, so no newline is needed and one read may carry several.

    Unlike QEMU, a malformed value gets one error: after a stray token inside it, the rest of
    it is skipped (its brackets still counted), where QEMU parses each of its remaining tokens
    as a value of its own and answers each. A value over a limit breaks the stream for good."""

    def __init__(self) -> None:
        self._lexer = _Lexer(self._token)
        self._out: list[tuple[Any, QmpError | None]] = []
        self.broken = False  # a value passed a limit: the connection is to end after its error
        self._clear()

    def feed(self, data: bytes) -> Iterator[tuple[Any, QmpError | None]]:
        """The (value, error) pairs completed by `data`, in order, exactly one of each set;
        lazily, so that no input is lexed beyond the request being answered."""
        for c in data:
            self._lexer.char(c)
            if self._out:
                out, self._out = self._out, []
                yield from out
                if self.broken:
                    return

    def _clear(self, skipping: bool = False) -> None:
        """Forget the tokens; unless `skipping` the rest of a malformed value, its counts too."""
        self._tokens: list[tuple[str, bytes]] = []
        self._skipping = skipping
        if not skipping:
            self._count = self._size = 0
            self._depth = {"{": 0, "[": 0}

    def _token(self, kind: str, text: bytes) -> None:
        if self.broken:
            return
        if kind == "error" and text[-1] in _RESYNC:
            self._clear()
            self._out.append((None, _stray(text)))
            return
        if kind in ("{", "}", "[", "]"):
            self._depth["{" if kind in ("{", "}") else "["] += 1 if kind in ("{", "[") else -1
        limit = self._limit_error(kind, text)
        if limit:
            self.broken = True
            if not self._skipping:  # else this value has had its error
                self._out.append((None, QmpError(limit)))
            return
        self._count += 1
        self._size += len(text)
        braces, brackets = self._depth.values()
        complete = not ((braces > 0 or brackets > 0) and min(braces, brackets) >= 0)
        if self._skipping:
            if complete:
                self._clear()
        elif kind == "error":
            self._out.append((None, _stray(text)))
            self._clear(skipping=not complete)
        elif complete:
            tokens = [*self._tokens, (kind, text)]
            self._clear()
            try:
                self._out.append((_Parser(tokens).parse(), None))
            except QmpError as e:
                self._out.append((None, e))
        else:
            self._tokens.append((kind, text))

    def _limit_error(self, kind: str, text: bytes) -> str | None:
        if kind == "oversize" or self._size + len(text) + 1 > MAX_TOKEN_SIZE:
            return "JSON token size limit exceeded"
        if self._count + 1 > MAX_TOKEN_COUNT:
            return "JSON token count limit exceeded"
        if sum(self._depth.values()) > MAX_NESTING:
            return "JSON nesting depth limit exceeded"
        return None


def _stray(text: bytes) -> QmpError:
    return QmpError(f"JSON parse error, stray '{text.decode(errors='replace')}'")


def _parse_error(message: str) -> QmpError:
    return QmpError(f"JSON parse error, {message}")  # qobject/json-parser.c parse_error()


_MORE = object()  # a container is open and wants its next member
_KEYWORDS = {"true": True, "false": False, "null": None}


class _Parser:
    """qobject/json-parser.c's grammar and messages (the first error wins), with an explicit
    stack instead of recursion: QEMU allows 1024 levels, more than Python's recursion limit."""

    def __init__(self, tokens: list[tuple[str, bytes]]) -> None:
        self._tokens = tokens
        self._pos = 0

    def parse(self) -> Any:
        frames: list[list] = []  # [kind, container, pending key] of each open container
        value = self._start(frames)
        while True:
            if value is _MORE:
                value = self._start(frames)
            elif not frames:
                return value
            else:
                value = self._add(frames, value)

    def _peek(self) -> tuple[str, bytes]:
        if self._pos >= len(self._tokens):
            raise _parse_error("premature EOI")
        return self._tokens[self._pos]

    def _pop(self) -> str:
        kind = self._peek()[0]
        self._pos += 1
        return kind

    def _start(self, frames: list[list]) -> Any:
        kind, text = self._peek()
        if kind in ("{", "["):
            return self._open(frames, kind)
        self._pos += 1
        if kind == "STRING":
            return _string(text)
        if kind in ("INTEGER", "FLOAT"):
            return _number(text, kind == "INTEGER")
        if kind == "KEYWORD":
            word = text.decode()
            if word not in _KEYWORDS:
                raise _parse_error(f"invalid keyword '{word}'")
            return _KEYWORDS[word]
        raise _parse_error("expecting value")

    def _open(self, frames: list[list], kind: str) -> Any:
        self._pos += 1
        container: dict | list = {} if kind == "{" else []
        if self._peek()[0] == ("}" if kind == "{" else "]"):
            self._pos += 1
            return container
        frames.append(["key" if kind == "{" else "item", container, None])
        return _MORE

    def _add(self, frames: list[list], value: Any) -> Any:
        """Hand a finished value to the innermost container: the container if that closed
        it, else _MORE."""
        frame = frames[-1]
        kind, container, key = frame
        if kind == "key":
            if not isinstance(value, str):
                raise _parse_error("key is not a string in object")
            if self._pop() != ":":
                raise _parse_error("missing : in object pair")
            frame[0], frame[2] = "value", value
            return _MORE
        if kind == "value":
            if key in container:
                raise _parse_error("duplicate key")
            container[key] = value
        else:
            container.append(value)
        close, what = ("}", "dict") if kind == "value" else ("]", "list")
        token = self._pop()
        if token == close:
            frames.pop()
            return container
        if token != ",":
            raise _parse_error(f"expected separator in {what}")
        frame[0] = "key" if kind == "value" else "item"
        return _MORE


def _number(text: bytes, integer: bool) -> int | float:
    # QEMU keeps integers as int64 or uint64 (20 characters at most) and falls back to a
    # double beyond.
    if integer and len(text) <= 20 and -(1 << 63) <= (value := int(text)) < (1 << 64):
        return value
    value = float(text)
    # QEMU's strtod() makes 1e999 an infinity, which its writer prints as "inf", not JSON:
    # refuse it, as nothing here could echo it.
    if not math.isfinite(value):
        raise _parse_error("number out of range")
    return value


_ESCAPES = {ord(k): v for k, v in zip("\"'\\/bfnrt", "\"'\\/\b\f\n\r\t", strict=True)}


def _string(token: bytes) -> str:
    out: list[str] = []
    i, end = 1, len(token) - 1  # inside the quotes
    while i < end:
        j = token.find(b"\\", i, end)
        j = end if j < 0 else j
        out.append(_decode(token[i:j]))
        i = _escape(token, j, out) if j < end else end
    return "".join(out)


def _escape(token: bytes, i: int, out: list[str]) -> int:
    """Append the escape sequence at token[i] to `out`; returns where the next part starts."""
    code = token[i + 1]
    if code in _ESCAPES:
        out.append(_ESCAPES[code])
        return i + 2
    if code != ord("u"):
        raise _parse_error("invalid escape sequence in string")
    cp, end = _hex4(token, i + 2), i + 6
    if 0xD800 <= cp <= 0xDBFF and token[end:end + 2] == b"\\u":
        low = _hex4(token, end + 2)
        cp, end = (0x10000 + ((cp & 0x3FF) << 10) | (low & 0x3FF), end + 6) \
            if 0xDC00 <= low <= 0xDFFF else (-1, end)
    if not _valid_codepoint(cp):
        sequence = token[i:end].decode(errors="replace")
        raise _parse_error(f"{sequence} is not a valid Unicode character")
    out.append(chr(cp))
    return end


def _hex4(token: bytes, i: int) -> int:
    digits = token[i:i + 4]
    ok = len(digits) == 4 and all(c in b"0123456789abcdefABCDEF" for c in digits)
    return int(digits, 16) if ok else -1


def _valid_codepoint(cp: int) -> bool:
    # util/unicode.c is_valid_codepoint(): no surrogates, no noncharacters
    return (0 <= cp <= 0x10FFFF and not 0xD800 <= cp <= 0xDFFF
            and not 0xFDD0 <= cp <= 0xFDEF and cp & 0xFFFE != 0xFFFE)


def _decode(raw: bytes) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _parse_error("invalid UTF-8 sequence in string") from None
    if not text.isascii() and not all(_valid_codepoint(ord(c)) for c in text):
        raise _parse_error("invalid UTF-8 sequence in string")
    return text


def _encode(message: dict) -> bytes:
    # QEMU writes ASCII only, and monitor_puts() turns each "\n" into "\r\n".
    # allow_nan=False: Infinity and NaN are not JSON, so a handler's infinity is a ValueError.
    return json.dumps(message, allow_nan=False).encode("ascii") + b"\r\n"


# --- Addresses (emu/net/uri.py parses them and makes the sockets) -------------------------------

def _is_loopback(host: str) -> bool:
    infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    return all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


# --- Server ------------------------------------------------------------------------------------

_TYPE_NAMES = {str: "string", int: "integer", float: "number", bool: "boolean", dict: "object",
               list: "array", type(None): "null", object: "any"}

ArgTypes = type | tuple[type, ...]


def _type_ok(value: Any, expected: type) -> bool:
    if expected is object:
        return True
    if isinstance(value, bool):  # JSON true is not a number, though Python's bool is an int
        return expected is bool
    if expected is float:  # QAPI's 'number' takes integers too
        return isinstance(value, int | float)
    return isinstance(value, expected)


class _Command:
    def __init__(self, handler: Callable[..., Any], args: dict[str, ArgTypes] | None,
                 required: Iterable[str]) -> None:
        self.handler = handler
        self.args = {k: v if isinstance(v, tuple) else (v,) for k, v in (args or {}).items()}
        self.required = set(required)
        unknown = [t for types in self.args.values() for t in types if t not in _TYPE_NAMES]
        if unknown:
            raise TypeError(f"argument types must be among {list(_TYPE_NAMES)}, not {unknown}")
        if not self.required <= self.args.keys():
            raise ValueError(f"required arguments not declared: {self.required - self.args.keys()}")

    def check(self, arguments: dict) -> dict[str, Any]:
        """The handler's keyword arguments; QEMU's visitor errors (qapi/qobject-input-visitor.c)
        in its order: declared members first, then members nobody declared."""
        for name, types in self.args.items():
            if name not in arguments:
                if name in self.required:
                    raise QmpError(f"Parameter '{name}' is missing")
            elif not any(_type_ok(arguments[name], t) for t in types):
                expected = " or ".join(_TYPE_NAMES[t] for t in types)
                raise QmpError(f"Invalid parameter type for '{name}', expected: {expected}")
        for name in arguments:
            if name not in self.args:
                raise QmpError(f"Parameter '{name}' is unexpected")
        # A keyword argument cannot hold '-': make it '_', as QEMU's generated C names do.
        return {name.replace("-", "_"): value for name, value in arguments.items()}


class _Session:
    """One client connection. Replies and events go through one queue, written by a thread of
    its own, so that emit() never blocks on a client that does not read; the queue is bounded
    by holding back the client's next request (wait_for_room) and by dropping a client whose
    unread events pass MAX_UNREAD."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.negotiated = False  # qmp_capabilities succeeded; its reply may not be queued yet
        self.command_mode = False  # events are delivered
        self.streamer = _Streamer()
        self.reader: threading.Thread | None = None
        self._lock = threading.Condition(threading.Lock())
        self._queued = 0  # lines in the outbox, not yet written
        self._unread = 0  # their bytes
        self._gone = False  # hung up: nothing more is written
        self._outbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._write, name="qmp-writer", daemon=True)
        self._writer.start()

    def send(self, line: bytes) -> None:
        # Command mode starts right after the negotiation reply, so no event overtakes it.
        with self._lock:
            self._queue(line)
            self.command_mode = self.negotiated

    def send_event(self, line: bytes) -> None:
        with self._lock:
            if not self.command_mode or self._gone:
                return
            if self._unread + len(line) <= MAX_UNREAD:
                self._queue(line)
                return
        _log.warning("QMP client dropped: it left %d bytes of replies and events unread",
                     self._unread)
        self.hang_up()

    def wait_for_room(self) -> bool:
        """Wait until a reply fits behind the unread ones (QMP_REQ_QUEUE_LEN_MAX); whether the
        client is still there. Meanwhile nothing more is read from it, as QEMU's
        monitor_suspend() does, so its input waits in the kernel's socket buffers."""
        with self._lock:
            self._lock.wait_for(lambda: self._gone or self._queued < QMP_REQ_QUEUE_LEN_MAX)
            return not self._gone

    def hang_up(self) -> None:
        with self._lock:
            self._gone = True
            self._lock.notify_all()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # also wakes the reader blocked in recv()
        except OSError:
            pass

    def finish(self, linger: bool = False) -> None:
        """Flush what is queued, then close; called by the reader when it is done. With
        `linger`, the client is still sending what its last reply refused (an error that ends
        the connection): read and discard that for a moment first, as closing a TCP socket with
        unread input resets the connection, and the client could lose the error."""
        self._outbox.put(None)
        self._writer.join()
        if linger:
            self._drain()
        self.sock.close()

    def _drain(self) -> None:
        deadline = time.monotonic() + LINGER
        try:
            self.sock.shutdown(socket.SHUT_WR)
            while (left := deadline - time.monotonic()) > 0:
                self.sock.settimeout(left)
                if not self.sock.recv(65536):
                    return
        except OSError:
            pass  # a timeout, or the client is gone

    def _queue(self, line: bytes) -> None:
        self._outbox.put(line)
        self._queued += 1
        self._unread += len(line)

    def _write(self) -> None:
        while (line := self._outbox.get()) is not None:
            try:
                self.sock.sendall(line)
            except OSError:
                self.hang_up()
                return
            with self._lock:
                self._queued -= 1
                self._unread -= len(line)
                self._lock.notify_all()


# The session whose command is running, for commands about the monitor itself (QEMU's
# monitor_cur()).
_current: contextvars.ContextVar[_Session] = contextvars.ContextVar("qmp_session")


class QmpServer:
    """A QMP monitor on `address` (unix:PATH or tcp:HOST:PORT, port 0 = any free port).

    Serves up to MAX_CLIENTS clients at a time from background threads once start()ed;
    `address` is then the bound address. Command handlers run one at a time, as in QEMU's main
    loop. A tcp address must be loopback unless allow_remote: whoever connects controls the
    emulator.
    """

    def __init__(self, address: str, version: dict | None = None, *,
                 allow_remote: bool = False) -> None:
        where = uri.parse(address)
        if where.family != socket.AF_UNIX and not allow_remote and not _is_loopback(where.host):
            raise ValueError(f"refusing to serve QMP on {address}, a non-loopback address: "
                             "anyone who can connect controls the emulator. Pass "
                             "allow_remote=True to do it anyway.")
        self.address = address
        self.version = dict(DEFAULT_VERSION if version is None else version)
        self._commands: dict[str, _Command] = {}
        self._dispatch = threading.Lock()
        self._sessions: set[_Session] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._listener: socket.socket | None = None
        self._acceptor: threading.Thread | None = None
        self.register("qmp_capabilities", self._qmp_capabilities, {"enable": list})
        self.register("query-commands", lambda: [{"name": n} for n in list(self._commands)])
        self.register("query-version", lambda: self.version)

    def __enter__(self) -> QmpServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def register(self, name: str, handler: Callable[..., Any],
                 args: dict[str, ArgTypes] | None = None, required: Iterable[str] = ()) -> None:
        """Add command `name`. `args` maps each argument to its type (str, int, float, bool,
        dict, list, type(None), object for any, or a tuple of them); no `args`, no arguments.
        Arguments are optional unless `required`. The handler gets them as keywords ('-' turned
        to '_'), returns the reply's `return` value (None for {}), or raises QmpError."""
        if name in self._commands:
            raise ValueError(f"QMP command {name} is already registered")
        self._commands[name] = _Command(handler, args, required)

    def start(self) -> QmpServer:
        if self._listener is not None or self._closed:
            raise RuntimeError("a QmpServer starts once")
        # a stop signal meanwhile waits until the server is whole: close() can then undo it
        with signals.held():
            self._listener = uri.listen(self.address, backlog=None)
            self.address = uri.bound(self._listener)
            self._wake_r, self._wake_w = socket.socketpair()
            self._acceptor = threading.Thread(target=self._accept, name="qmp-accept",
                                              daemon=True)
            self._acceptor.start()
        return self

    def emit(self, name: str, data: dict | None = None) -> None:
        """Send event `name` to every client in command mode (QEMU omits `data` when None)."""
        seconds, micro = divmod(time.time_ns() // 1000, 1_000_000)
        event: dict = {"timestamp": {"seconds": seconds, "microseconds": micro}, "event": name}
        if data is not None:
            event["data"] = data
        line = _encode(event)
        with self._lock:
            sessions = list(self._sessions)
        for session in sessions:
            session.send_event(line)

    def close(self) -> None:
        """Stop listening, disconnect every client, remove the unix socket file."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            sessions = list(self._sessions)
        if self._listener is None:
            return
        self._wake_w.close()
        for session in sessions:
            session.hang_up()
        if pin := uri.bound_file(self._listener):
            pin.remove()  # ours only: not what took its place
        threads = [self._acceptor, *(s.reader for s in sessions)]
        # A handler that closes the server cannot wait for the threads queued behind it.
        if threading.current_thread() not in threads:
            for thread in threads:
                thread.join()

    def _accept(self) -> None:
        with self._listener, self._wake_r:
            while True:
                ready, _, _ = select.select([self._listener, self._wake_r], [], [])
                if self._wake_r in ready:
                    return
                try:
                    sock, _ = self._listener.accept()
                except OSError:
                    continue  # the client gave up before we accepted it
                self._open(sock)

    def _open(self, sock: socket.socket) -> None:
        uri.no_delay(sock)
        with self._lock:
            if self._closed or len(self._sessions) >= MAX_CLIENTS:
                _refuse(sock, self._closed)
                return
            session = _Session(sock)
            session.reader = threading.Thread(target=self._serve, args=(session,),
                                              name="qmp-client", daemon=True)
            self._sessions.add(session)
            session.reader.start()

    def _serve(self, session: _Session) -> None:
        session.send(_encode({"QMP": {"version": self.version, "capabilities": []}}))
        try:
            self._read(session)
        except OSError:
            pass  # the client vanished
        finally:
            # Still listed while it flushes, so that close() can cut a client that never reads.
            session.finish(linger=session.streamer.broken)
            with self._lock:
                self._sessions.discard(session)

    def _read(self, session: _Session) -> None:
        """Answer the client's requests one at a time, until it leaves or breaks a limit."""
        while data := session.sock.recv(65536):
            for value, error in session.streamer.feed(data):
                if not session.wait_for_room():
                    return
                session.send(self._respond(session, value, error))
            if session.streamer.broken:
                return

    def _respond(self, session: _Session, request: Any, error: QmpError | None) -> bytes:
        if error is None and not isinstance(request, dict):
            error = QmpError("QMP input must be a JSON object")  # qapi/qmp-dispatch.c
        reply = {"error": error.body()} if error else self._execute(session, request)
        # QEMU echoes the id whenever the request was an object, even with an error.
        echo = {"id": request["id"]} if isinstance(request, dict) and "id" in request else {}
        try:
            return _encode({**reply, **echo})
        except (TypeError, ValueError, RecursionError) as e:  # what JSON can't carry
            _log.exception("QMP reply is not JSON")
            return _encode({"error": QmpError(f"Internal error: {e}").body(), **echo})

    def _execute(self, session: _Session, request: dict) -> dict:
        try:
            _check_request(request)
            command = self._find(session, request["execute"])
            kwargs = command.check(request.get("arguments", {}))
            with self._dispatch:
                token = _current.set(session)
                try:
                    value = command.handler(**kwargs)
                finally:
                    _current.reset(token)
        except QmpError as e:
            return {"error": e.body()}
        except Exception as e:  # a bug in a handler must not take the monitor down
            _log.exception("QMP command %s failed", request.get("execute"))
            return {"error": QmpError(f"Internal error: {e}").body()}
        return {"return": {} if value is None else value}

    def _find(self, session: _Session, name: str) -> _Command:
        # monitor/qmp.c: before negotiation only qmp_capabilities exists, and QEMU rewrites
        # CommandNotFound to say what it expects.
        if not session.negotiated and name != "qmp_capabilities":
            raise QmpError("Expecting capabilities negotiation with 'qmp_capabilities'",
                           "CommandNotFound")
        if name not in self._commands:
            raise QmpError(f"The command {name} has not been found", "CommandNotFound")
        return self._commands[name]

    @staticmethod
    def _qmp_capabilities(enable: list | None = None) -> None:
        # The checks of the enum list (qapi-visit-core.c input_type_enum(), which names list
        # members 'null'), then monitor/qmp-cmds-control.c qmp_qmp_capabilities().
        for i, capability in enumerate(enable or []):
            if not isinstance(capability, str):
                raise QmpError(f"Invalid parameter type for 'enable[{i}]', expected: string")
            if capability not in KNOWN_CAPABILITIES:
                raise QmpError(f"Parameter 'null' does not accept value '{capability}'")
        session = _current.get()
        if session.negotiated:
            raise QmpError("Capabilities negotiation is already complete, command ignored",
                           "CommandNotFound")
        if enable:
            raise QmpError(f"Capability {', '.join(enable)} not available")
        session.negotiated = True


def _refuse(sock: socket.socket, closing: bool) -> None:
    """Say why to a client that cannot be served (without waiting on it), and disconnect it."""
    if not closing:
        desc = f"Too many QMP clients: at most {MAX_CLIENTS} are served at a time"
        try:
            sock.setblocking(False)
            sock.send(_encode({"error": QmpError(desc).body()}))
        except OSError:
            pass
    sock.close()


def _check_request(request: dict) -> None:
    """qapi/qmp-dispatch.c qmp_dispatch_check_obj(); exec-oob is unexpected without oob."""
    for name, value in request.items():
        if name == "execute" and not isinstance(value, str):
            raise QmpError("QMP input member 'execute' must be a string")
        if name == "arguments" and not isinstance(value, dict):
            raise QmpError("QMP input member 'arguments' must be an object")
        if name not in ("execute", "arguments", "id"):
            raise QmpError(f"QMP input member '{name}' is unexpected")
    if "execute" not in request:
        raise QmpError("QMP input lacks member 'execute'")


# --- Client ------------------------------------------------------------------------------------

def _matches(value: Any, pattern: Any) -> bool:
    """Whether every member of `pattern` is in `value`, recursively (as in qemu.machine)."""
    if isinstance(pattern, dict):
        return isinstance(value, dict) and all(
            k in value and _matches(value[k], v) for k, v in pattern.items())
    return value == pattern


class QmpClient:
    """A minimal synchronous QMP client, for tests and scripts; use it from one thread.

    Events that arrive while a command waits for its reply are kept for events() and
    wait_event(). Replies come in request order, as QMP without out-of-band execution
    guarantees.
    """

    def __init__(self, address: str, timeout: float = 5.0) -> None:
        self.address = address
        self.timeout = timeout
        self.greeting: dict | None = None
        self._sock: socket.socket | None = None
        self._buffer = bytearray()
        self._events: list[dict] = []

    def __enter__(self) -> QmpClient:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def connect(self, negotiate: bool = True) -> dict:
        """Connect, read the greeting (returned, and kept as `greeting`), and unless told not
        to, leave capabilities negotiation mode."""
        self._sock = uri.dial(self.address, self.timeout)
        uri.no_delay(self._sock)
        self.greeting = self._read(self.timeout)
        if self.greeting is None or "QMP" not in self.greeting:
            raise ConnectionError(f"no QMP greeting from {self.address}: {self.greeting}")
        if negotiate:
            self.cmd("qmp_capabilities")
        return self.greeting

    def execute(self, name: str, args: dict | None = None, id: Any = None) -> dict:
        """Send one command and return its raw reply."""
        request: dict[str, Any] = {"execute": name}
        if args is not None:
            request["arguments"] = args
        if id is not None:
            request["id"] = id
        self._sock.sendall(json.dumps(request).encode() + b"\n")
        deadline = time.monotonic() + self.timeout
        while (message := self._read(deadline - time.monotonic())) is not None:
            if "event" not in message:
                return message
            self._events.append(message)
        raise TimeoutError(f"no reply to {name} within {self.timeout} s")

    def cmd(self, name: str, /, **args: Any) -> Any:
        """Run a command and return its `return` value; raise QmpError for an error reply.
        Keyword names have '_' turned into '-' (as qemu.machine's qmp() does); `name` is
        positional-only, so a command may take an argument called "name"."""
        arguments = {k.replace("_", "-"): v for k, v in args.items()}
        reply = self.execute(name, arguments or None)
        if "error" in reply:
            raise QmpError(reply["error"]["desc"], reply["error"]["class"])
        return reply["return"]

    def events(self, wait: float = 0.0) -> list[dict]:
        """Take every event received so far; if there is none, wait up to `wait` seconds
        for one."""
        deadline = time.monotonic() + wait
        while not self._events and (event := self._read_event(deadline)) is not None:
            self._events.append(event)
        while (event := self._read_event(0.0)) is not None:
            self._events.append(event)
        taken, self._events = self._events, []
        return taken

    def wait_event(self, name: str, timeout: float = 5.0, match: dict | None = None) -> dict:
        """Take the first event called `name` whose members include `match`'s, e.g.
        match={"data": {"status": "completed"}}; other events stay for later."""
        deadline = time.monotonic() + timeout
        while True:
            for i, event in enumerate(self._events):
                if event["event"] == name and _matches(event, match or {}):
                    return self._events.pop(i)
            event = self._read_event(deadline)
            if event is None:
                raise TimeoutError(f"no {name} event within {timeout} s")
            self._events.append(event)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _read_event(self, deadline: float) -> dict | None:
        message = self._read(deadline - time.monotonic())
        if message is not None and "event" not in message:
            raise ConnectionError(f"QMP reply without a command: {message}")
        return message

    def _read(self, timeout: float) -> dict | None:
        """The next message, or None if none is complete within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            remaining = max(0.0, deadline - time.monotonic())
            if not select.select([self._sock], [], [], remaining)[0]:
                return None
            data = self._sock.recv(65536)
            if not data:
                raise ConnectionError(f"QMP server at {self.address} closed the connection")
            self._buffer += data
        line, _, rest = self._buffer.partition(b"\n")
        self._buffer = bytearray(rest)
        return json.loads(line)
