"""The destination: receives guest RAM and, after switchover, runs the guest on it.

Threads, as QEMU names them: the listen thread reads the main channel, the preempt thread the
preempt channel (both place pages), the fault thread turns vCPU faults into page requests on the
return path, and the vCPU threads run the workload and block on pages that are not present.
Connections come in on the address of migrate-incoming (and of migrate-recover after a failure);
the hello in each connection's first frame says which channel it is.

During postcopy, a broken channel pauses the migration (postcopy-paused) instead of failing it:
the guest keeps running here, and only vCPUs touching missing pages stay blocked.
"""

from __future__ import annotations

import queue
import socket
import threading

import numpy as np

from emu import channel, shm, uri, wire
from emu import ram as R
from emu.channel import ChannelError, Endpoint
from emu.clock import Clock
from emu.metrics import FAULT_DTYPE, FaultRing
from emu.placement import MAIN, PREEMPT, Placer
from emu.process import start_thread
from emu.states import StateLog, pause_refusal
from emu.status import LAG_FIELDS, Board, lag_meter
from emu.workload import SLICED, Memory, VCpu, Workload

FIELDS = ("faults", "postcopy-requests", "duplicate-requests", "present", "blocked",
          "placed-main", "placed-preempt") + LAG_FIELDS
RING = 1 << 16
POSTCOPY = ("postcopy-active", "postcopy-paused", "postcopy-recover")


class DestMemory(Memory):
    def __init__(self, dst: Destination) -> None:
        self.dst = dst
        self.ram = dst.ram
        self.states = dst.placer.states
        self.tpp = dst.placer.tpp
        self.increments = None
        if dst.ram is not None and dst.cfg["workload.pattern"] not in SLICED:
            self.increments = np.zeros((dst.cfg["guest.vcpus"], len(dst.ram)), np.uint8)

    def first_missing(self, pages: np.ndarray) -> int:
        present = self.states[pages // self.tpp] >= R.PRESENT
        return len(pages) if present.all() else int(np.argmin(present))

    def fault(self, vcpu: int, page: int) -> None:
        self.dst.fault(vcpu, page // self.tpp)

    def touched(self, vcpu: int, pages: np.ndarray) -> None:
        if self.increments is not None and len(pages):
            np.add.at(self.increments[vcpu], pages, 1)


class Destination:
    def __init__(self, control, bufs: dict, cfg) -> None:
        self.control = control
        self.cfg = cfg
        self.clock = Clock(bufs["clock"])
        self.board = Board(FIELDS, bufs["dst-board"])
        npages, ntarget = cfg.npages, cfg["guest.ram"] // R.TARGET_PAGE
        states = np.ndarray((npages,), np.uint8, buffer=bufs["dst-states"])
        self.arrival = np.ndarray((npages,), np.float64, buffer=bufs["dst-arrival"])
        self.ram = None
        if cfg["emulator.payload"]:
            shm.map_in(bufs["dst-ram"])
            self.ram = np.ndarray((ntarget, R.TARGET_PAGE), np.uint8, buffer=bufs["dst-ram"])
        self.placer = Placer(states, self.ram, cfg.page_size, self._placed)
        self.ring = FaultRing(bufs["faults"], RING)
        self.state = StateLog("destination", self.clock.now, control.emit)
        self.lag = lag_meter(self.board, self.clock.now)
        self.channels: list[Endpoint | None] = [None, None]  # MAIN, PREEMPT
        self.eof = [False, not cfg["migration.postcopy-preempt"]]
        self.listener = None
        self.lock = threading.Lock()  # channel set-up and tear-down
        self.faults: queue.SimpleQueue = queue.SimpleQueue()
        self.records: list[tuple] = []
        self.stop = threading.Event()
        self.memory = DestMemory(self)
        self.vcpus: list[VCpu] = []
        self.device: dict = {}
        self._block_named = False  # REQ_PAGES_ID names the block once per connection

    # ---- commands ----

    def incoming(self, address: str) -> None:
        """migrate-incoming: listen for the source's channels."""
        self.state.set("setup")
        self._listen(address)
        start_thread("fault", self._fault_thread)

    def recover(self, address: str) -> None:
        """migrate-recover: listen on a new address for the source to resume; may be retried."""
        if self.state.status != "postcopy-paused":
            self.control.emit(("refused", "migrate-recover",
                               "Migrate recover can only be run when postcopy is paused."))
            return
        self._listen(address)

    def pause(self) -> None:
        """migrate-pause on the destination: break the channels; both sides pause."""
        if refusal := pause_refusal(self.state.status):
            self.control.emit(("refused", "migrate-pause", refusal))
            return
        self._channel_failed("migrate-pause")

    def shutdown(self) -> None:
        self.stop.set()
        self.faults.put(None)
        self._close_channels()
        self._stop_listening()

    # ---- connections ----

    def _listen(self, address: str) -> None:
        self._stop_listening()
        self.listener = uri.listen(address)
        self.control.emit(("listening", uri.bound(self.listener)))
        start_thread("accept", self._accept_thread, self.listener)

    def _stop_listening(self) -> None:
        """Really stop: close() alone leaves a socket that a thread sits in accept() on
        listening (the kernel holds it), and a recovery could not listen there again."""
        if self.listener:
            try:
                self.listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.listener.close()

    def _accept_thread(self, listener) -> None:
        while not self.stop.is_set():
            try:
                sock, _ = listener.accept()
            except OSError:
                return  # closed: a newer listener took over, or we are done
            start_thread("hello", self._hello, uri.tune(sock))

    def _hello(self, sock) -> None:
        """Tell the channels apart by their first frame; anything else is closed unheard."""
        ep = Endpoint(sock, self.cfg["link.socket-buffer"], "incoming", self.lag)
        sock.settimeout(5)
        try:
            hello = ep.recv()
        except (ChannelError, OSError):
            hello = b""
        sock.settimeout(None)
        if hello == channel.MAIN_HELLO:
            which = MAIN
        elif hello == channel.PREEMPT_HELLO and self.cfg["migration.postcopy-preempt"]:
            which = PREEMPT
        else:
            ep.close()
            sock.close()
            return
        ep.name = ("main", "preempt")[which]
        with self.lock:
            old, self.channels[which] = self.channels[which], ep
            complete = self.channels[MAIN] and (
                self.channels[PREEMPT] or not self.cfg["migration.postcopy-preempt"])
        if old:
            old.close()
        if complete:
            # every channel is in: like QEMU, take no more connections (a recovery listens anew)
            self._stop_listening()
        if which == MAIN:
            self._block_named = False
            if self.state.status == "postcopy-paused":
                self.state.set("postcopy-recover")
        start_thread(("listen", "preempt")[which], self._read_channel, ep, which)

    def _close_channels(self) -> None:
        with self.lock:
            eps, self.channels = self.channels, [None, None]
        for ep in eps:
            if ep:
                ep.close()

    # ---- listen and preempt threads ----

    def _read_channel(self, ep: Endpoint, which: int) -> None:
        payload = self.cfg["emulator.payload"]
        try:
            while True:
                msg = wire.decode_main(ep.recv(), payload)
                if self.state.status == "setup":
                    self.state.set("active")
                if isinstance(msg, wire.RamRecord):
                    self.placer.receive(which, msg)
                elif isinstance(msg, wire.Eof):
                    self._end_of_stream(which)
                    return
                elif which == MAIN:
                    self._main_message(msg)
                else:
                    raise wire.ProtocolError("the preempt channel carries RAM only")
        except (ChannelError, wire.ProtocolError) as err:
            if self.channels[which] is ep:  # not a connection we already replaced
                self._channel_failed(f"{ep.name} channel: {err}")

    def _main_message(self, msg) -> None:
        if isinstance(msg, wire.DeviceState):
            self.device = msg.state
        elif msg.cmd == wire.MIG_CMD_POSTCOPY_RAM_DISCARD:
            for start, length in wire.parse_discard(msg.data):
                self.placer.discard(start // self.cfg.page_size, length // self.cfg.page_size)
        elif msg.cmd == wire.MIG_CMD_POSTCOPY_LISTEN:
            self.placer.postcopy = True
            self.state.set("postcopy-active")
        elif msg.cmd == wire.MIG_CMD_POSTCOPY_RUN:
            self._start_vcpus()
        elif msg.cmd == wire.MIG_CMD_RECV_BITMAP:
            self._send_rp(wire.recv_bitmap(self.placer.states >= R.PRESENT))
        elif msg.cmd == wire.MIG_CMD_POSTCOPY_RESUME:
            self._resume()

    def _resume(self) -> None:
        """POSTCOPY_RESUME: back to postcopy-active; ask again for every page still wanted,
        since the source's queue was lost with the connection."""
        self.state.set("postcopy-active")
        self._send_rp(wire.rp_message(wire.MIG_RP_MSG_RESUME_ACK, b"\0\0\0\1"))
        for page in np.flatnonzero(self.placer.states == R.REQUESTED):
            self._request(int(page))

    def _end_of_stream(self, which: int) -> None:
        """EOF on a channel. The migration is over when every channel has said so: quitting
        on main's EOF alone would lose urgent pages still on their way on preempt (a bug
        QEMU had)."""
        with self.lock:
            self.eof[which] = True
            done = all(self.eof)
        if done:
            self._complete()

    def _complete(self) -> None:
        self.stop.set()
        for vcpu in self.vcpus:
            vcpu.join()
        if self.placer.present != self.cfg.npages:
            missing = self.cfg.npages - self.placer.present
            self.control.fail(f"destination: {missing} host pages missing at the end")
            self.state.set("failed")
        else:
            self.state.set("completed")
        self._send_rp(wire.rp_message(wire.MIG_RP_MSG_SHUT, b"\0\0\0\0"))
        self.control.emit(("report", "destination", self._report()))

    def _channel_failed(self, reason: str) -> None:
        status = self.state.status
        if status in POSTCOPY:
            if status != "postcopy-paused":
                self.placer.drop_partial()
                self.state.set("postcopy-paused")
                self.control.emit(("paused", "destination", reason))
            self._close_channels()
        elif status not in ("completed", "failed"):
            self.control.fail(f"destination: {reason}")
            self.state.set("failed")
            self._close_channels()

    # ---- return path and the fault thread ----

    def _send_rp(self, message: bytes) -> bool:
        ep = self.channels[MAIN]
        if ep is None:
            return False
        try:
            ep.send([message])
            return True
        except ChannelError as err:
            self._channel_failed(f"return path: {err}")
            return False

    def _fault_thread(self) -> None:
        while (page := self.faults.get()) is not None:
            if self.placer.request(page):
                self._request(page)
            else:
                self.board.add("duplicate-requests", 1)

    def _request(self, page: int) -> None:
        """REQ_PAGES for one host page; while paused it stays requested and is asked for
        again on resume."""
        if self.state.status != "postcopy-active":
            return
        size = self.cfg.page_size
        if self._send_rp(wire.req_pages(page * size, size, not self._block_named)):
            self._block_named = True
            self.board.add("postcopy-requests", 1)

    def _start_vcpus(self) -> None:
        positions = self.device.get("vcpus", [0] * self.cfg["guest.vcpus"])
        for v, pos in enumerate(positions):
            vcpu = VCpu(v, Workload(self.cfg, v, pos), self.memory, self.clock,
                        self.cfg["workload.touch-cost"], self.stop)
            self.vcpus.append(vcpu)
            vcpu.start()

    # ---- called from vCPU threads ----

    def fault(self, vcpu: int, page: int) -> None:
        """A vCPU touched a host page that is not present: request it and block until placed."""
        if self.placer.states[page] >= R.PRESENT:
            return
        t0 = self.clock.now()
        self.board.add("blocked", 1)
        self.faults.put(page)
        self.placer.wait_present(page, self.stop)
        self.board.add("blocked", -1)
        if self.placer.states[page] < R.PRESENT:
            return  # stopped while waiting
        channel_code = PREEMPT if self.placer.states[page] == R.URGENT_PREEMPT else MAIN
        record = (t0, vcpu, page, self.clock.now() - t0, channel_code)
        self.ring.append(record)
        self.records.append(record)
        self.board.add("faults", 1)

    def _placed(self, first: int, count: int, which: int) -> None:
        self.arrival[first:first + count] = self.clock.now()
        self.board["present"] = self.placer.present
        self.board[("placed-main", "placed-preempt")[which]] = self.placer.placed[which]

    def _report(self) -> dict:
        return {
            "states": self.state.changes,
            "faults": np.array(self.records, dtype=FAULT_DTYPE),
            # without postcopy no vCPU ran here: they stand where the device state put them
            "positions": [v.workload.pos for v in self.vcpus] or self.device.get("vcpus", []),
            "bad-touches": sum(v.bad for v in self.vcpus),
            "increments": self.memory.increments,
            "board": self.board.snapshot(),
        }


def main(control, bufs: dict, cfg) -> None:
    dst = Destination(control, bufs, cfg)
    control.serve({"migrate-incoming": dst.incoming, "migrate-recover": dst.recover,
                   "migrate-pause": dst.pause})
    dst.shutdown()
