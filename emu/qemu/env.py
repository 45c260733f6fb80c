"""Whether real QEMU can run the bench's migration here, and why not."""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import platform
import re
import shutil
import subprocess

from emu.qemu import guest, hugepages

QEMU = "qemu-system-x86_64"
INSTALL = "apt-get install qemu-system-x86"
MIN_VERSION = (7, 1)  # postcopy-preempt (and x-postcopy-preempt-break-huge until 8.0)
# What a TCG QEMU needs besides guest RAM (code buffer, devices, the trace log), and the
# pmemsave image of the region that the check writes.
OVERHEAD = 256 << 20
_SYS_USERFAULTFD = {"x86_64": 323, "aarch64": 282, "ppc64le": 364, "s390x": 355}
_REQUIRED_EVENTS = ("postcopy_ram_fault_thread_request", "postcopy_page_req_del",
                    "migrate_handle_rp_req_pages")


@functools.cache
def qemu_version() -> tuple[int, int, int] | None:
    """The installed qemu-system-x86_64's version, or None if there is none."""
    if shutil.which(QEMU) is None:
        return None
    done = subprocess.run([QEMU, "--version"], capture_output=True, text=True)
    m = re.search(r"version (\d+)\.(\d+)\.(\d+)", done.stdout)
    return tuple(int(g) for g in m.groups()) if m else None


def available() -> str | None:
    """Why the bench cannot run a migration on real QEMU here, in one line; None if it can."""
    version = qemu_version()
    if version is None:
        return f"{QEMU} not found (install it: {INSTALL})"
    if version[:2] < MIN_VERSION:
        return (f"{QEMU} {'.'.join(map(str, version))} has no postcopy-preempt "
                f"(needs {'.'.join(map(str, MIN_VERSION))} or later)")
    if not guest.cached_image().exists() and (why := guest.missing_tools()) is not None:
        return why
    if (why := _userfaultfd()) is not None:
        return why
    if (why := _trace_events()) is not None:
        return why
    return None


def _userfaultfd() -> str | None:
    """QEMU's destination opens userfaultfd(2); unprivileged users may not (sysctl
    vm.unprivileged_userfaultfd=0, the default), root and CAP_SYS_PTRACE may."""
    number = _SYS_USERFAULTFD.get(platform.machine())
    if number is None:
        return None  # unknown syscall number here: let QEMU find out
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.syscall(number, os.O_CLOEXEC | os.O_NONBLOCK)
    if fd >= 0:
        os.close(fd)
        return None
    err = ctypes.get_errno()
    if err == errno.ENOSYS:
        return "this kernel has no userfaultfd (CONFIG_USERFAULTFD), which postcopy needs"
    return (f"userfaultfd not allowed ({os.strerror(err)}): run as root or set "
            "sysctl vm.unprivileged_userfaultfd=1")


@functools.cache
def _trace_events() -> str | None:
    done = subprocess.run([QEMU, "-trace", "help"], capture_output=True, text=True)
    listed = set(done.stdout.split())
    missing = [e for e in _REQUIRED_EVENTS if e not in listed]
    if missing:
        return (f"{QEMU} lists no trace event {missing[0]} (built without the log trace "
                "backend?)")
    return None


def memory_shortfall(ram: int, hugetlbfs: str | None = None) -> str | None:
    """Why two QEMUs with `ram` bytes of guest RAM each do not fit now, or None."""
    info = _meminfo()
    if hugetlbfs is not None:
        size = os.statvfs(hugetlbfs).f_bsize  # the mount's own page size
        need = 2 * -(-ram // size)
        free = hugepages.available(size)  # free and not promised to a mapping already
        if free < need:
            return (f"{free} free {size >> 20} MiB huge pages, two guests of {ram >> 20} MiB "
                    f"need {need}")
        return _fits(2 * OVERHEAD, info)
    return _fits(2 * (ram + OVERHEAD), info)


def _fits(need: int, info: dict[str, int]) -> str | None:
    available_kib = info.get("MemAvailable")
    if available_kib is None or available_kib * 1024 >= need:
        return None
    return (f"{available_kib >> 10} MiB of memory available, two QEMUs need about "
            f"{need >> 20} MiB")


def _meminfo() -> dict[str, int]:
    info: dict[str, int] = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                name, _, rest = line.partition(":")
                fields = rest.split()
                if fields and fields[0].isdigit():
                    info[name] = int(fields[0])
    except OSError:
        pass
    return info
