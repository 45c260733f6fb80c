"""A private hugetlbfs mount with enough free huge pages for a run, undone afterwards.

    with hugetlbfs(2 * (256 << 20)) as mount:
        run(Scenario(hugetlbfs=mount, ...))

Root only (mount(8), /proc/sys/vm/nr_hugepages). The pool is raised by what the run needs
and set back to its old size on the way out; the mount point is a fresh mkdtemp directory,
unmounted and removed by its path.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

NR_HUGEPAGES = "/proc/sys/vm/nr_hugepages"  # the pool of the default huge page size
DEFAULT_SIZE = 2 << 20


class HugepagesError(RuntimeError):
    """The machine cannot give the run its huge pages; the message says why."""


def default_size() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Hugepagesize:"):
                return int(line.split()[1]) * 1024
    raise HugepagesError("this kernel has no huge pages (no Hugepagesize in /proc/meminfo)")


def _free() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("HugePages_Free:"):
                return int(line.split()[1])
    return 0


def _set_pool(pages: int) -> None:
    with open(NR_HUGEPAGES, "w") as f:
        f.write(f"{pages}\n")


@contextmanager
def hugetlbfs(need: int) -> Iterator[str]:
    """A hugetlbfs mount of the default huge page size with `need` bytes of huge pages free
    in the pool; yields the mount point."""
    if os.geteuid() != 0:
        raise HugepagesError("huge pages need root (mount, /proc/sys/vm/nr_hugepages)")
    size = default_size()
    pages = -(-need // size)
    with open(NR_HUGEPAGES) as f:
        old = int(f.read())
    mount = tempfile.mkdtemp(prefix="pce-hugetlbfs-")
    mounted = False
    try:
        _set_pool(old + max(0, pages - _free()))
        if _free() < pages:
            raise HugepagesError(f"the kernel gave {_free()} free huge pages of {size >> 20} MiB, "
                                 f"the run needs {pages} (memory too fragmented or too small)")
        done = subprocess.run(["mount", "-t", "hugetlbfs", "-o", f"pagesize={size}", "none",
                               mount], capture_output=True, text=True)
        if done.returncode != 0:
            raise HugepagesError(f"mount -t hugetlbfs failed: {done.stderr.strip()}")
        mounted = True
        yield mount
    finally:
        if mounted:
            subprocess.run(["umount", mount], check=False)
        os.rmdir(mount)
        _set_pool(old)
