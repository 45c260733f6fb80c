"""Migration and monitor addresses as QEMU writes them, and the sockets on them.

The one address parser of the project: the migration channels, migrate-incoming,
migrate-recover, the link and every QMP monitor go through it. An address is unix:PATH or
tcp:HOST:PORT, HOST a name, an IPv4 address or an IPv6 address in brackets (tcp:[::1]:4444);
an empty HOST is 127.0.0.1.

A unix listener replaces nothing at its path but a stale socket this process bound itself (a
recovery listening again where migrate-incoming did): a file that is not a socket, the socket
of a program that listens on it, and a stale socket someone else left there are left alone and
the listen fails with one line saying so. QEMU unlinks whatever socket is at the path; we
delete only what we created, by the exact path, so a socket a killed program left is the
user's to remove. The socket file it binds is removed only while its path still names the
file bound (st_dev and st_ino as right after bind, the inode held meanwhile so that its number
cannot go to a new file: Pin), never by its name alone.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import stat
import weakref
from typing import NamedTuple

KERNEL_BUFFER = 4 << 20
UNIX_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) is 108, less the terminating NUL
SHOWN = 200  # characters of an address an error message echoes
EXPECTED = "expected unix:PATH or tcp:HOST:PORT"


class UnknownProtocol(ValueError):
    """Not unix:PATH or tcp:HOST:PORT at all (other ValueErrors of parse() are about the path
    or the host of an address that has the right form)."""


class Address(NamedTuple):
    family: int  # AF_UNIX, AF_INET or AF_INET6
    path: str = ""  # unix
    host: str = ""  # tcp
    port: int = 0

    @property
    def sockaddr(self) -> str | tuple[str, int]:
        return self.path if self.family == socket.AF_UNIX else (self.host, self.port)

    def socket_address(self) -> dict:
        """As QEMU's SocketAddress (query-migrate's socket-address): the port is a string."""
        if self.family == socket.AF_UNIX:
            return {"type": "unix", "path": self.path}
        return {"type": "inet", "host": self.host, "port": str(self.port)}


def parse(uri: str) -> Address:
    """The Address of a QEMU-style URI; ValueError (UnknownProtocol for the wrong form) that
    says what is wrong."""
    if "\0" in uri:
        raise ValueError(f"address {_shown(uri)} contains a NUL byte")
    kind, _, rest = uri.partition(":")
    if kind == "unix" and rest:
        return Address(socket.AF_UNIX, path=_unix_path(rest))
    if kind == "tcp":
        host, sep, port = rest.rpartition(":")
        if sep and port.isdigit() and int(port) <= 0xFFFF:
            host = host.removeprefix("[").removesuffix("]") or "127.0.0.1"
            return Address(_family(host, int(port)), host=host, port=int(port))
    raise UnknownProtocol(f"address {_shown(uri)}: {EXPECTED} (IPv6: tcp:[::1]:PORT)")


def _unix_path(path: str) -> str:
    try:
        size = len(os.fsencode(path))
    except UnicodeEncodeError:
        raise ValueError(f"UNIX socket path {_shown(path)} cannot be encoded") from None
    if size > UNIX_PATH_MAX:
        # QEMU's words, with its hint
        raise ValueError(f"UNIX socket path '{_shown(path)}' is too long: {size} bytes, "
                         f"a unix socket address holds at most {UNIX_PATH_MAX}")
    return path


def _family(host: str, port: int) -> int:
    try:
        return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        pass  # a name
    try:
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except (OSError, UnicodeError) as err:
        raise ValueError(f"address resolution failed for {_shown(host)}:{port}: "
                         f"{getattr(err, 'strerror', None) or err}") from None


def _shown(text: str) -> str:
    return repr(text if len(text) <= SHOWN else text[:SHOWN] + "...")[1:-1]


# --- listening ---------------------------------------------------------------------------------

class SocketFile(NamedTuple):
    """The file a unix listener was bound to, as it was right after bind (for the program
    that removes it: Pin(file))."""
    path: str
    dev: int
    ino: int


class Pin:
    """A hold on the inode of a socket file we bound: while it is held, the file system cannot
    give that inode's number to a new file, so remove() tells our file from one put in its
    place since (another program's socket, a user's file) and unlinks ours only."""

    def __init__(self, file: SocketFile) -> None:
        self.file = file
        self._fd: int | None = None
        try:
            fd = os.open(file.path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return  # gone already: nothing of ours to remove
        if _identity(os.fstat(fd)) == (file.dev, file.ino):
            self._fd = fd
            _pins.add(self)
        else:
            os.close(fd)  # not the file that was bound: never ours to remove

    def remove(self) -> None:
        """Unlink the file if its path still names the inode we hold; then let go."""
        if self._fd is None:
            return
        try:
            now = os.lstat(self.file.path)
            if stat.S_ISSOCK(now.st_mode) and _identity(now) == _identity(os.fstat(self._fd)):
                os.unlink(self.file.path)
        except OSError:
            pass  # gone already, or its directory with it
        finally:
            self.release()

    def release(self) -> None:
        """Let go without removing anything."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    __del__ = release


def _identity(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


# the socket file each unix listener of this process bound (a socket cannot carry it itself)
_bound: weakref.WeakKeyDictionary[socket.socket, Pin] = weakref.WeakKeyDictionary()
# every socket file of this process's still held: a stale one among them may be replaced
_pins: weakref.WeakSet[Pin] = weakref.WeakSet()


def listen(uri: str, backlog: int | None = 8) -> socket.socket:
    """A listening socket on `uri` (backlog None: the system's default); OSError (or
    ValueError for the address) that names the path or the address when it cannot be."""
    address = parse(uri)
    if address.family != socket.AF_UNIX:
        return socket.create_server(address.sockaddr, family=address.family, backlog=backlog)
    path = address.path
    if _stale(path):
        _remove_own(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
    except OSError as err:
        sock.close()
        raise type(err)(f"Failed to bind socket to {path}: {err.strerror or err}") from None
    _bound[sock] = pin = Pin(SocketFile(path, *_identity(os.lstat(path))))
    try:
        sock.listen(*(() if backlog is None else (backlog,)))
    except OSError:
        pin.remove()
        sock.close()
        raise
    return sock


def bound_file(sock: socket.socket) -> Pin | None:
    """The socket file a unix listener of listen() bound; None for any other socket."""
    return _bound.get(sock)


def check_listen(uri: str) -> None:
    """Raise what listen(uri) would, keeping nothing: for the addresses on a command line,
    tried before a child process listens on them."""
    with listen(uri) as sock:
        if pin := bound_file(sock):
            pin.remove()


def _remove_own(path: str) -> None:
    """A stale socket at `path`: removed if this process bound it (by its Pin, which checks
    the inode), else FileExistsError: not ours to delete."""
    for pin in list(_pins):
        if pin.file.path == path:
            pin.remove()
    if os.path.lexists(path):
        raise FileExistsError(f"{path} is a socket nobody listens on, left by another program: "
                              f"not removing it (rm {path} if it is yours)")


def _stale(path: str) -> bool:
    """Whether `path` is a socket nobody listens on (False: nothing there); raises if it is
    anything that must not be replaced."""
    try:
        mode = os.lstat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return False  # bind() says what is wrong with the directory
    if not stat.S_ISSOCK(mode):
        raise FileExistsError(f"{path} exists and is not a socket: not replacing it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)  # a listener with a full backlog must not hold us up
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        return True
    except BlockingIOError:
        pass  # someone listens, with its backlog full
    except OSError as err:
        raise type(err)(f"Failed to bind socket to {path}: {err.strerror or err}") from None
    finally:
        probe.close()
    raise OSError(f"Failed to bind socket to {path}: Address already in use "
                  "(another program listens on it)")


# --- connecting --------------------------------------------------------------------------------

def dial(uri: str, timeout: float = 5.0) -> socket.socket:
    """A socket connected to `uri`, with `timeout` left set on it."""
    address = parse(uri)
    sock = socket.socket(address.family, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(address.sockaddr)
    except OSError:
        sock.close()
        raise
    return sock


def connect(uri: str, timeout: float = 5.0) -> socket.socket:
    """A blocking socket connected to `uri`, tuned for a migration channel."""
    sock = dial(uri, timeout)
    sock.settimeout(None)
    return tune(sock)


def tune(sock: socket.socket) -> socket.socket:
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        sock.setsockopt(socket.SOL_SOCKET, opt, KERNEL_BUFFER)
    no_delay(sock)
    return sock


def no_delay(sock: socket.socket) -> None:
    """Small writes in a row must not wait for the peer's delayed ACK (Nagle's algorithm)."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def bound(sock: socket.socket) -> str:
    """The URI a listening socket can be reached at (tcp port 0 gets its real port here)."""
    if sock.family == socket.AF_UNIX:
        return f"unix:{sock.getsockname()}"
    host, port = sock.getsockname()[:2]
    return f"tcp:[{host}]:{port}" if sock.family == socket.AF_INET6 else f"tcp:{host}:{port}"
