"""emulator.backend=userfaultfd: the destination's vCPUs fault in the kernel, as under QEMU.

The emulated backend has a vCPU look a page's state up and wait on a condition. Here, as in
QEMU's postcopy-ram.c:
- at POSTCOPY_LISTEN the pages the destination does not hold (never received, or dropped by
  POSTCOPY_RAM_DISCARD) are removed from the shared-memory file (MADV_REMOVE, as
  ram_discard_range() on a file-backed block), and guest RAM is registered with a userfaultfd
  in MISSING mode (postcopy_ram_incoming_setup / ram_block_enable_notify);
- a vCPU touches a page that may be missing with a real load through ctypes, which releases
  the interpreter lock: if the page is missing it sleeps in the kernel while every other
  thread runs (pages the state array says are present are written with numpy as before: they
  are in the file, and placement marks a page present only after the kernel mapped it);
- the fault thread polls the descriptor and reads struct uffd_msg (postcopy_ram_fault_thread),
  then de-duplicates and requests the page as the emulated backend does;
- the listen and preempt threads place pages with UFFDIO_COPY (UFFDIO_ZEROPAGE for zero pages),
  which maps them atomically and wakes the vCPUs sleeping on them;
- a fault record runs from the fault thread's read of the fault to the page's placement.
With huge pages (guest.page-size 2MiB or 1GiB) guest RAM is a hugetlb memfd (emu/shm.py's
HugeSegment), registered with UFFD_FEATURE_MISSING_HUGETLBFS: a fault is for the whole huge
page, MADV_REMOVE punches whole huge pages out of the file, each channel's temporary page is
placed with one UFFDIO_COPY of the whole page, and a zero page is a UFFDIO_COPY of a zeroed
huge page (hugetlbfs has no UFFDIO_ZEROPAGE: QEMU's postcopy_tmp_zero_page).
While the migration is paused, vCPUs on missing pages stay asleep in the kernel; a placement
after the recovery wakes them. When the destination stops (completed, failed, shut down), the
range is unregistered, which wakes every vCPU still asleep, before anything joins them.
"""

from __future__ import annotations

import ctypes
import threading
from typing import TYPE_CHECKING

import numpy as np

from emu import trace
from emu import uffd as U
from emu.child import start_thread
from emu.migration import ram as R
from emu.migration.fault_thread import FaultThread

if TYPE_CHECKING:
    from emu.migration.destination import Destination

# QEMU's names: guest RAM registered (ram_block_enable_notify), pages dropped from it
# (ram_discard_range), the range handed back at the end (cleanup_range)
TRACE_ENABLE = trace.point("postcopy_ram_enable_notify")
TRACE_DISCARD = trace.point("postcopy_ram_discard_range")
TRACE_CLEANUP = trace.point("postcopy_cleanup_range")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """(first, count) of each run of True in `mask`."""
    edges = np.flatnonzero(np.diff(np.concatenate(([0], mask.astype(np.int8), [0]))))
    return [(int(a), int(b - a)) for a, b in zip(edges[::2], edges[1::2], strict=True)]


class Kernel:
    """The destination's guest RAM (its mapping of the shared segment) under a userfaultfd.
    Every call that changes what is mapped runs under the Placer's lock."""

    def __init__(self, buf: memoryview, page_size: int) -> None:
        self.base = U.address(buf)
        self.size = len(buf)
        self.page_size = page_size
        huge = page_size > U.PAGE  # then buf maps a hugetlb memfd (engines.huge_page)
        # Refused: the probe passed in the controller, not here
        self.uffd = U.Userfaultfd(U.UFFD_FEATURE_MISSING_HUGETLBFS if huge
                                  else U.UFFD_FEATURE_MISSING_SHMEM)
        self.registered = False
        self.huge = huge
        self._zero: np.ndarray | None = None  # the zero huge page, made when first placed

    def address(self, page: int) -> int:
        return self.base + page * self.page_size

    def page_of(self, address: int) -> int:
        return (address - self.base) // self.page_size

    def listen(self, states: np.ndarray) -> None:
        """POSTCOPY_LISTEN: drop what the destination does not hold, then register. A hugetlb
        memfd starts empty and only received pages were written in it: of those missing, only
        the discarded ones are in the file, and punching the others would only hand back the
        reservations their mapping holds, for another program to take before they are placed
        (the /dev/shm segment is allocated whole, every missing page is in it)."""
        self.discard(0, states == R.DISCARDED if self.huge else states < R.PRESENT)
        self.uffd.register(self.base, self.size)
        self.registered = True
        if TRACE_ENABLE.enabled:
            TRACE_ENABLE()

    def discard(self, first: int, mask: np.ndarray) -> None:
        """Remove host pages first + i, for each i where `mask`, from the file (and every
        process's mapping of it), so that the next touch of one faults (MADV_REMOVE: QEMU's
        ram_block_discard_range() on shared memory)."""
        size = self.page_size
        for i, count in runs(mask):
            if TRACE_DISCARD.enabled:
                TRACE_DISCARD(start=(first + i) * size, length=count * size)
            if _libc.madvise(self.address(first + i), count * size, U.MADV_REMOVE) < 0:
                raise U._errno_error("madvise(MADV_REMOVE)")

    def place(self, first: int, new: np.ndarray, data) -> None:
        """Host pages first + i for each i where `new`, from `data` (the bytes of the whole
        span; None: zero pages), with UFFDIO_COPY / UFFDIO_ZEROPAGE, waking their vCPUs."""
        size = self.page_size
        src = U.address(data) if data is not None else 0
        for i, count in runs(new):
            dst = self.address(first + i)
            if data is not None:
                self.uffd.copy(dst, src + i * size, count * size, size)
            elif not self.huge:
                self.uffd.zeropage(dst, count * size, size)
            else:  # hugetlbfs: a copy of the zero huge page, one page at a time
                for k in range(count):
                    self.uffd.copy(dst + k * size, U.address(self.zero_page()), size, size)

    def zero_page(self) -> np.ndarray:
        """QEMU's postcopy_tmp_zero_page, made on first use (a 1 GiB page is 1 GiB of RAM)."""
        if self._zero is None:
            self._zero = _zero_page(self.page_size)
        return self._zero

    def release(self) -> None:
        """UFFDIO_UNREGISTER the whole RAM: vCPUs asleep on pages that will never come wake
        (and find zeros), and from now on RAM is ordinary memory (cleanup_range)."""
        if self.registered:
            self.registered = False
            self.uffd.unregister(self.base, self.size)
            if TRACE_CLEANUP.enabled:
                TRACE_CLEANUP(start=self.base, length=self.size)

    def close(self) -> None:
        self.release()
        self.uffd.close()


def _zero_page(size: int) -> np.ndarray:
    """A huge page of zeros, written so that its memory is there: UFFDIO_COPY copies with
    page faults off, and a source page not yet mapped makes the kernel take a second huge
    page from the pool to copy through (ENOMEM when guest RAM holds every free one)."""
    page = np.empty(size, np.uint8)
    page.fill(0)
    return page


class UffdFaultThread(FaultThread):
    """The fault thread reading the kernel's faults, and the vCPUs' side: a real load."""

    def __init__(self, dst: Destination, ring) -> None:
        super().__init__(dst, ring)
        self.kernel: Kernel = dst.placer.kernel
        self.reads: dict[tuple[int, int], float] = {}  # (vCPU, host page): when read
        self._quit = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = start_thread("fault", self._run)

    def quit(self) -> None:
        """postcopy_ram_incoming_cleanup(): wake the reader, join it, hand the range back
        (waking any vCPU still asleep) and close the descriptor."""
        self._quit = True
        self.kernel.uffd.interrupt()
        if self._thread is not None:
            self._thread.join(5)
        with self.dst.placer.cond:
            self.kernel.close()

    def _run(self) -> None:
        clock, uffd = self.dst.clock, self.kernel.uffd
        while not self._quit:
            for fault in uffd.faults(None):
                page = self.kernel.page_of(fault.address)
                vcpu = self._vcpu(fault.ptid)
                self.reads[(vcpu, page)] = clock.now()
                self.serve(vcpu, page)

    def _vcpu(self, tid: int) -> int:
        for vcpu in self.dst.vcpus:
            if vcpu.native_id == tid:
                return vcpu.index
        return -1

    def fault(self, vcpu: int, page: int) -> bool:
        """A vCPU's touch of a host page that may be missing: a load, which sleeps in the
        kernel until the page is placed (True), or until the destination stops; False if
        the page was present by then."""
        dst = self.dst
        placer = dst.placer
        if placer.states[page] >= R.PRESENT:
            return False
        t0 = dst.clock.now()
        dst.board.add("blocked", 1)
        U.read(self.kernel.address(page))  # GIL released: the others run while it sleeps
        placer.wait_present(page, dst.stop)  # its state follows the kernel's mapping
        dst.board.add("blocked", -1)
        read = self.reads.pop((vcpu, page), t0)  # t0: woken before the fault was read
        if placer.states[page] < R.PRESENT:
            return True  # stopped while waiting
        self.record(read, vcpu, page, max(0.0, float(dst.arrival[page]) - read))
        return True
