"""The fault thread and the vCPUs' fault path (QEMU: postcopy-ram.c's postcopy_ram_fault_thread()
and postcopy_request_page(), migration.c's migrate_send_rp_req_pages()).

A vCPU that touches a host page that is not present faults: it hands the page to the fault
thread and blocks until the page is placed (the kernel's userfaultfd does this in QEMU). The
fault thread de-duplicates (a page already requested, or placed meanwhile, is not asked for
again) and sends REQ_PAGES on the return path; the vCPU wakes when the listen or preempt thread
places the page, and its fault becomes a fault record (time, vCPU, page, latency, channel).
"""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING

import numpy as np

from emu import trace
from emu.child import start_thread
from emu.cpu import CpuThread
from emu.figures.metrics import FaultRing
from emu.migration import ram as R
from emu.migration import wire
from emu.migration.placement import MAIN, PREEMPT, Bell
from emu.migration.workload import SLICED, Memory

if TYPE_CHECKING:
    from emu.migration.destination import Destination

# The fault thread read a vCPU's fault (before de-duplication): the host page, its offset in
# bytes into the RAM block, and the vCPU (QEMU traces the faulting thread's pid)
TRACE_REQUEST = trace.point("postcopy_ram_fault_thread_request")
# The fault thread sends nothing for this fault: the page is already requested (another vCPU
# faulted on it first) or was placed meanwhile, `already` says which. QEMU 7.2's fault thread
# has a trace point for this path only for shared memory, postcopy_request_shared_page_present
# ("already" there: nothing to request); for a page already in its requested tree,
# migrate_send_rp_req_pages() adds nothing (no postcopy_page_req_add) and sends REQ_PAGES
# again, where this emulator sends nothing, so one name serves both
TRACE_DUPLICATE = trace.point("postcopy_request_shared_page_present")
# a page still requested, asked for again after a recovery (savevm.c)
TRACE_SYNC = trace.point("postcopy_page_req_sync")


class DestMemory(Memory):
    """Guest RAM as the destination's vCPUs see it: a touch of a page that is not present
    faults."""

    def __init__(self, dst: Destination) -> None:
        self.faults = dst.fault_thread
        self.ram = dst.ram
        self.states = dst.placer.states
        self.tpp = dst.placer.tpp
        self.increments = None
        if dst.ram is not None and dst.cfg["workload.pattern"] not in SLICED:
            self.increments = np.zeros((dst.cfg["guest.vcpus"], len(dst.ram)), np.uint8)

    def first_missing(self, pages: np.ndarray) -> int:
        present = self.states[pages // self.tpp] >= R.PRESENT
        return len(pages) if present.all() else int(np.argmin(present))

    def fault(self, vcpu: int, page: int) -> bool:
        return self.faults.fault(vcpu, page // self.tpp)

    def touched(self, vcpu: int, pages: np.ndarray) -> None:
        if self.increments is not None and len(pages):
            np.add.at(self.increments[vcpu], pages, 1)


class FaultQueue:
    """The faults the vCPUs hand the fault thread (QEMU: the userfaultfd the kernel queues
    them on): a deque and a Bell, rung with the GIL released. queue.SimpleQueue's put()
    wakes its reader with the GIL held, and a reader woken onto the vCPU's CPU then sleeps
    again on the GIL until the vCPU blocks."""

    def __init__(self) -> None:
        self._items: collections.deque = collections.deque()
        self._bell = Bell()

    def put(self, item) -> None:
        self._items.append(item)
        self._bell.ring()

    def get(self):
        while not self._items:
            self._bell.wait()
        return self._items.popleft()


class FaultThread:
    """The fault thread, its queue of faults, and the fault records of the vCPUs it served."""

    def __init__(self, dst: Destination, ring: FaultRing) -> None:
        self.dst = dst
        self.ring = ring  # fault records published to the window
        self.records: list[tuple] = []  # and kept for the report
        self.faults = FaultQueue()  # (vCPU, host page); None: quit
        self.bells = [Bell() for _ in range(dst.cfg["guest.vcpus"])]  # Placer.expect()'s
        self.block_named = False  # REQ_PAGES_ID names the block once per connection
        # this thread's CPU time per fault read (cpu.fault-request), in emulated time
        self.cpu = CpuThread("fault", dst.clock, dst.board)
        self.cost = dst.costs.fault_request

    def start(self) -> None:
        start_thread("fault", self._run)

    def quit(self) -> None:
        self.faults.put(None)

    def _run(self) -> None:
        while (fault := self.faults.get()) is not None:
            self.serve(*fault)

    def serve(self, vcpu: int, page: int) -> None:
        """One fault read: request the page, unless it is requested or present already."""
        placer, size = self.dst.placer, self.dst.cfg.page_size
        self.cpu.charge(self.cost)  # poll, read the uffd_msg, look it up, send
        if TRACE_REQUEST.enabled:
            TRACE_REQUEST(page=page, offset=page * size, vcpu=vcpu)
        if placer.request(page):
            self.request(page)
            return
        self.dst.board.add("duplicate-requests", 1)
        if TRACE_DUPLICATE.enabled:
            already = "present" if placer.states[page] >= R.PRESENT else "requested"
            TRACE_DUPLICATE(page=page, offset=page * size, vcpu=vcpu, already=already)

    def request(self, page: int) -> None:
        """REQ_PAGES for one host page; while paused it stays requested and is asked for
        again on resume (request_again)."""
        dst = self.dst
        if dst.state.status != "postcopy-active":
            return
        size = dst.cfg.page_size
        self.cpu.settle()
        if dst.send_rp(wire.req_pages(page * size, size, not self.block_named)):
            self.block_named = True
            dst.board.add("postcopy-requests", 1)

    def request_again(self) -> None:
        """Every page still wanted, asked for again: the source's queue was lost with the
        connection (QEMU: migrate_send_rp_req_pages_pending())."""
        for page in np.flatnonzero(self.dst.placer.states == R.REQUESTED):
            if TRACE_SYNC.enabled:
                TRACE_SYNC(page=int(page))
            self.request(int(page))

    # ---- called from vCPU threads ----

    def fault(self, vcpu: int, page: int) -> bool:
        """A vCPU touched a host page that is not present: request it and block until placed
        (True), or stopped; False if it was present by now."""
        dst = self.dst
        placer, clock = dst.placer, dst.clock
        t0 = clock.now()
        bell = self.bells[vcpu]
        if not placer.expect(page, bell):
            return False
        dst.board.add("blocked", 1)
        self.faults.put((vcpu, page))  # wakes the fault thread: nothing but sleep after it
        placer.wait_present(page, dst.stop, bell)
        woke = clock.now()
        dst.board.add("blocked", -1)
        if placer.state(page) < R.PRESENT:
            return True  # stopped while waiting
        self.record(t0, vcpu, page, woke - t0)
        return True

    def record(self, t0: float, vcpu: int, page: int, latency: float) -> None:
        """A fault resolved: its record, for the window (the ring) and the report."""
        channel_code = PREEMPT if self.dst.placer.state(page) == R.URGENT_PREEMPT else MAIN
        record = (t0, vcpu, page, latency, channel_code)
        self.ring.append(record)
        self.records.append(record)
        self.dst.board.add("faults", 1)
