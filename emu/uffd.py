"""userfaultfd(2) on guest RAM: the kernel half of emulator.backend=userfaultfd (issue 15).

Under QEMU the destination's guest RAM is discarded (ram_discard_range) and registered with a
userfaultfd (UFFDIO_API, then UFFDIO_REGISTER in MISSING mode); a vCPU that touches a missing
page sleeps in the kernel, the fault thread reads the fault (poll + read of a struct uffd_msg)
and asks the source for the page, and the page is placed with one UFFDIO_COPY (UFFDIO_ZEROPAGE
for a zero page) that maps it atomically and wakes the vCPU.

This module does the same from Python, with ctypes, fcntl.ioctl and os only:
- probe(): whether this process may use userfaultfd on shared memory, else one line saying why
  and what to change;
- Region: a MAP_SHARED mapping of a shared-memory file (a /dev/shm segment, a memfd, a file on
  hugetlbfs), whose pages are dropped as QEMU discards them (punch a hole, or MADV_REMOVE);
- Userfaultfd: the descriptor, its ioctls and the fault reader;
- touch()/read(), store()/load(): real stores and loads through ctypes, which releases the
  interpreter lock around the call, so a thread that sleeps in the kernel on a missing page does
  not stop the other threads of the process (numpy and memoryview accesses keep the lock).

A MISSING fault on shared memory is raised when the page is not in the file: a page that any
process touched, even by a read, through a mapping that is not registered is in the file for
good, and never faults again until it is dropped.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import mmap
import os
import platform
import secrets
import select
import struct
from typing import NamedTuple

import numpy as np

PAGE = mmap.PAGESIZE

# ---- the kernel's interface (include/uapi/linux/userfaultfd.h) ----

NR_USERFAULTFD = {"x86_64": 323, "aarch64": 282}.get(platform.machine())
UFFD_USER_MODE_ONLY = 1  # handle faults raised in user mode only (any user may, since 5.11)
FLAGS = os.O_CLOEXEC | os.O_NONBLOCK
UFFD_API = 0xAA

UFFD_EVENT_PAGEFAULT = 0x12
UFFD_PAGEFAULT_FLAG_WRITE = 1 << 0
UFFD_FEATURE_MISSING_HUGETLBFS = 1 << 4
UFFD_FEATURE_MISSING_SHMEM = 1 << 5
UFFD_FEATURE_THREAD_ID = 1 << 8  # the faulting thread's id in each message (QEMU's blocktime)
FEATURE_NAMES = {UFFD_FEATURE_MISSING_HUGETLBFS: "UFFD_FEATURE_MISSING_HUGETLBFS",
                 UFFD_FEATURE_MISSING_SHMEM: "UFFD_FEATURE_MISSING_SHMEM",
                 UFFD_FEATURE_THREAD_ID: "UFFD_FEATURE_THREAD_ID"}

UFFDIO_REGISTER_MODE_MISSING = 1 << 0
UFFDIO_COPY_MODE_DONTWAKE = 1 << 0
UFFDIO_ZEROPAGE_MODE_DONTWAKE = 1 << 0
_UFFDIO_REGISTER, _UFFDIO_UNREGISTER, _UFFDIO_WAKE, _UFFDIO_COPY, _UFFDIO_ZEROPAGE = range(5)
_UFFDIO_API = 0x3F

# The structs, all little-endian 64-bit fields (the `=` formats have no padding of their own):
API = struct.Struct("=QQQ")  # uffdio_api: api, features, ioctls
RANGE = struct.Struct("=QQ")  # uffdio_range: start, len
REGISTER = struct.Struct("=QQQQ")  # uffdio_register: range, mode, ioctls (out)
COPY = struct.Struct("=QQQQq")  # uffdio_copy: dst, src, len, mode, copy (out: bytes or -errno)
ZEROPAGE = struct.Struct("=QQQq")  # uffdio_zeropage: range, mode, zeropage (out)
# uffd_msg: event, reserved1, reserved2, reserved3, then the union; for a page fault:
# flags, address, ptid (feat.ptid, with UFFD_FEATURE_THREAD_ID) and 4 bytes of the union's rest
MSG = struct.Struct("=BBHIQQI4x")
assert (API.size, RANGE.size, REGISTER.size, COPY.size, ZEROPAGE.size, MSG.size) == \
    (24, 16, 32, 40, 32, 32)


def _ioc(direction: int, nr: int, size: int, kind: int = 0xAA) -> int:
    """_IOC() of <asm-generic/ioctl.h> (x86_64, aarch64, riscv; not powerpc, mips, sparc):
    direction << 30 | size << 16 | type << 8 | nr, with _IOWR: direction 3 (read | write),
    _IOR: 2, _IO: 0; type UFFDIO = 0xAA; size = sizeof(the struct). For instance
    UFFDIO_COPY = _IOWR(0xAA, 0x03, struct uffdio_copy) = 3 << 30 | 40 << 16 | 0xAA << 8 | 3
    = 0xc028aa03."""
    return direction << 30 | size << 16 | kind << 8 | nr


_IOR, _IOWR = 2, 3
UFFDIO_API = _ioc(_IOWR, _UFFDIO_API, API.size)  # 0xc018aa3f
UFFDIO_REGISTER = _ioc(_IOWR, _UFFDIO_REGISTER, REGISTER.size)  # 0xc020aa00
# UNREGISTER and WAKE are _IOR though the kernel only reads them: the header keeps that slip
UFFDIO_UNREGISTER = _ioc(_IOR, _UFFDIO_UNREGISTER, RANGE.size)  # 0x8010aa01
UFFDIO_WAKE = _ioc(_IOR, _UFFDIO_WAKE, RANGE.size)  # 0x8010aa02
UFFDIO_COPY = _ioc(_IOWR, _UFFDIO_COPY, COPY.size)  # 0xc028aa03
UFFDIO_ZEROPAGE = _ioc(_IOWR, _UFFDIO_ZEROPAGE, ZEROPAGE.size)  # 0xc020aa04
USERFAULTFD_IOC_NEW = _ioc(0, 0x00, 0)  # _IO(0xAA, 0x00) on /dev/userfaultfd: 0xaa00

FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x01, 0x02
MADV_REMOVE = 9
TMPFS_MAGIC, HUGETLBFS_MAGIC = 0x01021994, 0x958458F6
SYSCTL = "/proc/sys/vm/unprivileged_userfaultfd"
DEVICE = "/dev/userfaultfd"
HUGEPAGES = "/sys/kernel/mm/hugepages"

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.fstatfs.argtypes = [ctypes.c_int, ctypes.c_void_p]


class Refused(Exception):
    """userfaultfd cannot be used here; the message is one line: why, and what to change."""


class HugePagesUnavailable(Refused):
    """The huge pages guest RAM needs cannot be reserved."""


def _errno_error(what: str) -> OSError:
    code = ctypes.get_errno()
    return OSError(code, f"{what}: {os.strerror(code)}")


# ---- opening a userfaultfd ----

def _syscall(flags: int) -> int:
    if NR_USERFAULTFD is None:
        raise OSError(errno.ENOSYS, f"no userfaultfd(2) number known for {platform.machine()}")
    fd = _libc.syscall(ctypes.c_long(NR_USERFAULTFD), ctypes.c_int(flags))
    if fd < 0:
        raise _errno_error("userfaultfd(2)")
    return fd


def _device(flags: int) -> int:
    dev = os.open(DEVICE, os.O_RDWR | os.O_CLOEXEC)
    try:
        return fcntl.ioctl(dev, USERFAULTFD_IOC_NEW, flags)
    finally:
        os.close(dev)


def _sysctl() -> str:
    try:
        with open(SYSCTL) as f:
            return f.read().strip()
    except OSError:
        return "unknown"


def open_fd() -> tuple[int, str]:
    """A new userfaultfd (O_CLOEXEC | O_NONBLOCK) and how it was had: the syscall; when that is
    refused (EPERM), /dev/userfaultfd (its file mode decides, as QEMU's uffd_open() prefers);
    then the syscall with UFFD_USER_MODE_ONLY, enough for vCPUs that touch RAM in user mode
    (a system call reading or writing a missing page then fails with EFAULT instead of waiting).
    Raises Refused, saying what to change."""
    try:
        return _syscall(FLAGS), "userfaultfd(2)"
    except OSError as err:
        if err.errno != errno.EPERM:
            raise Refused(_refusal(err)) from err
        tried = [err]
    for how, opener in ((DEVICE, _device),
                        ("userfaultfd(2) user mode only",
                         lambda f: _syscall(f | UFFD_USER_MODE_ONLY))):
        try:
            return opener(FLAGS), how
        except OSError as err:
            tried.append(err)
    raise Refused(_refusal(*tried))


def _refusal(first: OSError, *more: OSError) -> str:
    """One line: QEMU's "Userfaultfd not available: <strerror>", then why and what to do."""
    head = f"Userfaultfd not available: {os.strerror(first.errno)}"
    fallback = "or set emulator.backend=emulated"
    if first.errno == errno.ENOSYS:
        return (f"{head} ({first.strerror.split(': ')[-1]}; the kernel needs "
                f"CONFIG_USERFAULTFD=y); {fallback}")
    if first.errno != errno.EPERM:
        return f"{head} ({first}); {fallback}"
    tried = "; ".join(str(e) for e in more)
    if more and more[-1].errno == errno.EPERM:  # UFFD_USER_MODE_ONLY is open to any user
        return (f"{head} ({tried}): even UFFD_USER_MODE_ONLY, which any user may have, is "
                f"refused, so a seccomp filter (a container's) blocks userfaultfd(2); allow it "
                f"in the profile, {fallback}")
    return (f"{head} (uid {os.geteuid()}, vm.unprivileged_userfaultfd={_sysctl()}; {tried}): "
            f"run as root, or `sysctl -w vm.unprivileged_userfaultfd=1`, or give this user "
            f"read-write access to {DEVICE}; {fallback}")


def _api(fd: int, features: int) -> tuple[int, int]:
    """UFFDIO_API, the handshake (once per descriptor): (features granted, ioctls)."""
    buf = bytearray(API.pack(UFFD_API, features, 0))
    fcntl.ioctl(fd, UFFDIO_API, buf, True)
    _, granted, ioctls = API.unpack(buf)
    return granted, ioctls


def supported_features() -> int:
    """What this kernel offers, asked on a descriptor of its own that requests nothing (a
    feature the kernel lacks fails the whole handshake), as QEMU's receive_ufd_features()."""
    fd, _ = open_fd()
    try:
        return _api(fd, 0)[0]
    except OSError as err:
        raise Refused(f"UFFDIO_API failed: {os.strerror(err.errno)}; "
                      f"set emulator.backend=emulated") from err
    finally:
        os.close(fd)


def _names(bits: int) -> str:
    return " ".join(FEATURE_NAMES.get(1 << i, f"feature bit {i}")
                    for i in range(64) if bits >> i & 1)


# ---- a fault, as the fault thread reads it ----

class Fault(NamedTuple):
    address: int  # the start of the (huge) page; QEMU aligns it to its page size anyway
    write: bool
    ptid: int  # the faulting thread's native id (threading.get_native_id()), 0 if not asked


class Userfaultfd:
    """A userfaultfd, handshaken for the memory it will serve: shared memory needs
    UFFD_FEATURE_MISSING_SHMEM, hugetlbfs UFFD_FEATURE_MISSING_HUGETLBFS; `optional` features are
    asked for when the kernel has them."""

    def __init__(self, features: int = UFFD_FEATURE_MISSING_SHMEM,
                 optional: int = UFFD_FEATURE_THREAD_ID, fd: int | None = None) -> None:
        if fd is None:
            offered = supported_features()
            if features & ~offered:
                raise Refused(f"Missing userfault features: {_names(features & ~offered)} "
                              f"(kernel {platform.release()}); set emulator.backend=emulated")
            fd, self.how = open_fd()
            try:
                self.features, self.ioctls = _api(fd, features | (optional & offered))
            except OSError as err:
                os.close(fd)
                raise Refused(f"UFFDIO_API failed: {os.strerror(err.errno)}") from err
        else:  # one another process opened and handshook, passed here (SCM_RIGHTS)
            self.how, self.features, self.ioctls = "received", 0, 0
        self.fd = fd
        # QEMU's userfault_event_fd: wakes the fault reader so that it can quit
        self._event = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._poll = select.poll()
        self._poll.register(self.fd, select.POLLIN)
        self._poll.register(self._event, select.POLLIN)

    @classmethod
    def adopt(cls, fd: int) -> Userfaultfd:
        """Serve the descriptor of another process (received with multiprocessing.reduction's
        recv_handle or socket.recv_fds): its faults come here, and UFFDIO_COPY maps pages into
        that process's address space, from a buffer of this one."""
        return cls(fd=fd)

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        """The last close unregisters every range and wakes every thread waiting on one (they
        then find the page as the file has it: zeros where nothing was placed)."""
        if self.fd >= 0:
            os.close(self.fd)
            os.close(self._event)
            self.fd = -1

    def __enter__(self) -> Userfaultfd:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- ranges ----

    def register(self, addr: int, length: int) -> int:
        """UFFDIO_REGISTER in MISSING mode; returns the ioctls the range supports (a bit per
        _UFFDIO_*). Shared memory supports UFFDIO_ZEROPAGE, hugetlbfs does not."""
        buf = bytearray(REGISTER.pack(addr, length, UFFDIO_REGISTER_MODE_MISSING, 0))
        try:
            fcntl.ioctl(self.fd, UFFDIO_REGISTER, buf, True)
        except OSError as err:
            raise OSError(err.errno, f"userfault register: {os.strerror(err.errno)}") from err
        ioctls = REGISTER.unpack(buf)[3]
        if not ioctls >> _UFFDIO_COPY & 1:
            self.unregister(addr, length)
            raise Refused("userfault: Region doesn't support COPY")
        return ioctls

    def unregister(self, addr: int, length: int) -> None:
        """UFFDIO_UNREGISTER: the range faults as ordinary memory again (QEMU's cleanup_range()
        at the end of postcopy); threads waiting in it are woken."""
        fcntl.ioctl(self.fd, UFFDIO_UNREGISTER, bytearray(RANGE.pack(addr, length)), True)

    def wake(self, addr: int, length: int) -> None:
        """UFFDIO_WAKE: wake the threads waiting on a range whose pages are present (placed
        without waking, or placed through another process's userfaultfd on the same file)."""
        fcntl.ioctl(self.fd, UFFDIO_WAKE, bytearray(RANGE.pack(addr, length)), True)

    # ---- placing pages ----

    def copy(self, dst: int, src: int, length: int, page: int = 0, wake: bool = True) -> int:
        """UFFDIO_COPY: map `length` bytes at `dst` (in the registered process's address space)
        from `src` (in this process's), atomically, and wake the threads waiting there. Returns
        the bytes placed: a page already present (EEXIST) is left as it is, as already placed,
        and its waiters are woken; EAGAIN (the address space changing) is retried. `page` is
        the host page size, the unit skipped on EEXIST (default: the whole length)."""
        return self._fill(UFFDIO_COPY, dst, length, page or length, wake, src)

    def zeropage(self, dst: int, length: int, page: int = 0, wake: bool = True) -> int:
        """UFFDIO_ZEROPAGE: map zero pages (shared memory and anonymous only; on hugetlbfs
        QEMU copies a zeroed temporary page instead). Returns the bytes placed, as copy()."""
        return self._fill(UFFDIO_ZEROPAGE, dst, length, page or length, wake)

    def _fill(self, request: int, dst: int, length: int, page: int, wake: bool,
              src: int | None = None) -> int:
        placed = done = 0
        while done < length:
            if src is None:
                st = ZEROPAGE
                buf = bytearray(ZEROPAGE.pack(dst + done, length - done,
                                              0 if wake else UFFDIO_ZEROPAGE_MODE_DONTWAKE, 0))
            else:
                st = COPY
                buf = bytearray(COPY.pack(dst + done, src + done, length - done,
                                          0 if wake else UFFDIO_COPY_MODE_DONTWAKE, 0))
            try:
                fcntl.ioctl(self.fd, request, buf, True)
            except OSError as err:
                moved = max(st.unpack(buf)[-1], 0)  # bytes placed before the error
                placed, done = placed + moved, done + moved
                if err.errno == errno.EAGAIN:
                    continue
                if err.errno != errno.EEXIST:
                    raise
                if wake:  # its placer may have been another process's userfaultfd
                    self.wake(dst + done, page)
                done += page
                continue
            return placed + length - done
        return placed

    # ---- the fault thread's side ----

    def faults(self, timeout: float | None = None) -> list[Fault]:
        """The faults pending, waiting up to `timeout` seconds (None: until one comes or
        interrupt()); [] on timeout or interrupt. poll(), read() and ioctl() release the
        interpreter lock, so this blocks nobody else."""
        ready = self._poll.poll(None if timeout is None else max(0, int(timeout * 1000)))
        if any(fd == self._event for fd, _ in ready):
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(self._event)
            return []
        try:
            data = os.read(self.fd, MSG.size * 64)
        except BlockingIOError:
            return []  # the fault was resolved (woken) between poll and read
        found = []
        for off in range(0, len(data) - len(data) % MSG.size, MSG.size):
            event, _, _, _, flags, address, ptid = MSG.unpack_from(data, off)
            if event == UFFD_EVENT_PAGEFAULT:  # no other events are asked for
                found.append(Fault(address, bool(flags & UFFD_PAGEFAULT_FLAG_WRITE), ptid))
        return found

    def interrupt(self) -> None:
        """Make a faults() that waits, in another thread, return at once."""
        os.eventfd_write(self._event, 1)


# ---- real loads and stores, without the interpreter lock ----

# ctypes.memmove is a CFUNCTYPE foreign function: ctypes releases the GIL around the call (only
# PYFUNCTYPE functions, such as ctypes.string_at, keep it). So a load or store that faults on a
# missing page sleeps in the kernel while the other Python threads run.
_memmove = ctypes.memmove


def store(addr: int, data) -> None:
    """Write the bytes-like `data` at `addr` with the GIL released."""
    src = np.frombuffer(data, np.uint8)
    _memmove(addr, src.ctypes.data, src.size)


def load(addr: int, size: int) -> bytes:
    """Read `size` bytes at `addr` with the GIL released."""
    buf = ctypes.create_string_buffer(size)
    _memmove(buf, addr, size)
    return buf.raw


def touch(addr: int, value: int, size: int = 1) -> None:
    """A vCPU's store: `size` bytes (1, 2, 4 or 8) of `value`, little-endian."""
    cell = ctypes.c_uint64(value)
    _memmove(addr, ctypes.addressof(cell), size)


def read(addr: int, size: int = 1) -> int:
    """A vCPU's load: `size` bytes (1, 2, 4 or 8) at `addr`, little-endian."""
    cell = ctypes.c_uint64(0)
    _memmove(ctypes.addressof(cell), addr, size)
    return cell.value


def address(buf) -> int:
    """The address of a bytes-like object's first byte (kept alive by the caller)."""
    return np.frombuffer(buf, np.uint8).ctypes.data if len(buf) else 0


# ---- guest RAM: a shared file mapping ----

def _fs_magic(fd: int) -> int:
    buf = ctypes.create_string_buffer(128)  # struct statfs; f_type is its first word
    if _libc.fstatfs(fd, buf) < 0:
        raise _errno_error("fstatfs")
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF


class Region:
    """A MAP_SHARED mapping of a file on tmpfs (a /dev/shm segment, a memfd) or hugetlbfs, as
    QEMU's memory-backend-file / memfd. `addr` is where it is mapped in this process; a page
    is missing (faults, once registered) until it is in the file."""

    def __init__(self, fd: int, size: int, path: str | None = None, own_path: bool = False,
                 page_size: int = PAGE) -> None:
        self.fd, self.size, self.page_size = fd, size, page_size
        self.path = path
        self._own_path = own_path  # created here: unlink it on close
        magic = _fs_magic(fd)
        if magic not in (TMPFS_MAGIC, HUGETLBFS_MAGIC):
            self._close_fd()
            raise Refused("Host backend files need to be TMPFS or HUGETLBFS only")
        self.huge = magic == HUGETLBFS_MAGIC
        try:
            self.mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as err:
            self._close_fd()
            if self.huge and err.errno == errno.ENOMEM:
                raise HugePagesUnavailable(_no_huge_pages(size, page_size)) from err
            raise
        self.addr = ctypes.addressof(ctypes.c_char.from_buffer(self.mm))

    @classmethod
    def shm(cls, name: str, size: int | None = None) -> Region:
        """A multiprocessing.shared_memory segment by name (shm_open's file in /dev/shm)."""
        path = f"/dev/shm/{name.lstrip('/')}"
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        return cls(fd, size or os.fstat(fd).st_size, path)

    @classmethod
    def memfd(cls, size: int, name: str = "pce-guest-ram") -> Region:
        """An anonymous shared-memory file: nothing to unlink, shared by passing the fd."""
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        return cls(fd, size)

    @classmethod
    def hugetlb(cls, size: int, page_size: int = 2 << 20) -> Region:
        """Guest RAM on huge pages: a hugetlb memfd (memfd_create(MFD_HUGETLB), Linux 4.14:
        no mount, nothing to unlink, shared by its descriptor or its /proc/PID/fd path), or
        where the kernel has no hugetlb memfd, a file on a hugetlbfs mount of that page size
        (attachable by its path, unlinked on close). Raises HugePagesUnavailable when the
        kernel cannot reserve them, or has neither."""
        if size % page_size:
            raise ValueError(f"{size} bytes is not a whole number of {page_size}-byte pages")
        if page_size not in huge_page_sizes():
            raise HugePagesUnavailable(f"no {page_size >> 10} KiB huge pages on this machine "
                                       f"(it has: {huge_page_sizes() or 'none'})")
        fd, path = _hugetlb_file(page_size)
        try:
            os.ftruncate(fd, size)
        except OSError:
            os.close(fd)
            if path:
                os.unlink(path)
            raise
        return cls(fd, size, path, own_path=path is not None, page_size=page_size)

    def register(self, uffd: Userfaultfd, offset: int = 0, length: int | None = None) -> int:
        return uffd.register(self.addr + offset, self.size - offset if length is None else length)

    def discard(self, offset: int = 0, length: int | None = None) -> None:
        """Drop pages from the file, as QEMU's ram_block_discard_range() does for a file-backed
        block: fallocate(PUNCH_HOLE | KEEP_SIZE), which also unmaps them from every process."""
        length = self.size - offset if length is None else length
        if _libc.fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                           offset, length) < 0:
            raise _errno_error("fallocate(PUNCH_HOLE)")

    def remove(self, offset: int = 0, length: int | None = None) -> None:
        """The same through the mapping: madvise(MADV_REMOVE)."""
        self.mm.madvise(MADV_REMOVE, offset, self.size - offset if length is None else length)

    def close(self) -> None:
        """Unmap, close, and unlink the file if this Region created it."""
        if self.fd < 0:
            return
        self.mm.close()
        self._close_fd()

    def _close_fd(self) -> None:
        os.close(self.fd)
        self.fd = -1
        if self._own_path and self.path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    def __enter__(self) -> Region:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---- huge pages ----

def huge_page_sizes() -> list[int]:
    try:
        return sorted(int(d.split("-")[1][:-2]) << 10 for d in os.listdir(HUGEPAGES))
    except OSError:
        return []


def _default_huge_page() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Hugepagesize:"):
                return int(line.split()[1]) << 10
    return 0


def hugetlbfs_mount(page_size: int) -> str | None:
    """A hugetlbfs mount point of that page size (its pagesize= option, else the default)."""
    with open("/proc/mounts") as f:
        for line in f:
            _, where, kind, options = line.split()[:4]
            if kind != "hugetlbfs":
                continue
            size = _default_huge_page()
            for opt in options.split(","):
                if opt.startswith("pagesize="):
                    size = _parse_size(opt.split("=")[1])
            if size == page_size and os.access(where, os.W_OK):
                return where.replace("\\040", " ")
    return None


def _hugetlb_file(page_size: int) -> tuple[int, str | None]:
    """(descriptor, path or None) of a new, empty file on huge pages of that size."""
    shift = page_size.bit_length() - 1
    try:
        return os.memfd_create("pce-guest-ram", os.MFD_CLOEXEC | os.MFD_HUGETLB
                               | shift << os.MFD_HUGE_SHIFT), None
    except OSError as err:
        if err.errno != errno.EINVAL:  # EINVAL: a kernel before 4.14, no hugetlb memfd
            raise
    mount = hugetlbfs_mount(page_size)
    if mount is None:
        raise HugePagesUnavailable(
            f"this kernel has no hugetlb memfd (MFD_HUGETLB, Linux 4.14) and no writable "
            f"hugetlbfs is mounted for {page_size >> 10} KiB pages: as root, `mkdir -p "
            f"/dev/hugepages && mount -t hugetlbfs -o pagesize={page_size >> 10}K none "
            f"/dev/hugepages`")
    path = os.path.join(mount, f"pce_{os.getpid()}_{secrets.token_hex(4)}")
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600), path


def _parse_size(text: str) -> int:
    units = {"K": 10, "M": 20, "G": 30}
    return int(text[:-1]) << units[text[-1].upper()] if text[-1].upper() in units else int(text)


def _huge_counter(page_size: int, name: str) -> str:
    return f"{HUGEPAGES}/hugepages-{page_size >> 10}kB/{name}"


def huge_pages_free(page_size: int) -> int:
    """Huge pages of that size free and not reserved for a mapping already (free_hugepages
    less resv_hugepages: HugePages_Free less HugePages_Rsvd of /proc/meminfo for the default
    size); 0 where the machine has no such pages."""
    def get(name: str) -> int:
        with open(_huge_counter(page_size, name)) as f:
            return int(f.read())
    try:
        return get("free_hugepages") - get("resv_hugepages")
    except FileNotFoundError:
        return 0


def _nr_counter(page_size: int) -> str:
    """The file whose number is the pool of huge pages of that size."""
    if page_size == _default_huge_page():
        return "/proc/sys/vm/nr_hugepages"
    return _huge_counter(page_size, "nr_hugepages")


def check_huge_pages(size: int, page_size: int) -> None:
    """HugePagesUnavailable, one line saying how many are needed and how to reserve them, if
    `size` bytes of guest RAM on huge pages of `page_size` do not find that many free. Never
    changes the pool: that is the machine's owner's choice."""
    if page_size not in huge_page_sizes():
        raise HugePagesUnavailable(f"no {page_size >> 10} KiB huge pages on this machine "
                                   f"(it has: {huge_page_sizes() or 'none'}); set "
                                   f"guest.page-size=4KiB or emulator.backend=emulated")
    need, free = size // page_size, huge_pages_free(page_size)
    if free < need:
        raise HugePagesUnavailable(_no_huge_pages(size, page_size, free))


def _no_huge_pages(size: int, page_size: int, free: int | None = None) -> str:
    need = size // page_size
    free = huge_pages_free(page_size) if free is None else free
    counter = _nr_counter(page_size)
    try:
        with open(counter) as f:
            total = int(f.read())
    except OSError:
        total = 0
    return (f"guest RAM of {size >> 20} MiB on {page_size >> 10} KiB huge pages needs "
            f"{need} free, {free} are (of {total} reserved): as root, reserve them with "
            f"`echo {total + need - free} > {counter}`, or set guest.page-size=4KiB or "
            f"emulator.backend=emulated")


@contextlib.contextmanager
def reserved_huge_pages(count: int, page_size: int = 2 << 20):
    """Make at least `count` huge pages of that size free (root only), and put nr_hugepages
    back as it was afterwards. Raises HugePagesUnavailable if the kernel cannot find them
    (memory fragmented). Holds a lock on the counter meanwhile, so that two test runs on one
    machine do not put back each other's numbers."""
    counter = _huge_counter(page_size, "nr_hugepages")
    with open(counter) as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        before = int(lock.read())
        free = huge_pages_free(page_size)
        raised = False
        try:
            if free < count:
                with open(counter, "w") as f:  # PermissionError unless root
                    f.write(str(before + count - free))
                raised = True
                if huge_pages_free(page_size) < count:
                    raise HugePagesUnavailable(
                        f"asked the kernel for {count - free} more huge pages of "
                        f"{page_size >> 10} KiB, it found {huge_pages_free(page_size) - free} "
                        f"(memory fragmented)")
            yield
        finally:
            if raised:
                with open(counter, "w") as f:
                    f.write(str(before))


# ---- the probe ----

def probe(huge_page: int = 0) -> str | None:
    """None if this process can serve faults on shared memory with userfaultfd (on hugetlbfs
    pages of `huge_page` bytes if given), else one line saying why and what to change. Like
    QEMU's postcopy_ram_supported_by_host(): open, handshake, and register a test area, here a
    shared one (a memfd, or hugetlb memfd), checking the ioctls QEMU needs; then place a page
    in it with UFFDIO_COPY, with no fault (nothing to wait for)."""
    feature = UFFD_FEATURE_MISSING_HUGETLBFS if huge_page else UFFD_FEATURE_MISSING_SHMEM
    try:
        with contextlib.ExitStack() as stack:
            uffd = stack.enter_context(Userfaultfd(feature))
            if huge_page:
                region = stack.enter_context(Region.hugetlb(huge_page, huge_page))
            else:
                region = stack.enter_context(Region.memfd(PAGE, "pce-probe"))
            _try_area(uffd, region)
    except Refused as why:
        return str(why)
    except OSError as err:
        return f"Userfaultfd not usable on shared memory: {err}; set emulator.backend=emulated"
    return None


def _try_area(uffd: Userfaultfd, region: Region) -> None:
    ioctls = region.register(uffd)
    wanted = 1 << _UFFDIO_WAKE | 1 << _UFFDIO_COPY
    if not region.huge:
        wanted |= 1 << _UFFDIO_ZEROPAGE
    if ioctls & wanted != wanted:
        raise Refused(f"Missing userfault map features: {~ioctls & wanted:#x}")
    page = mmap.mmap(-1, region.page_size)
    try:
        # every byte written, so that the source is in memory: UFFDIO_COPY reads it with page
        # faults off, and copies a source not yet there through a second huge page from the
        # pool, which the probe must not need (one free 1 GiB page is enough for a guest)
        ctypes.memset(address(page), 0, region.page_size)
        page[:8] = b"pce-ufd!"
        if uffd.copy(region.addr, address(page), region.page_size) != region.page_size:
            raise Refused("UFFDIO_COPY placed nothing on an empty page")
        if load(region.addr, 8) != b"pce-ufd!":
            raise Refused("UFFDIO_COPY placed a page that reads back wrong")
    finally:
        page.close()
    uffd.unregister(region.addr, region.size)
