"""The destination: receives guest RAM and, after switchover, runs the guest on it.

Threads, as QEMU names them: the listen thread reads the main channel, the preempt thread the
preempt channel (both place pages), the fault thread turns vCPU faults into page requests on the
return path, and the vCPU threads run the workload and block on pages that are not present.
"""

from __future__ import annotations

import queue
import threading

import numpy as np

from emu import ram as R
from emu import wire
from emu.channel import ChannelError, Endpoint
from emu.clock import Clock
from emu.metrics import FaultRing
from emu.placement import MAIN, PREEMPT, Placer
from emu.states import StateLog
from emu.status import LAG_FIELDS, Board, lag_meter
from emu.workload import SLICED, Memory, VCpu, Workload

FIELDS = ("faults", "postcopy-requests", "duplicate-requests", "present", "blocked",
          "placed-main", "placed-preempt") + LAG_FIELDS
RING = 1 << 16


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
    def __init__(self, control, bufs: dict, cfg, main_sock, preempt_sock) -> None:
        self.control = control
        self.cfg = cfg
        self.clock = Clock(bufs["clock"])
        self.board = Board(FIELDS, bufs["dst-board"])
        npages, ntarget = cfg.npages, cfg["guest.ram"] // R.TARGET_PAGE
        states = np.ndarray((npages,), np.uint8, buffer=bufs["dst-states"])
        self.arrival = np.ndarray((npages,), np.float64, buffer=bufs["dst-arrival"])
        self.ram = (np.ndarray((ntarget, R.TARGET_PAGE), np.uint8, buffer=bufs["dst-ram"])
                    if cfg["emulator.payload"] else None)
        self.placer = Placer(states, self.ram, cfg.page_size, self._placed)
        self.ring = FaultRing(bufs["faults"], RING)
        self.state = StateLog("destination", self.clock.now, control.emit)
        window = cfg["link.socket-buffer"]
        lag = lag_meter(self.board, self.clock.now)
        self.main = Endpoint(main_sock, window, "main", lag)
        self.preempt = (Endpoint(preempt_sock, window, "preempt", lag)
                        if cfg["migration.postcopy-preempt"] else None)
        self.faults: queue.SimpleQueue = queue.SimpleQueue()
        self.records: list[tuple] = []
        self.stop = threading.Event()
        self.memory = DestMemory(self)
        self.vcpus: list[VCpu] = []
        self.device: dict = {}
        self.eofs = threading.Semaphore(0)
        self._requested_once = False

    # ---- commands ----

    def incoming(self) -> None:
        self.state.set("setup")
        readers = [("listen", self._listen_thread)]
        if self.preempt:
            readers.append(("preempt", self._preempt_thread))
        for name, target in readers + [("fault", self._fault_thread),
                                       ("incoming", self._incoming)]:
            threading.Thread(target=target, name=name, daemon=True).start()

    def shutdown(self) -> None:
        self.stop.set()
        self.faults.put(None)
        for ep in (self.main, self.preempt):
            if ep:
                ep.close()

    # ---- threads ----

    def _incoming(self) -> None:
        """Wait for the end of every channel, then check that nothing is missing."""
        for _ in range(2 if self.preempt else 1):
            self.eofs.acquire()
        self.stop.set()
        for vcpu in self.vcpus:
            vcpu.join()
        if self.placer.present != self.cfg.npages:
            missing = self.cfg.npages - self.placer.present
            self.control.fail(f"destination: {missing} host pages missing at the end")
            self.state.set("failed")
        else:
            self.state.set("completed")
        self.control.emit(("report", "destination", self._report()))

    def _listen_thread(self) -> None:
        self._read_channel(self.main, MAIN)

    def _preempt_thread(self) -> None:
        self._read_channel(self.preempt, PREEMPT)

    def _read_channel(self, ep: Endpoint, channel: int) -> None:
        payload = self.cfg["emulator.payload"]
        try:
            while True:
                msg = wire.decode_main(ep.recv(), payload)
                if self.state.status == "setup":
                    self.state.set("active")
                if isinstance(msg, wire.RamRecord):
                    self.placer.receive(channel, msg)
                elif isinstance(msg, wire.Eof):
                    break
                elif channel == MAIN:
                    self._main_message(msg)
                else:
                    raise wire.ProtocolError("preempt channel carries RAM only")
        except (ChannelError, wire.ProtocolError) as err:
            if not self.stop.is_set():
                self.control.fail(f"destination {ep.name} channel: {err}")
                self.state.set("failed")
            return
        self.eofs.release()

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
        elif msg.cmd == wire.MIG_CMD_PING:
            self.main.send([wire.rp_message(wire.MIG_RP_MSG_PONG, msg.data)])

    def _fault_thread(self) -> None:
        while (page := self.faults.get()) is not None:
            if not self.placer.request(page):
                self.board.add("duplicate-requests", 1)
                continue
            size = self.cfg.page_size
            try:
                self.main.send([wire.req_pages(page * size, size, not self._requested_once)])
            except ChannelError:
                return
            self._requested_once = True
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
        if self.stop.is_set() and self.placer.states[page] < R.PRESENT:
            return
        channel = PREEMPT if self.placer.states[page] == R.URGENT_PREEMPT else MAIN
        record = (t0, vcpu, page, self.clock.now() - t0, channel)
        self.ring.append(record)
        self.records.append(record)
        self.board.add("faults", 1)

    def _placed(self, first: int, count: int, channel: int) -> None:
        self.arrival[first:first + count] = self.clock.now()
        self.board["present"] = self.placer.present
        self.board[("placed-main", "placed-preempt")[channel]] = self.placer.placed[channel]

    def _report(self) -> dict:
        from emu.metrics import FAULT_DTYPE
        return {
            "states": self.state.changes,
            "faults": np.array(self.records, dtype=FAULT_DTYPE),
            "positions": [v.workload.pos for v in self.vcpus],
            "bad-touches": sum(v.bad for v in self.vcpus),
            "increments": self.memory.increments,
            "board": self.board.snapshot(),
        }


def main(control, bufs: dict, cfg, main_sock, preempt_sock) -> None:
    dst = Destination(control, bufs, cfg, main_sock, preempt_sock)
    control.serve({"migrate-incoming": dst.incoming})
    dst.shutdown()
