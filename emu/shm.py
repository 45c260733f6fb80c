"""Shared-memory segments of one run: created by the controller only, and unlinked by it (or,
if it is killed, by one of its children, the janitor).

Children attach without registering the segment with the resource tracker: on Python < 3.13 an
attaching process registers it, and the tracker then unlinks it when that process exits, pulling
the guest's RAM from under everybody else. The controller unregisters its own once its children
hold the names (Segments.untrack): the program cleans up itself, and if it is killed its
janitor child unlinks the segments (process.child_main), so the tracker has nothing left to do,
and nothing to warn about after the prompt.

Every page a run writes is allocated when its segment is made (posix_fallocate): a /dev/shm
too small for the run fails there with a message, never later with SIGBUS on the first write.

A destination's guest RAM on huge pages (emulator.backend=userfaultfd with guest.page-size
2MiB or 1GiB) is no /dev/shm segment but a hugetlb memfd (HugeSegment): it is in no file
system, so there is nothing to unlink, and it goes when the last descriptor and mapping of
it do; children open it by its name, /proc/PID/fd/N of the program that made it (which must
be alive then, as a /dev/shm segment must be there). Its pages are reserved when it is
mapped, so no write finds the pool empty.
"""

from __future__ import annotations

import _posixshmem
import contextlib
import ctypes
import os
import secrets
import signal
import sys
from collections.abc import Iterable
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory

from emu import signals
from emu.config import ConfigError

PREFIX = "pce"  # visible in /dev/shm, so leaks are easy to spot
MADV_POPULATE_WRITE = 23  # Linux 5.14; the mmap module does not name it on Python 3.11
SHM_DIR = "/dev/shm"  # where Linux keeps POSIX shared memory
PAGE = 4096  # tmpfs allocates whole pages, even for a 32-byte segment

# The segments of a run by the names its children find them under; emu/engines.py lays them
# out (which program has which, of what size).
CLOCK = "clock"  # the emulated clock every process of a program reads
SRC_RAM, SRC_STATES = "src-ram", "src-states"  # the source's guest RAM, its page states
SRC_BOARD, SRC_QUEUE = "src-board", "src-queue"  # its counters, its page-request queue
DST_RAM, DST_STATES = "dst-ram", "dst-states"  # the destination's guest RAM, its page states
DST_ARRIVAL, DST_BOARD = "dst-arrival", "dst-board"  # when each page arrived, its counters
FAULTS = "faults"  # the destination's ring of resolved page faults
RELAY_BOARD = "relay-board"  # the network process's counters


class NoRoom(ConfigError):
    """The run's shared memory does not fit in this machine: one line, like a bad setting."""


def create(size: int) -> SharedMemory:
    _start_tracker()
    name = f"{PREFIX}_{os.getpid()}_{secrets.token_hex(4)}"
    return SharedMemory(name, create=True, size=max(size, 1))


def _start_tracker() -> None:
    """Start the resource tracker with SIGHUP blocked, which it inherits: it shares our process
    group and ignores only SIGINT and SIGTERM, so closing the terminal would kill it, and our
    next word to it would start another with a warning."""
    with signals.blocked(signal.SIGHUP):
        resource_tracker.ensure_running()


def unlink(name: str) -> None:
    """Remove a segment by its exact name (without a word to the resource tracker); a
    HugeSegment's memfd is in no file system (its /proc path goes with its maker), the
    file it has on a hugetlbfs mount where the kernel has no hugetlb memfd is removed."""
    if HugeSegment.named(name):
        if not name.startswith("/proc/"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)
        return
    try:
        _posixshmem.shm_unlink("/" + name)
    except FileNotFoundError:
        pass


def unlink_all(names: dict[str, str]) -> None:
    for name in names.values():
        unlink(name)


def allocate(shm: SharedMemory, role: str) -> None:
    """Allocate every page of a new segment now, or fail with a message: tmpfs hands out
    pages on first write, and a write it has no page for is SIGBUS."""
    try:
        os.posix_fallocate(shm._fd, 0, shm.size)
    except OSError as err:
        reason = err.strerror or os.strerror(err.errno)
        raise NoRoom(f"guest.ram: can not allocate the {approx(shm.size)} of {role} in "
                     f"{SHM_DIR} ({reason}; {approx(room()[0])} free)") from None


def room() -> tuple[int, int]:
    """(bytes free in /dev/shm, bytes of memory available), what a run can still allocate."""
    try:
        st = os.statvfs(SHM_DIR)
        free = st.f_bavail * st.f_frsize
    except OSError:
        free = sys.maxsize
    available = sys.maxsize
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return free, available


def check_room(sizes: Iterable[int], what: str) -> None:
    """Stop before anything exists if the segments of these sizes (the ones whose pages will
    be written; `what` says what they hold) do not fit: filling /dev/shm takes the machine's
    memory, and then the OOM killer takes the emulator and the user's other programs."""
    needed = sum(-(-size // PAGE) * PAGE for size in sizes)
    free, available = room()
    if needed > min(free, available):
        raise NoRoom(f"guest.ram: {what} need {approx(needed)} of shared memory, but "
                     f"{SHM_DIR} has {approx(free)} free and {approx(available)} of memory "
                     f"is available")


def approx(n: int) -> str:
    """A size rounded for people: "1.5 GiB", "12 MiB"."""
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} B"


def map_in(buf: memoryview) -> None:
    """Map a segment's pages into this process now: page tables are per process, so without
    this the first write here to each 4 KiB page takes a fault, in the middle of a migration.
    Kernels before 5.14 refuse the advice, and the pages map in as they are first written."""
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    ctypes.CDLL(None).madvise(ctypes.c_void_p(addr), ctypes.c_size_t(len(buf)),
                              MADV_POPULATE_WRITE)


def attach(name: str) -> SharedMemory | HugeSegment:
    if HugeSegment.named(name):
        return HugeSegment.attach(name)
    if sys.version_info >= (3, 13):
        return SharedMemory(name, track=False)
    register = resource_tracker.register
    resource_tracker.register = lambda *args: None
    try:
        return SharedMemory(name)
    finally:
        resource_tracker.register = register


class HugeSegment:
    """Guest RAM on huge pages: a hugetlb memfd, mapped shared (what SharedMemory offers the
    engines: name, size, buf, close)."""

    def __init__(self, region, name: str = "") -> None:
        self._region = region  # emu.uffd.Region: the descriptor and the mapping
        # the path others open it by: a memfd's in /proc, or its file on a hugetlbfs mount
        self.name = name or region.path or f"/proc/{os.getpid()}/fd/{region.fd}"
        self.size = region.size
        self.buf = memoryview(region.mm)

    @staticmethod
    def named(name: str) -> bool:
        """Whether a segment's name is a HugeSegment's (a path; shm_open names have none)."""
        return name.startswith("/")

    @classmethod
    def create(cls, size: int, page_size: int) -> HugeSegment:
        """NoRoom (a ConfigError: one line) if the kernel cannot reserve the pages."""
        from emu import uffd

        try:
            return cls(uffd.Region.hugetlb(size, page_size))
        except uffd.HugePagesUnavailable as err:  # taken since engines.check_backend counted
            raise NoRoom(f"emulator.backend=userfaultfd: {err}") from None

    @classmethod
    def attach(cls, name: str) -> HugeSegment:
        """Open another process's by its /proc path: a new descriptor of the same file."""
        from emu import uffd

        fd = os.open(name, os.O_RDWR | os.O_CLOEXEC)  # FileNotFoundError: its maker is gone
        return cls(uffd.Region(fd, os.fstat(fd).st_size, page_size=_huge_page_of(fd)), name)

    def close(self) -> None:
        """Close the descriptor now, and the mapping once no view points into it any more
        (the huge pages go back to the pool with the last mapping)."""
        region = self._region
        if region.fd < 0:
            return
        os.close(region.fd)
        region.fd = -1
        try:
            self.buf.release()
            region.mm.close()
        except BufferError:  # a numpy view still points into it: unmapped when it goes
            pass


def _huge_page_of(fd: int) -> int:
    return os.fstatvfs(fd).f_bsize  # hugetlbfs reports its page size as the block size


class Segments:
    """The controller's segments by role; names go to the children, who attach()."""

    def __init__(self) -> None:
        self._shm: dict[str, SharedMemory | HugeSegment] = {}
        self._tracked: set[str] = set()  # the roles the resource tracker would unlink

    def create(self, role: str, size: int, allocate_now: bool = True,
               huge_page: int = 0) -> memoryview:
        """A new segment, its pages allocated now unless allocate_now=False (a guest RAM
        that is never written: emulator.payload=false), so that the first write to each
        page neither pays for it during the migration nor finds /dev/shm full. huge_page:
        a HugeSegment of pages of that size instead (reserved, not allocated)."""
        if huge_page:
            self._shm[role] = HugeSegment.create(size, huge_page)
            return self._shm[role].buf
        with signals.held():  # between shm_open and here, nobody would unlink it
            shm = self._shm[role] = create(size)
            self._tracked.add(role)
        if allocate_now:
            allocate(shm, role)
        return shm.buf

    def names(self) -> dict[str, str]:
        return {role: shm.name for role, shm in self._shm.items()}

    def buf(self, role: str) -> memoryview:
        return self._shm[role].buf

    def untrack(self) -> None:
        """Take the segments off the resource tracker: once children hold the names (they
        unlink them if we are killed), and before we unlink them ourselves. The tracker
        would otherwise unlink them too, after the prompt, with a warning of a leak."""
        for role in self._tracked:
            resource_tracker.unregister(self._shm[role]._name, "shared_memory")
        self._tracked.clear()

    def track(self) -> None:
        """No child holds the names any more: the tracker is the one left to unlink them if
        we are killed."""
        for role in self._shm.keys() - self._tracked:
            if isinstance(self._shm[role], SharedMemory):  # a HugeSegment is not its business
                resource_tracker.register(self._shm[role]._name, "shared_memory")
                self._tracked.add(role)

    def close(self) -> None:
        """Unlink everything; safe to call twice and with views still alive elsewhere."""
        with signals.held():
            self.untrack()
            for shm in self._shm.values():
                unlink(shm.name)
                try:
                    shm.close()
                except BufferError:
                    # a numpy view still points into it: the mapping goes when the last view
                    # does
                    shm.close = lambda: None
            self._shm.clear()


def attach_all(names: dict[str, str]) -> dict[str, SharedMemory | HugeSegment]:
    return {role: attach(name) for role, name in names.items()}
