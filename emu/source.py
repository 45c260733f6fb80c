"""The source: holds guest RAM, runs the guest until switchover, and streams RAM.

Threads, as QEMU names them: the migration thread (precopy, switchover, then postcopy: serve
the request queue first, else the next dirty page), the return-path thread (parses the
destination's messages and queues page requests) and the vCPU threads. As in QEMU 7.1 the
migration thread also sends the urgent pages on the preempt channel, so while it is blocked
writing the main channel, urgent pages wait too.
"""

from __future__ import annotations

import threading

import numpy as np

from emu import ram as R
from emu import wire
from emu.channel import ChannelError, Endpoint
from emu.clock import Clock
from emu.page_requests import PageRequestQueue
from emu.states import StateLog
from emu.status import Board
from emu.workload import Memory, VCpu, Workload

FIELDS = ("transferred", "precopy-bytes", "downtime-bytes", "postcopy-bytes", "normal",
          "normal-bytes", "dirty-sync-count", "postcopy-requests", "remaining", "setup-time",
          "downtime", "total-time", "urgent-main", "urgent-preempt", "dropped-requests",
          "break-huge")
SCAN = 1 << 16  # dirty-bitmap window searched at once
DISCARDS_PER_COMMAND = 4000


class Pacer:
    """A rate cap in emulated time (max-bandwidth, max-postcopy-bandwidth; 0 = none), the way
    QEMU applies it: at most rate x 100 ms of bytes in each 100 ms window (BUFFER_DELAY), then
    wait for the next window."""

    WINDOW = 0.1

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.start = -self.WINDOW
        self.sent = 0

    def charge(self, now: float, nbytes: int) -> None:
        if now >= self.start + self.WINDOW:
            self.start, self.sent = now, 0
        self.sent += nbytes

    @property
    def t(self) -> float:
        """When the stream may go on."""
        if self.sent < self.rate * self.WINDOW:
            return self.start
        return self.start + self.WINDOW


class SourceMemory(Memory):
    def __init__(self, ram: np.ndarray | None, dirty: np.ndarray, tpp: int) -> None:
        self.ram = ram
        self.dirty = dirty
        self.tpp = tpp

    def first_missing(self, pages: np.ndarray) -> int:
        return len(pages)  # the source has all of its RAM

    def touched(self, vcpu: int, pages: np.ndarray) -> None:
        self.dirty[pages // self.tpp] = True


class Source:
    def __init__(self, control, bufs: dict, cfg, main_sock, preempt_sock) -> None:
        self.control = control
        self.cfg = cfg
        self.clock = Clock(bufs["clock"])
        self.board = Board(FIELDS, bufs["src-board"])
        self.P = cfg.page_size
        self.tpp = cfg.target_pages_per_host_page
        self.piece = cfg["emulator.chunk"] // R.TARGET_PAGE  # target pages per record at most
        self.raw = bufs["src-ram"]
        ntarget = cfg["guest.ram"] // R.TARGET_PAGE
        self.ram = None
        if cfg["emulator.payload"]:
            self.ram = np.ndarray((ntarget, R.TARGET_PAGE), np.uint8, buffer=self.raw)
            R.stamp(self.ram)
        self.states = np.ndarray((cfg.npages,), np.uint8, buffer=bufs["src-states"])
        self.dirty = np.ones(cfg.npages, bool)  # nothing has been sent yet
        self.sent_once = np.zeros(cfg.npages, bool)
        self.queue = PageRequestQueue(bufs["src-queue"])
        self.state = StateLog("source", self.clock.now, control.emit)
        window = cfg["link.socket-buffer"]
        self.main = Endpoint(main_sock, window, "main")
        self.preempt = None
        if cfg["migration.postcopy-preempt"]:
            self.preempt = Endpoint(preempt_sock, window, "preempt")
            self.preempt.read_credits_in_background()
        self.pos = 0  # where the background scan goes on (PageSearchStatus)
        self.switchover = threading.Event()
        self.vcpu_stop = threading.Event()
        self.vcpus = [VCpu(v, Workload(cfg, v), SourceMemory(self.ram, self.dirty, self.tpp),
                           self.clock, cfg["workload.touch-cost"], self.vcpu_stop)
                      for v in range(cfg["guest.vcpus"])]

    # ---- commands ----

    def migrate(self) -> None:
        for vcpu in self.vcpus:
            vcpu.start()
        threading.Thread(target=self._migration_thread, name="migration", daemon=True).start()
        threading.Thread(target=self._return_path_thread, name="return-path",
                         daemon=True).start()

    def start_postcopy(self) -> None:
        self.switchover.set()

    def shutdown(self) -> None:
        self.vcpu_stop.set()
        self.switchover.set()
        for ep in (self.main, self.preempt):
            if ep:
                ep.close()

    # ---- migration thread ----

    def _migration_thread(self) -> None:
        try:
            self._migrate()
        except ChannelError as err:
            if self.state.status not in ("completed", "failed"):
                self.control.fail(f"source: {err}")
                self.state.set("failed")
        self.control.emit(("report", "source", {"states": self.state.changes,
                                                "board": self.board.snapshot()}))

    def _migrate(self) -> None:
        t0 = self.clock.now()
        self.state.set("setup")
        self.main.send([wire.command(wire.MIG_CMD_OPEN_RETURN_PATH)])
        if self.cfg["migration.postcopy-ram"]:
            self.main.send([wire.command(wire.MIG_CMD_POSTCOPY_ADVISE)])
        self.board["setup-time"] = self.clock.now() - t0
        self.state.set("active")
        self._precopy()
        if self.cfg["migration.postcopy-ram"]:
            self._start_postcopy()
            self._postcopy()
        else:
            self._stop_and_copy()
        for ep in (self.main, self.preempt):
            if ep:
                ep.send([wire.eof()])
        self.board["remaining"] = 0
        self.board["total-time"] = self.clock.now() - t0
        self.state.set("completed")

    def _precopy(self) -> None:
        pacer = Pacer(self.cfg["migration.max-bandwidth"])
        while not self.switchover.is_set():
            page = self._next_dirty()
            if page is None:
                self.switchover.wait(0.01)  # all clean: wait for the guest to dirty something
                continue
            self._wait_pacer(pacer)
            self._send_background(page, pacer, "precopy-bytes", None)

    def _start_postcopy(self) -> None:
        """migrate-start-postcopy: stop the guest, discard, device state, run on the other side."""
        t_stop = self.clock.now()
        self.state.set("device")
        self._stop_vcpus()
        stale = np.flatnonzero(self.dirty & self.sent_once)
        runs = _runs(stale)
        for i in range(0, len(runs), DISCARDS_PER_COMMAND):
            ranges = [(s * self.P, n * self.P) for s, n in runs[i:i + DISCARDS_PER_COMMAND]]
            self.main.send([wire.discard_ranges(ranges)])
        self.main.send([wire.command(wire.MIG_CMD_POSTCOPY_LISTEN)])
        self.main.send([wire.device_state({"vcpus": [v.workload.pos for v in self.vcpus]})])
        self.main.send([wire.command(wire.MIG_CMD_POSTCOPY_RUN)])
        self.board["downtime"] = self.clock.now() - t_stop
        self.state.set("postcopy-active")

    def _postcopy(self) -> None:
        pacer = Pacer(self.cfg["migration.max-postcopy-bandwidth"])
        break_huge = (self.preempt is not None and self.tpp > 1
                      and self.cfg["migration.x-postcopy-preempt-break-huge"])
        while True:
            if self._serve_request():
                continue
            page = self._next_dirty()
            if page is None:
                return
            self._send_background(page, pacer, "postcopy-bytes",
                                  self._serve_queue if break_huge else None)
            self._wait_pacer(pacer)

    def _stop_and_copy(self) -> None:
        t_stop = self.clock.now()
        self.state.set("device")
        self._stop_vcpus()
        while (page := self._next_dirty()) is not None:
            self._send_background(page, None, "downtime-bytes", None)
        self.main.send([wire.device_state({"vcpus": [v.workload.pos for v in self.vcpus]})])
        self.board["downtime"] = self.clock.now() - t_stop

    def _stop_vcpus(self) -> None:
        self.vcpu_stop.set()
        for vcpu in self.vcpus:
            vcpu.join()

    # ---- page selection ----

    def _next_dirty(self) -> int | None:
        """First dirty host page at or after self.pos, wrapping around once."""
        n = len(self.dirty)
        start = self.pos % n
        for lo, hi in ((start, n), (0, start)):
            for w in range(lo, hi, SCAN):
                window = self.dirty[w:min(w + SCAN, hi)]
                i = int(np.argmax(window))
                if window[i]:
                    if lo == 0 and start:
                        self.board.add("dirty-sync-count", 1)
                    return w + i
        return None

    def _serve_request(self) -> bool:
        """Take one request off the queue and send its page; False if the queue is empty."""
        item = self.queue.pop()
        if item is None:
            return False
        page = item[0]
        if not self.dirty[page]:
            # already sent (maybe still in flight, maybe the host page being sent on main):
            # QEMU drops such requests too
            self.board.add("dropped-requests", 1)
        elif self.preempt:
            self._send(page, 1, self.preempt, R.SENT_PREEMPT, "postcopy-bytes")
            self.board.add("urgent-preempt", 1)
        else:
            self._send(page, 1, self.main, R.SENT_URGENT_MAIN, "postcopy-bytes")
            self.board.add("urgent-main", 1)
            self.pos = page + 1  # the guest will likely touch the neighbours next
        return True

    def _serve_queue(self) -> None:
        """Break-huge: between two pieces of a huge page on main, serve what waits."""
        if self.queue.nonempty.is_set():
            self.board.add("break-huge", 1)
            while self._serve_request():
                pass

    def _wait_pacer(self, pacer: Pacer) -> None:
        """Hold the background stream to its rate cap. Urgent requests do not wait: QEMU wakes
        the rate-limited migration thread for them (migration_make_urgent_request)."""
        if not pacer.rate:
            return
        while (wait := self.clock.real_wait(pacer.t)) > 0:
            if self.state.status == "postcopy-active":
                if self._serve_request():
                    continue
            elif self.switchover.is_set():
                return
            self.queue.nonempty.wait(min(wait, 0.01))

    # ---- sending ----

    def _send_background(self, page: int, pacer: Pacer | None, counter: str,
                         between) -> None:
        count = 1
        if self.tpp == 1:  # small pages: one record carries a run of dirty pages
            run = self.dirty[page:page + self.piece]
            count = len(run) if run.all() else int(np.argmin(run))
        self._send(page, count, self.main, R.SENT_MAIN, counter, between)
        if pacer:
            pacer.charge(self.clock.now(), count * self.P)
        self.pos = page + count

    def _send(self, page: int, count: int, ep: Endpoint, code: int, counter: str,
              between=None) -> None:
        """Send host pages [page, page + count) on `ep`, in records of at most emulator.chunk;
        `between` runs before every record but the first (the break-huge check)."""
        self.dirty[page:page + count] = False
        self.sent_once[page:page + count] = True
        self.states[page:page + count] = code
        first = page * self.tpp
        total = count * self.tpp
        for start in range(0, total, self.piece):
            if start and between:
                between()
            n = min(self.piece, total - start)
            self._write_record(ep, (first + start) * R.TARGET_PAGE, n, counter)
        self.board["remaining"] = int(np.count_nonzero(self.dirty)) * self.P

    def _write_record(self, ep: Endpoint, offset: int, n: int, counter: str) -> None:
        header = wire.ram_header(offset, n, wire.RAM_SAVE_FLAG_PAGE | wire.RAM_SAVE_FLAG_CONTINUE)
        size = n * R.TARGET_PAGE
        if self.ram is not None:
            ep.send([header, self.raw[offset:offset + size]])
        else:
            ep.send([header], virt=size)
        b = self.board
        b.add("transferred", size + len(header))
        b.add(counter, size + len(header))
        b.add("normal", n)
        b.add("normal-bytes", size)

    # ---- return-path thread ----

    def _return_path_thread(self) -> None:
        try:
            while True:
                kind, data = wire.decode_rp(self.main.recv())
                if kind in (wire.MIG_RP_MSG_REQ_PAGES, wire.MIG_RP_MSG_REQ_PAGES_ID):
                    offset, _length = wire.parse_req_pages(kind, data)
                    self.board.add("postcopy-requests", 1)
                    self.queue.put(offset // self.P, self.clock.now())
        except (ChannelError, wire.ProtocolError) as err:
            if self.state.status not in ("completed", "failed", "none"):
                self.control.fail(f"source return path: {err}")


def _runs(pages: np.ndarray) -> list[tuple[int, int]]:
    """Sorted page numbers -> (first, count) of each run of consecutive pages."""
    if not len(pages):
        return []
    breaks = np.flatnonzero(np.diff(pages) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [len(pages)]))
    return [(int(pages[s]), int(e - s)) for s, e in zip(starts, ends, strict=True)]


def main(control, bufs: dict, cfg, main_sock, preempt_sock) -> None:
    src = Source(control, bufs, cfg, main_sock, preempt_sock)
    control.serve({"migrate": src.migrate, "migrate-start-postcopy": src.start_postcopy})
    src.shutdown()
