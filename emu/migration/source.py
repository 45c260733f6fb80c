"""The source: holds guest RAM, runs the guest until switchover, and streams RAM.

Threads, as QEMU names them: the migration thread (precopy, switchover, then postcopy: serve
the request queue first, else the next dirty page), the return-path thread (parses the
destination's messages and queues page requests) and the vCPU threads. As in QEMU 7.1 the
migration thread also sends the urgent pages on the preempt channel, so while it is blocked
writing the main channel, urgent pages wait too.
"""

from __future__ import annotations

import threading
import time

import numpy as np

from emu.board import Board
from emu.child import start_thread
from emu.clock import Clock
from emu.config import Config
from emu.migration import ram as R
from emu.migration import wire
from emu.migration.page_requests import PageRequestQueue
from emu.migration.states import FINAL, StateLog, after_failure, pause_refusal
from emu.migration.workload import Memory, VCpu, Workload
from emu.net import channel, uri
from emu.net.channel import ChannelError, Endpoint

FIELDS = ("transferred", "precopy-bytes", "downtime-bytes", "postcopy-bytes", "normal",
          "normal-bytes", "dirty-sync-count", "postcopy-requests", "remaining", "setup-time",
          "downtime", "total-time", "urgent-main", "urgent-preempt", "dropped-requests",
          "break-huge", "pongs")
SCAN = 1 << 16  # dirty-bitmap window searched at once
DISCARDS_PER_COMMAND = 4000
# where a broken channel pauses the migration instead of failing it (postcopy_pause())
PAUSES = ("postcopy-active", "postcopy-recover-setup", "postcopy-recover")


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
        if not self.rate or self.sent < self.rate * self.WINDOW:
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
    def __init__(self, control, bufs: dict, cfg: Config) -> None:
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
        self.main: Endpoint | None = None
        self.preempt: Endpoint | None = None
        self.lock = threading.Lock()
        self.pos = 0  # where the background scan goes on (PageSearchStatus)
        self._remaining_at = 0.0
        self.switchover = threading.Event()
        self.quit = threading.Event()
        self.resumed = threading.Event()  # set again when a recovery has finished
        self.bitmap_received = threading.Event()
        self.resume_ack = threading.Event()
        self.shut = threading.Event()  # the destination is done (MIG_RP_MSG_SHUT)
        self.workloads = [Workload(cfg, v) for v in range(cfg["guest.vcpus"])]
        self.vcpus: list[VCpu] = []  # the running vCPU threads
        self.vcpu_stop = threading.Event()
        self.vcpu_lock = threading.Lock()
        self.guest_running = True  # QMP stop/cont: the vCPUs run only while this holds
        # migrate-set-parameters changes them while the migration runs, as in QEMU
        self.rates = {"max-bandwidth": cfg["migration.max-bandwidth"],
                      "max-postcopy-bandwidth": cfg["migration.max-postcopy-bandwidth"]}
        self.pacer: tuple[str, Pacer] | None = None  # the rate cap in force, by parameter

    # ---- commands ----

    def migrate(self, address: str) -> None:
        """migrate: connect to the destination (through the link) and start streaming."""
        if not self.state.set("none", "setup"):  # migrate_init(): one migration per source
            return
        try:
            self._connect(address)
        except (OSError, ChannelError) as err:
            self.control.fail(f"source: cannot connect to {address}: {err}")
            self.state.set("setup", "failed")  # migrate_fd_error()
            return
        with self.vcpu_lock:
            if self.guest_running:
                self._start_vcpus()
        start_thread("migration", self._migration_thread)

    def resume(self, address: str) -> None:
        """migrate with resume=true: reconnect and run the recovery handshake."""
        if self.state.status != "postcopy-paused":
            self.control.emit(("refused", "migrate", "Cannot resume if there is no paused "
                               "migration"))
            return
        start_thread("resume", self._resume, address)

    def pause(self) -> None:
        """migrate-pause: break the channels on purpose; both sides go to postcopy-paused."""
        if refusal := pause_refusal(self.state.status):
            self.control.emit(("refused", "migrate-pause", refusal))
            return
        self._channel_failed("migrate-pause")

    def start_postcopy(self) -> None:
        self.switchover.set()

    def cancel(self) -> None:
        """migrate_cancel before postcopy: give up; the guest goes on running here."""
        with self.lock:
            _, new = self.state.settle(
                lambda status: "cancelling" if status in ("setup", "active") else None)
        if new:
            self._close_channels()

    def stop_guest(self) -> None:
        """QMP stop: pause the vCPUs; they keep their place in the workload."""
        with self.vcpu_lock:
            self.guest_running = False
            self._stop_vcpus()

    def cont_guest(self) -> None:
        """QMP cont: run the vCPUs again, until the switchover stops them for good."""
        with self.vcpu_lock:
            if self.guest_running or self.switchover.is_set():
                return
            self.guest_running = True
            if self.state.status != "none":  # before migrate, migrate starts them
                self._start_vcpus()

    def set_parameters(self, rates: dict[str, float]) -> None:
        """migrate-set-parameters: a new rate cap applies at once, as in QEMU."""
        self.rates.update(rates)
        if self.pacer and self.pacer[0] in rates:
            self.pacer[1].rate = rates[self.pacer[0]]

    def shutdown(self) -> None:
        self.quit.set()
        self.vcpu_stop.set()
        self.switchover.set()
        self._close_channels()

    # ---- connections ----

    def _connect(self, address: str) -> None:
        window, wakeup = self.cfg["link.socket-buffer"], self.cfg["link.write-wakeup"]
        main = Endpoint(uri.connect(address), window, "main", wakeup=wakeup)
        main.send([channel.MAIN_HELLO])
        preempt = None
        if self.cfg["migration.postcopy-preempt"]:
            preempt = Endpoint(uri.connect(address), window, "preempt", wakeup=wakeup)
            preempt.send([channel.PREEMPT_HELLO])
        with self.lock:
            self.main, self.preempt = main, preempt
        start_thread("return-path", self._return_path_thread, main)
        if preempt:
            preempt.read_credits_in_background(
                lambda err: self._channel_failed(f"preempt channel: {err}", preempt))

    def _close_channels(self) -> None:
        with self.lock:
            eps = (self.main, self.preempt)
        for ep in eps:
            if ep:
                ep.close()

    def _channel_failed(self, reason: str, ep: Endpoint | None = None) -> None:
        """A channel broke. In postcopy the guest's memory is split between the hosts, so
        the migration pauses and waits for recovery; before that, it fails."""
        with self.lock:
            if ep is not None and (ep.closed or ep not in (self.main, self.preempt)):
                return  # a connection already given up (a recovery may be using new ones)
            _, new = self.state.settle(lambda status: after_failure(status, PAUSES))
            if new == "postcopy-paused":  # postcopy_pause()
                self.resumed.clear()
                self.queue.clear()  # lost: the destination asks again after resuming
                self.control.emit(("paused", "source", reason))
            elif new == "failed":
                self.control.fail(f"source: {reason}")
            broken = (self.main, self.preempt)  # not what a recovery connects meanwhile
        for channel_ep in broken:
            if channel_ep:
                channel_ep.close()

    # ---- migration thread ----

    def _migration_thread(self) -> None:
        try:
            self._migrate()
        except ChannelError as err:
            self._channel_failed(str(err))
        self.control.emit(("report", "source", {"states": self.state.changes,
                                                "board": self.board.snapshot()}))

    def _migrate(self) -> None:
        t0 = self.clock.now()
        self.main.send([wire.command(wire.MIG_CMD_OPEN_RETURN_PATH)])
        if self.cfg["migration.postcopy-ram"]:
            self.main.send([wire.command(wire.MIG_CMD_POSTCOPY_ADVISE)])
        self.board["setup-time"] = self.clock.now() - t0
        self.state.set("setup", "active")  # migration_thread()
        self._precopy()
        if self.state.status == "cancelling":
            self.state.set("cancelling", "cancelled")  # migrate_fd_cleanup()
            return
        if self.cfg["migration.postcopy-ram"]:
            if not self._start_postcopy():
                return
            self._postcopy()
            last = "postcopy-active"
        else:
            if not self._stop_and_copy():
                return
            self._send_eofs()
            if not self._wait_for(self.shut):
                return
            last = "device"
        if self.state.status in FINAL or self.quit.is_set():
            return
        self.board["remaining"] = 0
        self.board["total-time"] = self.clock.now() - t0
        self.state.set(last, "completed")  # migration_completion_end()

    def _precopy(self) -> None:
        pacer = self._pacer("max-bandwidth")
        while not self.switchover.is_set() and self.state.status != "cancelling":
            page = self._next_dirty()
            if page is None:
                self.main.flush()
                self.switchover.wait(0.01)  # all clean: wait for the guest to dirty something
                continue
            self._wait_pacer(pacer)
            self._send_background(page, pacer, "precopy-bytes", None)
        self.main.flush()

    def _start_postcopy(self) -> bool:
        """migrate-start-postcopy: stop the guest, discard, device state, run on the other side.
        False if the migration failed or was cancelled meanwhile."""
        t_stop = self.clock.now()
        if not self.state.set("active", "device"):  # migration_switchover_prepare()
            return False
        with self.vcpu_lock:
            self._stop_vcpus()
        stale = np.flatnonzero(self.dirty & self.sent_once)
        self.states[stale] = R.UNSENT  # dropped on the other side: not in flight any more
        runs = _runs(stale)
        for i in range(0, len(runs), DISCARDS_PER_COMMAND):
            ranges = [(s * self.P, n * self.P) for s, n in runs[i:i + DISCARDS_PER_COMMAND]]
            self.main.send([wire.discard_ranges(ranges)])
        # postcopy_start(): pings 2 and 3 around the device state "help line traces up"
        self.main.send([wire.ping(2)])
        self.main.send([wire.command(wire.MIG_CMD_POSTCOPY_LISTEN)])
        self.main.send([wire.device_state({"vcpus": [w.pos for w in self.workloads]})])
        self.main.send([wire.ping(3)])
        self.main.send([wire.command(wire.MIG_CMD_POSTCOPY_RUN)])
        self.board["downtime"] = self.clock.now() - t_stop
        self.resumed.set()  # before the change: a pause right after it clears it again
        return self.state.set("device", "postcopy-active")  # postcopy_start()

    def _postcopy(self) -> None:
        """Stream until the destination has it all, pausing and resuming across failures."""
        while not self.quit.is_set():
            main = self.main  # a failure noticed late must not break a recovery's new channels
            try:
                self._postcopy_stream()
                if self._wait_for(self.shut):
                    return
            except ChannelError as err:
                self._channel_failed(str(err), main)
            while not self.resumed.wait(0.1):
                if self.quit.is_set():
                    return

    def _postcopy_stream(self) -> None:
        pacer = self._pacer("max-postcopy-bandwidth")
        break_huge = (self.preempt is not None and self.tpp > 1
                      and self.cfg["migration.x-postcopy-preempt-break-huge"])
        while True:
            if self._serve_request():
                continue
            page = self._next_dirty()
            if page is None:
                break
            self._send_background(page, pacer, "postcopy-bytes",
                                  self._serve_queue if break_huge else None)
            self._wait_pacer(pacer)
        self._send_eofs()

    def _send_eofs(self) -> None:
        for ep in (self.main, self.preempt):
            if ep:
                ep.send([wire.eof()])

    def _wait_for(self, event: threading.Event) -> bool:
        """Wait for a reply from the destination; False if the channels broke meanwhile."""
        while not event.wait(0.05):
            if self.quit.is_set() or self.state.status in ("postcopy-paused", "failed"):
                return False
        return True

    def _stop_and_copy(self) -> bool:
        t_stop = self.clock.now()
        if not self.state.set("active", "device"):  # migration_switchover_prepare()
            return False
        with self.vcpu_lock:
            self._stop_vcpus()
        while (page := self._next_dirty()) is not None:
            self._send_background(page, None, "downtime-bytes", None)
        self.main.send([wire.device_state({"vcpus": [w.pos for w in self.workloads]})])
        self.board["downtime"] = self.clock.now() - t_stop
        return True

    def _start_vcpus(self) -> None:
        """Run the vCPUs from where their workloads stand (a thread runs once: new ones)."""
        self.vcpu_stop = threading.Event()
        memory = SourceMemory(self.ram, self.dirty, self.tpp)
        self.vcpus = [VCpu(v, w, memory, self.clock, self.cfg["workload.touch-cost"],
                           self.vcpu_stop) for v, w in enumerate(self.workloads)]
        for vcpu in self.vcpus:
            vcpu.start()

    def _stop_vcpus(self) -> None:
        self.vcpu_stop.set()
        for vcpu in self.vcpus:
            vcpu.join()
        self.vcpus = []

    def _pacer(self, parameter: str) -> Pacer:
        pacer = Pacer(self.rates[parameter])
        self.pacer = (parameter, pacer)
        return pacer

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
        self.main.flush()  # the background records gathered so far go first
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
            self.main.flush()
            self.queue.nonempty.wait(min(wait, 0.01))

    # ---- sending ----

    def _send_background(self, page: int, pacer: Pacer | None, counter: str,
                         between) -> None:
        count = 1
        if self.tpp == 1:  # small pages: one record carries a run of dirty pages
            run = self.dirty[page:page + self.piece]
            count = len(run) if run.all() else int(np.argmin(run))
        self._send(page, count, self.main, R.SENT_MAIN, counter, between, more=True)
        if pacer:
            pacer.charge(self.clock.now(), count * self.P)
        self.pos = page + count

    def _send(self, page: int, count: int, ep: Endpoint, code: int, counter: str,
              between=None, more: bool = False) -> None:
        """Send host pages [page, page + count) on `ep`, in records of at most emulator.chunk;
        `between` runs before every record but the first (the break-huge check). more: the
        background stream, whose records may gather in the endpoint (Endpoint.send)."""
        self.dirty[page:page + count] = False
        self.sent_once[page:page + count] = True
        self.states[page:page + count] = code
        first = page * self.tpp
        total = count * self.tpp
        for start in range(0, total, self.piece):
            if start and between:
                between()
            n = min(self.piece, total - start)
            self._write_record(ep, (first + start) * R.TARGET_PAGE, n, counter, more)
        self._publish_remaining()

    def _publish_remaining(self) -> None:
        """query-migrate's ram.remaining; counting a multi-GiB bitmap costs milliseconds, so
        at most ten times a second."""
        now = time.monotonic()
        if now - self._remaining_at > 0.1:
            self._remaining_at = now
            self.board["remaining"] = int(np.count_nonzero(self.dirty)) * self.P

    def _write_record(self, ep: Endpoint, offset: int, n: int, counter: str,
                      more: bool) -> None:
        header = wire.ram_header(offset, n, wire.RAM_SAVE_FLAG_PAGE | wire.RAM_SAVE_FLAG_CONTINUE)
        size = n * R.TARGET_PAGE
        if self.ram is not None:
            # straight from guest RAM: a page the guest writes meanwhile is re-dirtied and
            # sent again, as in QEMU
            ep.send([header, self.raw[offset:offset + size]], more=more)
        else:
            ep.send([header], virt=size, more=more)
        b = self.board
        b.add("transferred", size + len(header))
        b.add(counter, size + len(header))
        b.add("normal", n)
        b.add("normal-bytes", size)

    # ---- recovery ----

    def _resume(self, address: str) -> None:
        """QEMU's recovery handshake: reconnect, RECV_BITMAP (every page the destination did
        not receive becomes dirty again: what was in flight is lost), POSTCOPY_RESUME,
        RESUME_ACK. A failure anywhere goes back to postcopy-paused. A new connection can
        break as soon as it is made (its reader thread then pauses the migration): each step
        changes the state only from the one before it, so that pause is never overwritten."""
        if not self.state.set("postcopy-paused", "postcopy-recover-setup"):  # migrate_prepare()
            return
        self.bitmap_received.clear()
        self.resume_ack.clear()
        try:
            self._connect(address)
            # migrate_fd_connect()
            if not self.state.set("postcopy-recover-setup", "postcopy-recover"):
                return
            self.main.send([wire.command(wire.MIG_CMD_RECV_BITMAP, bytes([len(wire.BLOCK)])
                                         + wire.BLOCK)])
            if not self._wait_for(self.bitmap_received):
                return
            self.main.send([wire.command(wire.MIG_CMD_POSTCOPY_RESUME)])
            if not self._wait_for(self.resume_ack):
                return
        except (OSError, ChannelError) as err:
            self._channel_failed(f"recovery: {err}")
            return
        with self.lock:  # a pause clears `resumed` under this lock: it must come after this
            if self.state.set("postcopy-recover", "postcopy-active"):
                self.resumed.set()  # migrate_handle_rp_resume_ack()

    # ---- return-path thread ----

    def _return_path_thread(self, ep: Endpoint) -> None:
        try:
            while True:
                kind, data = wire.decode_rp(ep.recv())
                self._rp_message(kind, data)
        except (ChannelError, wire.ProtocolError) as err:
            if not self.shut.is_set():
                self._channel_failed(f"return path: {err}", ep)

    def _rp_message(self, kind: int, data: bytes) -> None:
        if kind in (wire.MIG_RP_MSG_REQ_PAGES, wire.MIG_RP_MSG_REQ_PAGES_ID):
            offset, _length = wire.parse_req_pages(kind, data)
            if offset >= self.cfg["guest.ram"]:
                raise wire.ProtocolError(f"page request beyond RAM: offset {offset}")
            self.board.add("postcopy-requests", 1)
            self.queue.put(offset // self.P, self.clock.now())
        elif kind == wire.MIG_RP_MSG_RECV_BITMAP:
            received = wire.parse_recv_bitmap(data, self.cfg.npages)
            self.dirty |= ~received
            self.states[~received] = R.UNSENT
            self.bitmap_received.set()
        elif kind == wire.MIG_RP_MSG_RESUME_ACK:
            self.resume_ack.set()
        elif kind == wire.MIG_RP_MSG_SHUT:
            self.shut.set()
        elif kind == wire.MIG_RP_MSG_PONG:
            self.board.add("pongs", 1)  # QEMU traces it: source_return_path_thread_pong


def _runs(pages: np.ndarray) -> list[tuple[int, int]]:
    """Sorted page numbers -> (first, count) of each run of consecutive pages."""
    if not len(pages):
        return []
    breaks = np.flatnonzero(np.diff(pages) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [len(pages)]))
    return [(int(pages[s]), int(e - s)) for s, e in zip(starts, ends, strict=True)]


def main(control, bufs: dict, cfg: Config) -> None:
    src = Source(control, bufs, cfg)
    control.serve({"migrate": src.migrate, "migrate-resume": src.resume,
                   "migrate-pause": src.pause, "migrate-start-postcopy": src.start_postcopy,
                   "migrate_cancel": src.cancel, "stop": src.stop_guest, "cont": src.cont_guest,
                   "migrate-set-parameters": src.set_parameters})
    src.shutdown()
