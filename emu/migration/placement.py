"""Placing received pages into the destination's guest RAM.

Like QEMU's postcopy_place_page(): the pieces of a host page are assembled in a temporary page,
one per channel (PostcopyTmpPage), and the whole host page is placed at once when its last piece
arrives; placement marks the page present and wakes every vCPU blocked on it. A zero record's
pages are placed as zeros (postcopy_place_page_zero()); in a huge page being assembled each
zero piece is a memset, and a huge page whose pieces were all zero is placed as a zero page.
The pieces of one host page must come in order on one channel: a piece of another host page,
or of a page that the other channel is assembling (split brain), is a protocol error.

Channels are told apart by slot: 0 is main, 1 the preempt channel, and with
migration.x-preempt-channels N (an experiment QEMU does not have) 1..N the preempt channels,
each with its own temporary page and its own placing thread; every preempt slot counts as
PREEMPT in the page states and the counters.
"""

from __future__ import annotations

import os
import select
import threading
import weakref

import numpy as np

from emu import trace
from emu.migration import ram as R
from emu.migration.wire import ProtocolError, RamRecord
from emu.net.channel import preempt_name

MAIN, PREEMPT, MULTIFD = 0, 1, 2  # MULTIFD: any multifd channel (precopy only)


def kind(slot: int) -> int:
    """MAIN or PREEMPT: what the channel in `slot` is (every slot past main is a preempt
    channel)."""
    return min(slot, PREEMPT)


def slot_name(slot: int) -> str:
    """The channel in `slot` by name, as its endpoint has it: main, preempt, preempt1, ..."""
    return "main" if slot == MAIN else preempt_name(slot - PREEMPT)

CHANNEL_NAMES = ("main", "preempt", "multifd")

# QEMU's requested tree (mis->page_requested) and its count: a faulted page joins it
# (migrate_send_rp_req_pages) and leaves it when placed (qemu_ufd_copy_ioctl)
TRACE_REQ_ADD = trace.point("postcopy_page_req_add")
TRACE_REQ_DEL = trace.point("postcopy_page_req_del")
# a host page placed in postcopy (UFFDIO_COPY done, its vCPUs woken), on `channel`
TRACE_PLACE = trace.point("postcopy_place_page")
# the same for a page of zeros (UFFDIO_ZEROPAGE, or for huge pages a copy of the zero page)
TRACE_PLACE_ZERO = trace.point("postcopy_place_page_zero")


class TmpPage:
    def __init__(self, page_size: int, payload: bool) -> None:
        self.page = -1  # host page being assembled, -1 when idle
        self.filled = 0  # target pages received so far
        self.all_zero = True  # every piece so far came as a zero record (QEMU's all_zero)
        self.buf = np.zeros(page_size, np.uint8) if payload else None


class Bell:
    """What a vCPU blocked on a page sleeps on (Placer.expect); the page's placement rings
    it. An eventfd, rung with the GIL released: a lock released under the GIL woke the vCPU
    onto the placing thread's CPU, where it slept again on the GIL until that thread's next
    blocking read (stamps on the 2-core dev VM: 20 us in the release, then that second
    wake-up)."""

    def __init__(self) -> None:
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._poll = select.poll()
        self._poll.register(self.fd, select.POLLIN)
        # closed once nothing can ring or wait on it any more, or by close()
        self.close = weakref.finalize(self, os.close, self.fd)

    def ring(self) -> None:
        os.eventfd_write(self.fd, 1)

    def wait(self, timeout: float | None = None) -> bool:
        """Sleep until rung (True, and unrung again), at most `timeout` seconds."""
        if not self._poll.poll(None if timeout is None else timeout * 1000):
            return False
        try:
            os.eventfd_read(self.fd)
        except BlockingIOError:  # another waiter took the ring (a queue's, FaultQueue)
            return False
        return True


class Placer:
    def __init__(self, states: np.ndarray, ram: np.ndarray | None, page_size: int,
                 on_place=lambda first, count, channel: None,
                 before_place=lambda count, channel, zero: None, slots: int = 2) -> None:
        self.states = states  # destination page states, one byte per host page
        # the same bytes for one page at a time: a vCPU's fault and a requested page placed
        # read and write single states, where numpy's scalar access costs ten times as much
        self._state = memoryview(states) if states.flags.c_contiguous else states
        self.ram = ram  # (target pages, 4096) uint8, or None without payload
        self._bytes = memoryview(ram).cast("B", (ram.size,)) if ram is not None else None
        self.page_size = page_size
        self.tpp = page_size // R.TARGET_PAGE
        lock = threading.RLock()
        self.cond = threading.Condition(lock)
        # host page -> the bells of the vCPUs blocked on it: a placement wakes only the vCPUs
        # blocked on what it placed, each through the one primitive it sleeps on (a
        # Condition's wait makes a lock of its own per wait, then takes this lock again)
        self._waiters: dict[int, list[Bell]] = {}
        self._lock = lock
        self.postcopy = False
        self.present = 0
        # a temporary page per channel slot: main, then each preempt channel
        self.tmp = [TmpPage(page_size, ram is not None) for _ in range(slots)]
        self.placed = [0, 0, 0]  # host pages placed per channel (MAIN, PREEMPT, MULTIFD)
        self.requested = 0  # host pages REQUESTED, not placed yet (page_requested_count)
        self.on_place = on_place  # (first host page, count, channel kind), under the lock
        # (count, slot, zero), not under the lock: the placing thread's CPU time (emu/cpu.py)
        self.before_place = before_place
        self.kernel = None  # emulator.backend=userfaultfd: uffd_backend.Kernel, maps the pages

    # ---- from the vCPUs and the fault thread ----

    def request(self, page: int) -> bool:
        """Mark a faulted host page requested; False when it already is, or is present (the
        fault thread then sends nothing: QEMU de-duplicates the same way)."""
        with self._lock:
            if self._state[page] >= R.REQUESTED:
                return False
            self._state[page] = R.REQUESTED
            self.requested += 1
            if TRACE_REQ_ADD.enabled:
                TRACE_REQ_ADD(page=page, count=self.requested)
            return True

    def state(self, page: int) -> int:
        """Host page `page`'s state (a single byte read: numpy's item costs ten times more)."""
        return self._state[page]

    def expect(self, page: int, bell: Bell) -> bool:
        """A vCPU is about to block on host page `page`: its bell joins the page's waiters
        now, before it hands its fault on, so that the fault thread it wakes finds it asleep,
        not busy with this. False if the page is present."""
        with self._lock:  # the Condition's own __enter__ is a Python call more
            if self._state[page] >= R.PRESENT:
                return False
            self._waiters.setdefault(page, []).append(bell)
            return True

    def wait_present(self, page: int, stop: threading.Event, bell: Bell | None = None) -> None:
        """Block until host page `page` is present, or stop is set. bell: expect()'s (else
        one made for this wait)."""
        if bell is not None:
            self._sleep(page, stop, bell)
            return
        bell = Bell()
        try:
            if self.expect(page, bell):
                self._sleep(page, stop, bell)
        finally:
            bell.close()

    def _sleep(self, page: int, stop: threading.Event, bell: Bell) -> None:
        while not bell.wait(0.1):  # rung by _wake()
            if stop.is_set() and self._leave(page, bell):
                return

    def _leave(self, page: int, bell: Bell) -> bool:
        """Stopped: take `bell` off the page's waiters. False if a placement rang it
        meanwhile (the next wait returns at once)."""
        with self._lock:
            bells = self._waiters.get(page, [])
            if bell not in bells:
                return False
            bells.remove(bell)
            if not bells:
                del self._waiters[page]
            return True

    def _wake(self, first: int, count: int) -> None:
        """Under the lock: wake the vCPUs blocked on host pages [first, first + count)."""
        for page in [p for p in self._waiters if first <= p < first + count]:
            for bell in self._waiters.pop(page):
                bell.ring()

    # ---- from the listen and preempt threads ----

    def discard(self, first: int, count: int) -> None:
        """POSTCOPY_RAM_DISCARD: drop pages the source re-dirtied after sending them."""
        with self.cond:
            span = self.states[first:first + count]
            dropped = span >= R.PRESENT
            self.present -= int(np.count_nonzero(dropped))
            span[dropped] = R.DISCARDED
            if self.ram is not None:
                t0 = first * self.tpp
                self.ram[t0:t0 + count * self.tpp][np.repeat(dropped, self.tpp)] = 0

    def drop_partial(self) -> None:
        """The connections broke: host pages half assembled are lost (they will be resent)."""
        for tmp in self.tmp:
            tmp.page = -1

    def receive(self, channel: int, rec: RamRecord) -> None:
        """A RAM record read off the channel in slot `channel`."""
        if rec.offset + rec.npages * R.TARGET_PAGE > len(self.states) * self.page_size:
            raise ProtocolError(f"RAM record at {rec.offset} (+{rec.npages} pages) beyond RAM")
        if rec.offset % self.page_size == 0 and rec.npages % self.tpp == 0 \
                and self.tmp[channel].page < 0:
            first, count = rec.offset // self.page_size, rec.npages // self.tpp
            if rec.zero:
                self.place_zero_page(first, count, channel)
            else:
                self._place(first, count, rec.data, channel)
        else:
            self._assemble(channel, rec)

    def _assemble(self, channel: int, rec: RamRecord) -> None:
        tmp = self.tmp[channel]
        page = rec.offset // self.page_size
        if tmp.page < 0:
            if rec.offset % self.page_size:
                raise ProtocolError(f"host page {page} starts in the middle")
            if any(other.page == page for other in self.tmp if other is not tmp):
                raise ProtocolError(f"host page {page} sent on two channels (split brain)")
            tmp.page, tmp.filled, tmp.all_zero = page, 0, True
        expected = tmp.page * self.page_size + tmp.filled * R.TARGET_PAGE
        if rec.offset != expected or tmp.filled + rec.npages > self.tpp:
            raise ProtocolError(f"expected offset {expected} of host page {tmp.page}, "
                                f"got {rec.offset} (+{rec.npages} pages)")
        if tmp.buf is not None:
            start = tmp.filled * R.TARGET_PAGE
            end = start + rec.npages * R.TARGET_PAGE
            if rec.zero:  # ram_load_postcopy(): memset, the target page is not the host page
                tmp.buf[start:end] = 0
            else:
                tmp.buf[start:end] = np.frombuffer(rec.data, np.uint8)
        tmp.all_zero &= rec.zero
        tmp.filled += rec.npages
        if tmp.filled == self.tpp:
            tmp.page = -1
            if tmp.all_zero:
                self.place_zero_page(page, 1, channel)
            else:
                self._place(page, 1, tmp.buf, channel)

    def place_multifd(self, normal: np.ndarray, data, zero: np.ndarray,
                      write_zero: bool) -> int:
        """A multifd packet's pages, whole host pages, as precopy places them: each straight
        into guest RAM (no temporary page: the guest here is not running). Its normal pages
        (target page numbers) from `data`; its zero pages written as zeros where the page was
        received before, or everywhere with write_zero (postcopy-ram enabled: QEMU 10.1's
        multifd_recv_zero_page_process(), so that no page the received bitmap counts is one
        memory never had). The zero pages written. A packet once postcopy has started is a
        protocol error: two writers to one page corrupt the guest."""
        pages = np.concatenate((normal, zero)) // self.tpp
        first = np.unique(pages)
        if len(pages) != len(first) * self.tpp or len(first) and first[-1] >= len(self.states):
            raise ProtocolError("multifd packet of partial host pages, or beyond RAM")
        with self.cond:
            if self.postcopy:
                raise ProtocolError("multifd data in postcopy: the page may have a writer on "
                                    "main or preempt already")
            received = self.states[zero // self.tpp] >= R.PRESENT
            written = zero if write_zero else zero[received]
            if self.ram is not None:
                if len(normal):
                    self.ram[normal] = np.frombuffer(data, np.uint8).reshape(-1, R.TARGET_PAGE)
                self.ram[written] = 0
            span = self.states[first]
            self.present += len(first) - int(np.count_nonzero(span))  # MISSING (0) or PRECOPY
            self.states[first] = R.PRECOPY
            self.placed[MULTIFD] += len(first)
            starts = np.flatnonzero(np.diff(first, prepend=-2) != 1)
            for start, end in zip(starts, [*starts[1:], len(first)], strict=True):
                self.on_place(int(first[start]), int(end - start), MULTIFD)
                self._wake(int(first[start]), int(end - start))
        return len(written)

    def place_zero_page(self, first: int, count: int, channel: int) -> None:
        """Host pages [first, first + count) of zeros: postcopy_place_page_zero() in postcopy
        (4 KiB: UFFDIO_ZEROPAGE; a huge page: UFFDIO_COPY of the whole pre-zeroed
        postcopy_tmp_zero_page), a memset in precopy. Present, and its vCPUs woken, as a
        normal page."""
        self._place(first, count, None, channel, zero=True)

    def _place(self, first: int, count: int, data, slot: int, zero: bool = False) -> None:
        """data: the pages' bytes (None without payload); zero: they are zeros."""
        self.before_place(count, slot, zero)
        channel = kind(slot)
        with self.cond:
            if self.postcopy:
                self._place_postcopy(first, count, data, slot, zero)
            else:  # precopy: the guest here is not running yet, pages are simply (re)written
                span = self.states[first:first + count]
                if self.ram is not None and zero:  # a page sent before may hold old bytes
                    self.ram[first * self.tpp:(first + count) * self.tpp] = 0
                elif self.ram is not None and data is not None:
                    self._bytes[first * self.page_size:(first + count) * self.page_size] = data
                self.present += count - int(np.count_nonzero(span))  # MISSING (0) or PRECOPY
                span.fill(R.PRECOPY)
                self.placed[channel] += count
            self.on_place(first, count, channel)
            self._wake(first, count)

    def _place_postcopy(self, first: int, count: int, data, slot: int, zero: bool) -> None:
        if count == 1 and self.kernel is None:
            self._place_one(first, data, slot, zero)
            return
        channel = kind(slot)
        span = self.states[first:first + count]
        # a page already present is left alone (UFFDIO_COPY would say EEXIST)
        new = span < R.PRESENT
        wanted = span == R.REQUESTED
        codes = np.where(wanted, R.URGENT_PREEMPT if channel == PREEMPT else R.URGENT_MAIN,
                         R.BACKGROUND)
        if self.kernel is not None and self.kernel.registered:
            self.kernel.place(first, new, None if zero else data)  # wakes their vCPUs
        elif self.ram is not None and (zero or data is not None):
            dst = self.ram[first * self.tpp:(first + count) * self.tpp].reshape(
                count, self.tpp, R.TARGET_PAGE)
            if zero:  # a missing page holds zeros already (never placed, or discarded): kept so
                dst[new] = 0
            else:
                src = np.frombuffer(data, np.uint8).reshape(count, self.tpp, R.TARGET_PAGE)
                dst[new] = src[new]
        placed = int(np.count_nonzero(new))
        self.present += placed
        self.placed[channel] += placed
        resolved = int(np.count_nonzero(wanted))
        self.requested -= resolved
        span[new] = codes[new]
        placed_point = TRACE_PLACE_ZERO if zero else TRACE_PLACE
        if placed_point.enabled or TRACE_REQ_DEL.enabled:
            self._trace_placed(first, new, wanted, slot, self.requested + resolved,
                               placed_point)

    def _place_one(self, page: int, data, slot: int, zero: bool) -> None:
        """_place_postcopy() of one host page, the fault path's case, on single states (the
        arrays' numpy calls cost more than the rest of the path from the socket to the vCPU)."""
        state = self._state[page]
        if state >= R.PRESENT:  # UFFDIO_COPY would say EEXIST
            return
        channel = kind(slot)
        if self.ram is not None and zero:  # as _place_postcopy() does
            self.ram[page * self.tpp:(page + 1) * self.tpp] = 0
        elif self.ram is not None and data is not None:
            self._bytes[page * self.page_size:(page + 1) * self.page_size] = data
        self.present += 1
        self.placed[channel] += 1
        wanted = state == R.REQUESTED
        if wanted:
            self.requested -= 1
            self._state[page] = R.URGENT_PREEMPT if channel == PREEMPT else R.URGENT_MAIN
        else:
            self._state[page] = R.BACKGROUND
        placed_point = TRACE_PLACE_ZERO if zero else TRACE_PLACE
        if wanted and TRACE_REQ_DEL.enabled:
            TRACE_REQ_DEL(page=page, count=self.requested)
        if placed_point.enabled:
            placed_point(page=page, channel=slot_name(slot))

    @staticmethod
    def _trace_placed(first: int, new: np.ndarray, wanted: np.ndarray, slot: int,
                      count: int, placed_point: trace.TracePoint) -> None:
        """Each page placed, in QEMU's order: the request it resolves leaves the requested
        tree (postcopy_page_req_del, with the count left of `count`), then
        postcopy_place_page (or postcopy_place_page_zero)."""
        for i in np.flatnonzero(new):
            page = first + int(i)
            if wanted[i]:
                count -= 1
                if TRACE_REQ_DEL.enabled:
                    TRACE_REQ_DEL(page=page, count=count)
            if placed_point.enabled:
                placed_point(page=page, channel=slot_name(slot))
