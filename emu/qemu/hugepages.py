"""A hugetlbfs mount with enough free 2 MiB pages for a run, undone afterwards.

    with hugetlbfs(2 * (256 << 20)) as mount:
        run(Scenario(hugetlbfs=mount, ...))

The mount is a hugetlbfs of that page size already mounted and writable (/dev/hugepages on
most distributions), or else a private one on a fresh mkdtemp directory, unmounted and
removed by its path afterwards. The pool is raised BY the pages the run lacks, and lowered BY
the pages the kernel gave, never set to a remembered size: another process on the machine
(the emulator's userfaultfd backend, a second bench) may reserve pages meanwhile, and its
pages stay its own. Both undo steps run on every way out, a Ctrl-C or SIGTERM included
(emu.signals: a stop signal raises Stopped, and a second one waits until the undo is done).
Changing the pool and mounting need root; an existing mount with enough free pages does not.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

from emu import signals

SIZE = 2 << 20  # the bench's huge page: x86's 2 MiB
POOLS = "/sys/kernel/mm/hugepages"  # one directory per huge page size, each its own pool
MOUNTS = "/proc/mounts"


class HugepagesError(RuntimeError):
    """The machine cannot give the run its huge pages; the message says why, in one line."""


def pool(size: int = SIZE) -> str:
    """The sysfs directory of the pool of `size` huge pages (nr_hugepages, free_hugepages,
    resv_hugepages)."""
    return f"{POOLS}/hugepages-{size >> 10}kB"


def _read(path: str) -> int:
    with open(path) as f:
        return int(f.read())


def _write(path: str, value: int) -> None:
    with open(path, "w") as f:  # PermissionError unless root
        f.write(f"{value}\n")


def available(size: int = SIZE) -> int:
    """Pages of the pool free and not yet promised to a mapping: a hugetlbfs mapping reserves
    its pages at mmap (HugePages_Rsvd) and takes them from the free count only as it faults."""
    return _read(f"{pool(size)}/free_hugepages") - _read(f"{pool(size)}/resv_hugepages")


def _check_size(size: int) -> None:
    if not os.path.isdir(pool(size)):
        raise HugepagesError(f"this kernel has no {size >> 20} MiB huge pages "
                             f"(no {pool(size)})")


@contextmanager
def reserved(pages: int, size: int = SIZE) -> Iterator[int]:
    """At least `pages` pages of the pool free for the block; yields how many it added to the
    pool (0 if enough were free) and takes exactly that many away again afterwards."""
    _check_size(size)
    counter = f"{pool(size)}/nr_hugepages"
    short = pages - available(size)
    if short <= 0:
        yield 0
        return
    if os.geteuid() != 0:
        raise HugepagesError(f"{available(size)} free {size >> 20} MiB huge pages, the run "
                             f"needs {pages}; raising {counter} needs root")
    added = 0
    try:
        with signals.held():  # what was written is known before a signal can end the run
            before = _read(counter)
            _write(counter, before + short)
            # what the kernel found, at most what was asked (a concurrent change is not ours)
            added = max(0, min(short, _read(counter) - before))
        if available(size) < pages:
            raise HugepagesError(f"asked the kernel for {short} more {size >> 20} MiB huge "
                                 f"pages, it found {added}; the run needs {pages} free (memory "
                                 "too fragmented or too small, or another process took them)")
        yield added
    finally:
        if added:
            with signals.held():
                _write(counter, max(0, _read(counter) - added))


def existing_mount(size: int = SIZE) -> str | None:
    """A writable hugetlbfs mount point of that page size (its pagesize= option, else the
    kernel's default huge page size), or None. Not one in the temporary directory: that is
    another program's private mount (another bench's, the emulator's), gone when it ends."""
    with open(MOUNTS) as f:
        for line in f:
            _, where, kind, options = line.split()[:4]
            where = where.replace("\\040", " ")
            if (kind == "hugetlbfs" and _mount_size(options) == size
                    and not _temporary(where) and os.access(where, os.W_OK)):
                return where
    return None


def _temporary(path: str) -> bool:
    tmp = os.path.realpath(tempfile.gettempdir())
    return os.path.commonpath([os.path.realpath(path), tmp]) == tmp


def _mount_size(options: str) -> int:
    for option in options.split(","):
        if option.startswith("pagesize="):
            text = option.partition("=")[2].upper()
            shift = {"K": 10, "M": 20, "G": 30}.get(text[-1:], 0)
            return int(text.rstrip("KMG")) << shift
    return _default_size()


def _default_size() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Hugepagesize:"):
                return int(line.split()[1]) << 10
    return 0


@contextmanager
def mounted(size: int = SIZE) -> Iterator[str]:
    """A hugetlbfs mount of `size` pages: an existing one, or a private one made here and
    unmounted and removed afterwards. QEMU's memory-backend-file with a directory as
    mem-path creates its file there and unlinks it at once, so nothing is left in either."""
    _check_size(size)
    if (mount := existing_mount(size)) is not None:
        yield mount
        return
    if os.geteuid() != 0:
        raise HugepagesError(f"no writable hugetlbfs mount of {size >> 20} MiB pages, and "
                             "mounting one needs root")
    mount = tempfile.mkdtemp(prefix="pce-hugetlbfs-")
    done = None
    try:
        with signals.held():
            done = subprocess.run(["mount", "-t", "hugetlbfs", "-o", f"pagesize={size >> 20}M",
                                   "none", mount], capture_output=True, text=True)
        if done.returncode != 0:
            raise HugepagesError(f"mount -t hugetlbfs failed: {done.stderr.strip()}")
        yield mount
    finally:
        with signals.held():
            if done is not None and done.returncode == 0:
                _unmount(mount)
            os.rmdir(mount)


def _unmount(mount: str) -> None:
    """umount; if something still holds a file there, detach it anyway (the kernel frees it
    with its last user), so that no mount of ours outlives the run."""
    if subprocess.run(["umount", mount], capture_output=True).returncode != 0:
        subprocess.run(["umount", "--lazy", mount], capture_output=True, check=False)


def is_mounted(path: str) -> bool:
    with open(MOUNTS) as f:
        return any(line.split()[1].replace("\\040", " ") == path for line in f)


@contextmanager
def hugetlbfs(need: int, size: int = SIZE) -> Iterator[str]:
    """A hugetlbfs mount of `size` pages with `need` bytes of them free in the pool; yields
    the mount point. Raises HugepagesError (one line) where the machine cannot."""
    with mounted(size) as mount, reserved(-(-need // size), size):
        yield mount
