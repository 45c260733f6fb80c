"""Page search and sending on the source: QEMU's migration/ram.c, as source.py is its
migration.c.

RAMState holds what every sender shares: the dirty bitmap, the pages ever sent (sent_once: a
copy of theirs dirtied since is stale on the destination at switchover), the pages' states the
window shows, the scan position (PageSearchStatus) and the queue of page requests. One lock,
QEMU's bitmap_mutex, covers the bitmap side. The migration thread takes it to find and claim
pages; the return-path thread takes it to reload the bitmap after a recovery, and from QEMU 8.0
on (migration.design 8.0, 10.1) it sends preempt urgent pages itself (save_host_page_urgent()).
So every sending function here claims its pages under the lock. The migration thread never
holds it while it writes or sleeps: blocked on a full main, it must not stop the urgent sender
(QEMU 8.0 drops bitmap_mutex around each page in preempt mode for that reason). The urgent
sender holds it across its one page, as ram_save_host_page_urgent() is called with it held: a
background claim may wait for an urgent page's send, an urgent page only for a claim.

Claiming a page clears its dirty bits before its bytes are written, so two senders never send
one page twice: the second finds it clean and drops the request (get_queued_page_not_dirty),
as QEMU does. The vCPUs set dirty bits without the lock, as KVM's dirty log does: a bit set
before a claim means the bytes written are read after it (and sent); one set after it means
the page goes again.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from emu import trace
from emu.board import Board
from emu.clock import Clock
from emu.config import Config
from emu.cpu import Costs, CpuThread
from emu.migration import versions, wire
from emu.migration.page_requests import PageRequestQueue
from emu.migration.ram import SENT_MAIN, SENT_PREEMPT, SENT_URGENT_MAIN, TARGET_PAGE, UNSENT
from emu.net.channel import Endpoint

SCAN = 1 << 16  # dirty-bitmap window searched at once
PAGE_FLAGS = wire.RAM_SAVE_FLAG_PAGE | wire.RAM_SAVE_FLAG_CONTINUE
WHOLE_WRITE = 1 << 30  # target pages: a record as large as any write
DISCARDS_PER_COMMAND = 4000
RBNAME = wire.BLOCK.decode()  # the one RAM block, as trace points name it

TRACE_QUEUE_PAGES = trace.point("ram_save_queue_pages")
# An unqueued request ends in one of these two: the page goes, or it was sent already. QEMU's
# get_queued_page is the first (traced as it finds the page dirty), its channel in "channel".
TRACE_QUEUED_PAGE = trace.point("get_queued_page")
TRACE_NOT_DIRTY = trace.point("get_queued_page_not_dirty")
TRACE_PREEMPT_TRIGGERED = trace.point("postcopy_preempt_triggered")
TRACE_PREEMPT_RESTORED = trace.point("postcopy_preempt_restored")
# QEMU 8.0's return-path thread sending a requested page (ram_save_host_page_urgent()), and
# finding the migration thread sending that very host page on main (pss_overlap())
TRACE_SEND_HOST_PAGE = trace.point("postcopy_preempt_send_host_page")
TRACE_PREEMPT_HIT = trace.point("postcopy_preempt_hit")
# QEMU 10.1's locality hint (commit 20d82622 has no trace point: named after its functions)
TRACE_HINT_UPDATE = trace.point("ram_page_hint_update")
TRACE_HINT_COLLECT = trace.point("ram_page_hint_collect")
# migration.x-preempt-channels (an experiment, not QEMU: postcopy-emu's own name): the preempt
# channel an urgent page goes on, round robin over them
TRACE_PREEMPT_CHANNEL = trace.point("pce_preempt_channel_pick")


# the preempt channel(s) a sender of urgent pages is given: one endpoint, or with
# migration.x-preempt-channels a list of them; None or [] for none
Preempt = Endpoint | Sequence[Endpoint] | None


class Pacer:
    """The main channel's rate limit as QEMU 7.1/7.2 keeps it (max-bandwidth, then
    max-postcopy-bandwidth from postcopy_start(); 0 = none): the QEMUFile's rate_limit_max and
    rate_limit_used, and the window migration_update_counters() restarts. The budget is
    rate x 100 ms (BUFFER_DELAY) per window; bytes count when they are put on main, whatever
    the link does with them; the preempt channel has no limit and counts nothing here."""

    WINDOW = 0.1  # BUFFER_DELAY

    def __init__(self, rate: float, now: float = 0.0) -> None:
        self.rate = rate
        self.start = now  # iteration_start_time
        self.used = 0  # rate_limit_used

    def charge(self, nbytes: int) -> None:
        """qemu_put_buffer() and friends: bytes queued on main."""
        self.used += nbytes

    def exceeded(self) -> bool:
        """qemu_file_rate_limit(): over this window's budget."""
        return bool(self.rate) and self.used > self.rate * self.WINDOW

    def update(self, now: float) -> None:
        """migration_update_counters(): a new window once 100 ms have passed since the last
        one started, from now (not on a fixed grid: the thread restarts it when it looks)."""
        if now >= self.start + self.WINDOW:
            self.start, self.used = now, 0

    @property
    def end(self) -> float:
        return self.start + self.WINDOW


@dataclass
class PageSearchStatus:
    """Where the background scan goes on (QEMU's PageSearchStatus; one RAM block here)."""

    page: int = 0  # host page
    complete_round: bool = False  # the scan reached the end of RAM since the last sync
    # break-huge interrupted this huge page at this target page of it (postcopy_preempt_state)
    preempted: tuple[int, int] | None = None


class RecordWriter:
    """Page records on a channel, counted on the board (QEMU's ram_save_target_page(): each
    target page is checked for zeros first, save_zero_page(), else save_normal_page()); the
    migration thread's CPU time for them is charged to `cpu` (emu/cpu.py)."""

    def __init__(self, raw: memoryview | None, board: Board, cpu: CpuThread | None = None,
                 costs: Costs | None = None, page_size: int = TARGET_PAGE) -> None:
        self.raw = raw  # guest RAM, None without payload (a record then costs the link its size)
        self.board = board
        self.cpu = cpu
        self.costs = costs or Costs()
        self.page_size = page_size  # the host page's
        # target pages a record carries at most: a whole write in precopy, where no vCPU
        # waits for a page, so when the destination places it is not seen, and the emulator
        # pays per frame (bench/throughput.py moves 20% less in 32 KiB records); from the
        # switchover on, one read of QEMU's destination (postcopy_records())
        self.record = WHOLE_WRITE
        # guest RAM as 64-bit words, a row per target page: the zero check reads these
        self.words = None if raw is None else np.frombuffer(raw, np.uint64).reshape(
            -1, TARGET_PAGE // 8)

    def postcopy_records(self) -> None:
        """From now on a vCPU may wait for the pages: records of one read (wire.py)."""
        self.record = wire.record_pages(self.page_size)

    def save_pages(self, ep: Endpoint, offset: int, n: int, counter: str, more: bool) -> int:
        """n target pages from byte `offset`: the runs of zero pages as zero records, the runs
        between as normal records (without payload there are no bytes to check: all normal).
        The bytes written."""
        if self.words is None:
            return self.save_normal_page(ep, offset, n, counter, more)
        first = offset // TARGET_PAGE
        zero = zero_pages(self.words[first:first + n])
        if not zero.any():  # the common case, a populated guest: one record as before
            return self.save_normal_page(ep, offset, n, counter, more)
        if zero.all():
            return self.save_zero_page(ep, offset, n, counter, more)
        sent = 0
        for start, count, is_zero in _flag_runs(zero):
            save = self.save_zero_page if is_zero else self.save_normal_page
            sent += save(ep, offset + start * TARGET_PAGE, count, counter, more)
        return sent

    def save_normal_page(self, ep: Endpoint, offset: int, n: int, counter: str,
                         more: bool) -> int:
        """n target pages from byte `offset`, in one write (the migration thread's CPU time
        charged once) of records of at most self.record pages; `counter` is the phase's
        bytes (precopy-bytes, ...). more: a background write, which may gather in the
        endpoint. The bytes put on `ep` (what a rate limit counts)."""
        frames = []
        for start in range(0, n, self.record):
            count = min(self.record, n - start)
            at = offset + start * TARGET_PAGE
            header = wire.ram_header(at, count, PAGE_FLAGS)
            if self.raw is None:
                frames.append(([header], count * TARGET_PAGE))
            else:  # straight from guest RAM: a page the guest writes meanwhile is re-dirtied
                # and sent again, as in QEMU
                frames.append(([header, self.raw[at:at + count * TARGET_PAGE]], 0))
        size, total = n * TARGET_PAGE, wire.pages_bytes(n, self.record)
        self._spend(n, total)
        if len(frames) == 1:
            ep.send(*frames[0], more=more)
        else:
            ep.send_write(frames, more=more)
        b = self.board
        b.add("transferred", total)
        b.add(counter, total)
        b.add("normal", n)
        b.add("normal-bytes", size)
        return total

    def save_zero_page(self, ep: Endpoint, offset: int, n: int, counter: str,
                       more: bool) -> int:
        """save_zero_page(): n all-zero target pages from byte `offset` as one zero record,
        on the channel the pages would have gone on. It costs the link, the counters and the
        rate limit what QEMU's n zero-page records cost (ZERO_PAGE_BYTES each, at least the
        record's own size); counted in duplicate, not in normal. The bytes written."""
        record = wire.zero_record(offset, n)
        cost = max(len(record), n * wire.ZERO_PAGE_BYTES)
        self._spend(n, cost, zero=n)
        ep.send([record], virt=cost - len(record), more=more)
        b = self.board
        b.add("transferred", cost)
        b.add(counter, cost)
        b.add("duplicate", n)
        return cost

    def _spend(self, pages: int, nbytes: int, zero: int = 0) -> None:
        """The migration thread's time on this record (cpu.save-page, cpu.write,
        cpu.write-byte; cpu.zero-check for the `zero` pages read whole and found all zeros),
        waited out before its bytes go: a write the link sees. Charged as if the page bytes
        were written without payload too (QEMU writes them)."""
        if self.cpu is not None:
            self.cpu.charge(self.costs.save(pages, nbytes, zero))
            self.cpu.settle()


def zero_pages(words: np.ndarray) -> np.ndarray:
    """buffer_is_zero() of each row (a target page as 64-bit words). Like QEMU's
    buffer_zero_int(), the first and last words first: a page the guest wrote, or stamped,
    is told apart there without reading the rest."""
    zero = (words[:, 0] | words[:, -1]) == 0
    if zero.all():  # no page told apart: read them all, in place
        return ~words.any(axis=1)
    if zero.any():
        maybe = np.flatnonzero(zero)
        zero[maybe] = ~words[maybe].any(axis=1)
    return zero


def _flag_runs(flags: np.ndarray) -> list[tuple[int, int, bool]]:
    """(start, count, value) of each run of equal values in a bool array."""
    starts = np.concatenate(([0], np.flatnonzero(flags[1:] != flags[:-1]) + 1))
    ends = np.concatenate((starts[1:], [len(flags)]))
    return [(int(s), int(e - s), bool(flags[s])) for s, e in zip(starts, ends, strict=True)]


class RAMState:
    def __init__(self, cfg: Config, board: Board, clock: Clock, states: np.ndarray,
                 queue: PageRequestQueue, raw: memoryview | None) -> None:
        self.board = board
        self.clock = clock
        self.P = cfg.page_size
        self.tpp = cfg.target_pages_per_host_page
        self.piece = cfg["emulator.chunk"] // TARGET_PAGE  # target pages per record at most
        self.ram_size = cfg["guest.ram"]
        self.bitmap_mutex = threading.Lock()
        # under bitmap_mutex:
        self.dirty = np.ones(cfg.npages, bool)  # nothing has been sent yet
        self.sent_once = np.zeros(cfg.npages, bool)
        self.states = states  # the channel each host page went on, for the window
        # the same three for one page at a time (an urgent page): numpy's scalar access costs
        # ten times as much, on the path of every fault
        self._one = (memoryview(self.dirty), memoryview(self.sent_once), memoryview(states))
        self.pss = PageSearchStatus()
        # the request queue has a lock of its own: the return path puts without bitmap_mutex
        self.queue = queue  # QEMU's src_page_requests
        self.writer = RecordWriter(raw, board, CpuThread("migration", clock, board),
                                   Costs.from_config(cfg), self.P)
        # migration.design: from 8.0 on the return-path thread sends preempt requests itself
        self.rp_sends = versions.preempt_full(cfg) and cfg["migration.postcopy-preempt"]
        self.hints = versions.page_hint(cfg)
        # under bitmap_mutex:
        self.page_hint: int | None = None  # rs->page_hint: where the scan goes on, if valid
        self.main_page: int | None = None  # the host page main is being written (pss_overlap)
        self._next_preempt = 0  # x-preempt-channels: the channel the next urgent page takes
        self._remaining_at = 0.0

    # ---- the bitmap ----

    def find_dirty_block(self) -> int | None:
        """The first dirty host page at or after the scan position, wrapping around once;
        reaching the end of RAM sets pss.complete_round, as QEMU's find_dirty_block() does."""
        with self.bitmap_mutex:
            n = len(self.dirty)
            self._collect_hint()
            if self.pss.page >= n:  # the last page sent was the last of RAM
                self.pss.page = 0
                self.pss.complete_round = True
            start = self.pss.page
            for lo, hi in ((start, n), (0, start)):
                for w in range(lo, hi, SCAN):
                    window = self.dirty[w:min(w + SCAN, hi)]
                    i = int(np.argmax(window))
                    if window[i]:
                        if lo == 0 and start:
                            self.pss.complete_round = True
                        return w + i
        return None

    def _collect_hint(self) -> None:
        """ram_page_hint_collect(), under bitmap_mutex: the scan goes on just past the page
        the return-path thread last sent (10.1), and the hint is consumed."""
        if self.page_hint is None:
            return
        self.pss.page, self.page_hint = self.page_hint, None
        if TRACE_HINT_COLLECT.enabled:
            TRACE_HINT_COLLECT(rbname=RBNAME, page=self.pss.page)

    def migration_bitmap_sync(self) -> None:
        """QEMU's migration_bitmap_sync() copies the dirty log into the migration bitmap and
        counts dirty-sync-count. The emulator's bitmap is always live (vCPU writes set it at
        once), so a sync here is only the count, at QEMU's call sites: ram_init_bitmaps() at
        setup, ram_save_pending() in precopy (each completed round stands for the moment
        the remaining bytes fall under bandwidth x downtime-limit), and the switchover
        (ram_postcopy_send_discard_bitmap() or ram_save_complete()). Never in postcopy."""
        self.pss.complete_round = False
        self.board.add("dirty-sync-count", 1)

    def send_discard_bitmap(self, ep: Endpoint) -> None:
        """ram_postcopy_send_discard_bitmap(): at switchover the pages sent once and dirtied
        since are stale on the destination, which drops them. QEMU's last sync is here, and
        the scan starts again at the start of RAM (rs->last_page = 0)."""
        self.migration_bitmap_sync()
        with self.bitmap_mutex:
            self.pss.page = 0
            stale = np.flatnonzero(self.dirty & self.sent_once)
            self.states[stale] = UNSENT  # dropped on the other side: not in flight any more
        runs = _runs(stale)
        for i in range(0, len(runs), DISCARDS_PER_COMMAND):
            ranges = [(s * self.P, n * self.P) for s, n in runs[i:i + DISCARDS_PER_COMMAND]]
            ep.send([wire.discard_ranges(ranges)])

    def reload_bitmap(self, received: np.ndarray) -> None:
        """ram_dirty_bitmap_reload(): after a recovery every page the destination did not
        receive is dirty again (what was in flight is lost), a huge page break-huge left
        half sent included: it goes again whole (postcopy_preempt_reset())."""
        with self.bitmap_mutex:
            self.pss.preempted = None
            self.page_hint = None  # ram_state_reset(): ram_page_hint_reset()
            self.dirty |= ~received
            self.states[~received] = UNSENT

    def publish_remaining(self) -> None:
        """query-migrate's ram.remaining; counting a multi-GiB bitmap costs milliseconds, so
        at most ten times a second."""
        now = time.monotonic()
        if now - self._remaining_at > 0.1:
            self._remaining_at = now
            with self.bitmap_mutex:
                dirty = int(np.count_nonzero(self.dirty))
            self.board["remaining"] = dirty * self.P

    def _clear_dirty(self, page: int, count: int, code: int) -> None:
        """migration_bitmap_clear_dirty(), under bitmap_mutex: host pages [page, page + count)
        are this sender's now, going on the channel `code` names."""
        self.dirty[page:page + count] = False
        self.sent_once[page:page + count] = True
        self.states[page:page + count] = code

    # ---- the background stream ----

    def save_host_page(self, ep: Endpoint, page: int, counter: str, pacer: Pacer | None = None,
                       preempt: Endpoint | None = None,
                       rate_limit: Callable[[], object] | None = None) -> int:
        """ram_save_host_page(): host page `page` on `ep` (main), or with small pages the run
        of dirty pages it starts, as much as one record holds. pacer: charge the bytes to it.
        A huge page goes record by record, with QEMU's two checks between them: rate_limit
        (migration_rate_limit()) after each, and with preempt (break-huge) a request waiting
        before each interrupts the page (postcopy_do_preempt()), which the next
        resume_preempted() finishes. The host pages claimed (0 if another sender took it)."""
        count = self.claim_run(page)
        if not count:
            return 0
        try:
            if self.tpp == 1:  # QEMU rate-limits inside a host page only if it is huge
                self._write_pages(ep, page, count, counter, more=True, pacer=pacer)
            else:
                self._save_huge_page(ep, page, 0, counter, pacer, preempt, rate_limit)
        finally:
            self.main_page = None  # pss_host_page_finish()
        return count

    def resume_preempted(self, ep: Endpoint, counter: str, pacer: Pacer | None,
                         preempt: Endpoint | None,
                         rate_limit: Callable[[], object] | None) -> bool:
        """postcopy_preempt_restore(): go on with the huge page break-huge interrupted, and
        the scan after it. False if there is none."""
        if self.pss.preempted is None:
            return False
        page, start = self.pss.preempted
        self.pss.preempted = None
        if TRACE_PREEMPT_RESTORED.enabled:
            TRACE_PREEMPT_RESTORED(rbname=RBNAME, page=page, offset=_offset(page, start, self.tpp))
        self.pss.page = page + 1
        self._save_huge_page(ep, page, start, counter, pacer, preempt, rate_limit)
        return True

    def claim_run(self, page: int) -> int:
        """Host pages from `page` on are this sender's (one huge page, or a run of dirty small
        pages as much as a record holds); the scan goes on after them. How many."""
        with self.bitmap_mutex:
            if self.tpp == 1:  # small pages: one record carries a run of dirty pages
                run = self.dirty[page:page + self.piece]
                count = len(run) if run.all() else int(np.argmin(run))
            else:
                count = int(self.dirty[page])
            self._clear_dirty(page, count, SENT_MAIN)
            self.pss.page = page + max(count, 1)
            self.main_page = page if count else None  # pss_host_page_prepare()
        return count

    def _write_record(self, ep: Endpoint, offset: int, n: int, counter: str, more: bool,
                      pacer: Pacer | None, writer: RecordWriter | None = None) -> None:
        nbytes = (writer or self.writer).save_pages(ep, offset, n, counter, more)
        if pacer:  # counted as it is queued on main (qemu_put_buffer_async()); a zero page
            # costs its header only (ZERO_PAGE_BYTES)
            pacer.charge(nbytes)

    def _write_pages(self, ep: Endpoint, page: int, count: int, counter: str, more: bool = False,
                     pacer: Pacer | None = None, writer: RecordWriter | None = None) -> None:
        """Host pages [page, page + count), claimed, on `ep` in records of at most
        emulator.chunk, with no rate-limit step between them; the CPU time charged to
        `writer`'s thread (default the migration thread's)."""
        first = page * self.tpp
        total = count * self.tpp
        for start in range(0, total, self.piece):
            self._write_record(ep, (first + start) * TARGET_PAGE, min(self.piece, total - start),
                               counter, more, pacer, writer)
        self.publish_remaining()

    def _save_huge_page(self, ep: Endpoint, page: int, start: int, counter: str,
                        pacer: Pacer | None, preempt: Endpoint | None,
                        rate_limit: Callable[[], object] | None) -> None:
        """The do-while loop of ram_save_host_page() over huge page `page`, from its target
        page `start`, one record (QEMU: one 4 KiB piece) a turn."""
        for piece in range(start, self.tpp, self.piece):
            if preempt is not None and self.queue.nonempty.is_set():  # postcopy_needs_preempt()
                self._postcopy_do_preempt(page, piece)
                return
            self._write_record(ep, _offset(page, piece, self.tpp),
                               min(self.piece, self.tpp - piece), counter, True, pacer)
            if rate_limit:
                rate_limit()  # its answer ignored: an urgent wake-up goes on with the page
        self.publish_remaining()

    def _postcopy_do_preempt(self, page: int, piece: int) -> None:
        """Break-huge (x-postcopy-preempt-break-huge): a request waits, so leave huge page
        `page` at target page `piece`; the migration thread serves the queue, then comes back
        to it (resume_preempted())."""
        self.board.add("break-huge", 1)
        self.pss.preempted = (page, piece)
        if TRACE_PREEMPT_TRIGGERED.enabled:
            TRACE_PREEMPT_TRIGGERED(rbname=RBNAME, page=page, offset=_offset(page, piece, self.tpp))

    # ---- urgent pages ----

    def queue_pages(self, offset: int, length: int) -> None:
        """ram_save_queue_pages(): the destination asks for the host page at byte `offset`."""
        if offset >= self.ram_size:
            raise wire.ProtocolError(f"page request beyond RAM: offset {offset}")
        self.board.add("postcopy-requests", 1)
        page = offset // self.P
        if TRACE_QUEUE_PAGES.enabled:  # before the put: a sender may take it at once
            TRACE_QUEUE_PAGES(rbname=RBNAME, start=offset, len=length, page=page)
        self.queue.put(page, self.clock.now())

    def serve_queued_page(self, main: Endpoint, preempt: Preempt,
                          pacer: Pacer | None = None) -> bool:
        """get_queued_page() and send it: one request off the queue, its page on preempt
        (one of them, pick_preempt(); else on main, charged to `pacer`), unless it was sent
        already. The background scan
        goes on right after it, in both modes, as 7.1/7.2's ram_find_and_save_block() keeps
        the page get_queued_page() chose (a break-huge page is resumed first). False if the
        queue is empty. Taking the request off the queue is migration_consume_urgent_request():
        the migration thread's rate limit sees no urgent request once the queue is empty."""
        item = self.queue.pop()
        if item is None:
            return False
        main.flush()  # the background records gathered so far go first
        page = item[0]
        preempt = self.pick_preempt(preempt, page)
        ep, code = (preempt, SENT_PREEMPT) if preempt else (main, SENT_URGENT_MAIN)
        with self.bitmap_mutex:
            dirty = bool(self.dirty[page])
            if dirty:
                self._clear_dirty(page, 1, code)
                self.pss.page = page + 1  # the guest will likely touch the neighbours next
        if not dirty:
            # already sent (maybe still in flight, maybe the host page being sent on main):
            # QEMU drops such requests too
            self.board.add("dropped-requests", 1)
            if TRACE_NOT_DIRTY.enabled:
                TRACE_NOT_DIRTY(rbname=RBNAME, offset=page * self.P, page=page)
            return True
        if TRACE_QUEUED_PAGE.enabled:
            TRACE_QUEUED_PAGE(rbname=RBNAME, offset=page * self.P, page=page, channel=ep.name)
        # whole, at once: its request stays queued (rate_limit_sem posted) while it goes, so
        # any rate-limit step inside it returns at once; only main's bytes count
        self._write_pages(ep, page, 1, "postcopy-bytes", pacer=None if preempt else pacer)
        self.board.add("urgent-preempt" if preempt else "urgent-main", 1)
        return True


    def pick_preempt(self, preempt: Preempt, page: int) -> Endpoint | None:
        """The preempt channel urgent host page `page` goes on: the one there is, or with
        migration.x-preempt-channels round robin over them (its one sender, the migration
        thread in 7.1 or the return-path thread from 8.0, calls this: no lock). None: none."""
        if not isinstance(preempt, (list, tuple)):
            return preempt  # one endpoint, or None
        if len(preempt) < 2:
            return preempt[0] if preempt else None
        ep = preempt[self._next_preempt % len(preempt)]
        self._next_preempt += 1
        if TRACE_PREEMPT_CHANNEL.enabled:
            TRACE_PREEMPT_CHANNEL(rbname=RBNAME, page=page, channel=ep.name,
                                  policy="round-robin")
        return ep

    def save_host_page_urgent(self, preempt: Preempt, offset: int, writer: RecordWriter) -> None:
        """QEMU 8.0's ram_save_queue_pages() in preempt mode, on the return-path thread: the
        requested host page at byte `offset` goes at once on preempt, never queued, so neither
        the migration thread nor its rate limit stands in the way; its CPU time is the
        return-path thread's (`writer`). bitmap_mutex is held across the send, as
        ram_save_host_page_urgent() is called with it; the migration thread never holds it
        while it writes or sleeps ("Yield bitmap_mutex properly when sending/sleeping"), so
        the two contend only for the claims. A page main is sending is left to main
        (pss_overlap()); one already sent is not sent again. 10.1: a page sent hints the
        background scan to go on just past it (ram_page_hint_update())."""
        if offset >= self.ram_size:
            raise wire.ProtocolError(f"page request beyond RAM: offset {offset}")
        self.board.add("postcopy-requests", 1)
        page = offset // self.P
        if TRACE_SEND_HOST_PAGE.enabled:
            TRACE_SEND_HOST_PAGE(rbname=RBNAME, page=page)
        with self.bitmap_mutex:
            if page == self.main_page:
                if TRACE_PREEMPT_HIT.enabled:
                    TRACE_PREEMPT_HIT(rbname=RBNAME, offset=page * self.P)
                self.board.add("dropped-requests", 1)
                return
            dirty, sent_once, states = self._one
            if not dirty[page]:
                self.board.add("dropped-requests", 1)  # sent already, maybe still in flight
                return
            dirty[page], sent_once[page], states[page] = False, True, SENT_PREEMPT  # _clear_dirty
            preempt = self.pick_preempt(preempt, page)
            for piece in range(0, self.tpp, self.piece):
                self._write_record(preempt, _offset(page, piece, self.tpp),
                                   min(self.piece, self.tpp - piece), "postcopy-bytes", False,
                                   None, writer)
            preempt.flush()  # "For urgent requests, flush immediately if sent"
            self.board.add("urgent-preempt", 1)
            if self.hints:
                self._update_hint(page + 1)
        self.publish_remaining()

    def _update_hint(self, page: int) -> None:
        """ram_page_hint_update(), under bitmap_mutex: only if the last hint was consumed
        ("there's no point queuing hints when we only have one linear scanner")."""
        if self.page_hint is not None:
            return
        self.page_hint = page % len(self.dirty)
        if TRACE_HINT_UPDATE.enabled:
            TRACE_HINT_UPDATE(rbname=RBNAME, page=self.page_hint)


def _offset(page: int, piece: int, tpp: int) -> int:
    """Byte offset of target page `piece` of host page `page`."""
    return (page * tpp + piece) * TARGET_PAGE


def _runs(pages: np.ndarray) -> list[tuple[int, int]]:
    """Sorted page numbers -> (first, count) of each run of consecutive pages."""
    if not len(pages):
        return []
    breaks = np.flatnonzero(np.diff(pages) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [len(pages)]))
    return [(int(pages[s]), int(e - s)) for s, e in zip(starts, ends, strict=True)]
