"""The destination: receives guest RAM and, after switchover, runs the guest on it.

This module is the incoming side's commands and state machine (QEMU: migration.c's
process_incoming_migration and MigrationIncomingState): migrate-incoming, migrate-recover,
migrate-pause, shutdown, and every change of the destination's MigrationStatus (setup, active,
postcopy-active, postcopy-paused, postcopy-recover, completed, failed). The parts it is made of
take it as QEMU's take `mis`:

- incoming.py: the connections (the accept thread, hellos, the link's RELAYED mark or the
  hand-over to this program's front, the main channel's trial, no more listening once complete);
- loadvm.py: the listen thread (main channel) and the preempt thread, loading what they read
  (RAM records to the Placer, the device state, the MIG_CMD_* commands);
- fault_thread.py: the fault thread and the vCPUs' fault path (request, de-duplicate, block
  until placed, fault records);
- placement.py: placing pages, waking the vCPUs blocked on them.

During postcopy, a broken channel pauses the migration (postcopy-paused) instead of failing it:
the guest keeps running here, and only vCPUs touching missing pages stay blocked.
"""

from __future__ import annotations

import threading

import numpy as np

from emu import shm, trace
from emu.board import LAG_FIELDS, Board, lag_meter
from emu.clock import Clock
from emu.config import Config
from emu.cpu import Costs, CpuThread
from emu.cpu import fields as cpu_fields
from emu.events import Paused, Refused, Report
from emu.figures import progress
from emu.figures.metrics import FAULT_DTYPE, FaultRing
from emu.migration import loadvm, uffd_backend, versions, wire
from emu.migration import ram as R
from emu.migration.fault_thread import DestMemory, FaultThread
from emu.migration.incoming import Connections
from emu.migration.multifd import MultiFDRecv
from emu.migration.placement import MAIN, Placer
from emu.migration.states import FINAL, StateLog, after_failure
from emu.migration.workload import VCpu, Workload
from emu.net.channel import ChannelError, Endpoint

PLACED = ("placed-main", "placed-preempt", "placed-multifd")  # by channel (placement.py)
FIELDS = ("faults", "postcopy-requests", "duplicate-requests", "present", "blocked",
          *PLACED) + LAG_FIELDS + progress.BOARD_FIELDS
FIELDS += cpu_fields(("listen", "preempt", "fault"))  # their CPU time (emu/cpu.py)
RING = 1 << 16
PAUSES = ("postcopy-active", "postcopy-recover")  # postcopy_pause_incoming() from these

# postcopy_pause_incoming(): a channel broke in postcopy, the migration pauses here;
# postcopy_pause_incoming_continued(): a new main channel came in, it recovers (savevm.c)
TRACE_PAUSE = trace.point("postcopy_pause_incoming")
TRACE_CONTINUED = trace.point("postcopy_pause_incoming_continued")


class Destination:
    """One incoming migration (QEMU's MigrationIncomingState): what its parts share (the
    configuration, the clock, the counters, the page states and the Placer, the status, the
    vCPUs) and every change of its status."""

    def __init__(self, control, bufs: dict, cfg: Config, front: str = "") -> None:
        """front: where this program's own link takes a source connected straight to it
        (a standalone destination's); "" if every source comes through a link."""
        self.control = control
        self.cfg = cfg
        self.front = front
        self.clock = Clock(bufs[shm.CLOCK])
        self.board = Board(FIELDS, bufs[shm.DST_BOARD])
        npages, ntarget = cfg.npages, cfg["guest.ram"] // R.TARGET_PAGE
        states = np.ndarray((npages,), np.uint8, buffer=bufs[shm.DST_STATES])
        self.arrival = np.ndarray((npages,), np.float64, buffer=bufs[shm.DST_ARRIVAL])
        self._arrival = memoryview(self.arrival)
        self.ram = None
        kernel = cfg["emulator.backend"] == "userfaultfd"
        if cfg["emulator.payload"]:
            if not kernel:  # under userfaultfd the pages must stay out until placed
                shm.map_in(bufs[shm.DST_RAM])
            self.ram = np.ndarray((ntarget, R.TARGET_PAGE), np.uint8, buffer=bufs[shm.DST_RAM])
        self.costs = Costs.from_config(cfg)
        # the listen thread (main) and the preempt thread, as serial servers in emulated time;
        # with migration.x-preempt-channels N, N preempt threads (slots 1..N), each its own
        # server, their time counted together as the preempt thread's
        self.slots = 1 + cfg["migration.x-preempt-channels"]
        self.cpu = [CpuThread("listen" if slot == MAIN else "preempt", self.clock, self.board)
                    for slot in range(self.slots)]
        self.placer = Placer(states, self.ram, cfg.page_size, self._placed, self._placing,
                             self.slots)
        if kernel:
            self.placer.kernel = uffd_backend.Kernel(bufs[shm.DST_RAM], cfg.page_size)
        self.state = StateLog("destination", self.clock.now, control.emit)
        self.lag = self._arrival_meter()  # a hello's
        self.lags = [self._reader_meter(cpu) for cpu in self.cpu]  # per channel slot
        self.stop = threading.Event()
        self.vcpus: list[VCpu] = []
        self.ended: float | None = None  # when the vCPUs were stopped at completion
        # per channel slot, MAIN first
        self.eof = [False] + [not cfg["migration.postcopy-preempt"]] * (self.slots - 1)
        self._eof_lock = threading.Lock()
        self.multifd = MultiFDRecv(self) if cfg["migration.multifd"] else None
        # the preempt channel of the current connections is in (postcopy_qemufile_dst_done)
        self.preempt_in = threading.Event()
        self.conns = Connections(self)
        self.loadvm = loadvm.LoadVM(self)
        faults = uffd_backend.UffdFaultThread if kernel else FaultThread
        self.fault_thread = faults(self, FaultRing(bufs[shm.FAULTS], RING))
        self.memory = DestMemory(self)

    # ---- commands ----

    def incoming(self, address: str) -> None:
        """migrate-incoming: listen for the source's channels (qemu_start_incoming_migration)."""
        if self.state.status != "none":
            self.control.emit(Refused("migrate-incoming",
                                      "The incoming migration has already been started"))
            return
        listener = self.conns.bind(address, "migrate-incoming")
        if listener is None:
            return  # refused, and nothing started: it may be told again, as in QEMU
        self.state.set("none", "setup")
        self.conns.serve(listener)
        self.fault_thread.start()

    def recover(self, address: str) -> None:
        """migrate-recover: listen on a new address for the source to resume; may be retried."""
        if self.state.status != "postcopy-paused":
            self.control.emit(Refused("migrate-recover",
                                      "Migrate recover can only be run when postcopy is paused."))
            return
        listener = self.conns.bind(address, "migrate-recover")
        if listener is not None:
            self.conns.serve(listener)

    def pause(self) -> None:
        """migrate-pause on the destination: break the channels; both sides pause."""
        if self.state.pause_allowed():
            self.channel_failed("migrate-pause")

    def shutdown(self) -> None:
        self.stop_guest()
        self.fault_thread.quit()
        self.conns.close_channels()
        self.conns.stop_listening()

    def remove_sockets(self) -> None:
        """The program that would remove our socket files is gone (killed): remove them."""
        self.conns.remove_sockets()

    # ---- the state machine, as the listen thread and the connections drive it ----

    def loading(self) -> None:
        """A message came in: the migration is active (process_incoming_migration_co())."""
        if self.state.status == "setup":
            self.state.set("setup", "active")

    def main_channel_confirmed(self) -> None:
        """A main channel carries the migration stream: its return path is new (the block
        is named again)."""
        self.fault_thread.block_named = False

    def try_recover(self, main: Endpoint) -> None:
        """postcopy_try_recover(), once every channel is in (all_channels): a paused
        postcopy recovers. Under the channels' lock, and only on a main channel still the
        migration's: a channel that broke meanwhile closed them all (channel_failed), and
        its pause stands; recovering then would sit in postcopy-recover with no channel."""
        with self.conns.lock:
            if self.conns.current(main) and self.state.status == "postcopy-paused" and \
                    self.state.set("postcopy-paused", "postcopy-recover") and \
                    TRACE_CONTINUED.enabled:
                TRACE_CONTINUED()

    def all_channels(self, main: Endpoint) -> bool:
        """QEMU 7.1's migration_has_all_channels(): with preempt, the destination loads
        nothing, a recovery included, until the preempt channel is in too (8.0 starts on main
        alone and waits at POSTCOPY_LISTEN and POSTCOPY_RESUME, wait_preempt()). False if
        the migration stops meanwhile."""
        if versions.preempt_after_main(self.cfg):
            return True
        return self.wait_preempt(main)

    def wait_preempt(self, main: Endpoint) -> bool:
        """qemu_sem_wait(&mis->postcopy_qemufile_dst_done); True at once without preempt, or
        in the what-if x-preempt-wait-channel=false, where neither side waits for it. False
        if the migration stops meanwhile, or `main`, the channel of the thread that waits,
        is closed here: its preempt channel will never come, a recovery's is another's.
        ChannelError if the source closed `main` meanwhile: nothing else reads it now."""
        if not (self.cfg["migration.postcopy-preempt"]
                and self.cfg["migration.x-preempt-wait-channel"]):
            return True
        while not self.preempt_in.wait(0.05):
            if self.stop.is_set() or self.state.status in FINAL or \
                    not self.conns.current(main):
                return False
            if main.hung_up():
                raise ChannelError("connection closed")
        return self.conns.current(main)

    def postcopy_listen(self, main: Endpoint) -> None:
        """POSTCOPY_LISTEN: pages are placed as postcopy places them from now on
        (postcopy_ram_listen_thread()); 8.0's postcopy_ram_incoming_setup() waits for the
        preempt channel first."""
        if versions.preempt_after_main(self.cfg) and not self.wait_preempt(main):
            return
        with self.placer.cond:
            if self.placer.kernel is not None:  # drop what is missing, then register
                self.placer.kernel.listen(self.placer.states)
            self.placer.postcopy = True
        # 10.2's postcopy-device until POSTCOPY_RUN: a failure meanwhile fails the migration,
        # and the source, whose guest has not run here, goes on with it
        self.state.set("active", "postcopy-device" if versions.postcopy_device(self.cfg)
                       else "postcopy-active")

    def start_vcpus(self, device: dict) -> None:
        """POSTCOPY_RUN: the guest runs here, its vCPUs where the device state put them."""
        if self.state.status == "postcopy-device":  # loadvm_postcopy_handle_run()
            self.state.set("postcopy-device", "postcopy-active")
        positions = device.get("vcpus", [0] * self.cfg["guest.vcpus"])
        self.board[progress.RESUMED] = self.clock.now()
        for v, pos in enumerate(positions):
            vcpu = VCpu(v, Workload(self.cfg, v, pos), self.memory, self.clock,
                        self.cfg["workload.touch-cost"], self.stop, self._publisher(v))
            self.vcpus.append(vcpu)
            vcpu.start()

    def _publisher(self, vcpu: int):
        """Where vCPU `vcpu` publishes its touches (its own field: one writer)."""
        field = progress.board_field(vcpu)

        def publish(touches: int) -> None:
            self.board[field] = touches
        return publish

    def postcopy_resume(self, main: Endpoint) -> None:
        """POSTCOPY_RESUME: back to postcopy-active; ask again for every page still wanted,
        since the source's queue was lost with the connection. Only from postcopy-recover
        (loadvm_postcopy_handle_resume): a channel that broke after the listen thread read
        the command has paused the migration again, and that pause stands, or no recovery
        could ever be started (no RESUME_ACK either: the channels are gone)."""
        if versions.preempt_after_main(self.cfg) and not self.wait_preempt(main):
            return  # 8.0: "wait for it and make sure it's created"
        if not self.state.set("postcopy-recover", "postcopy-active"):
            return
        self.send_rp(wire.rp_message(wire.MIG_RP_MSG_RESUME_ACK, b"\0\0\0\1"))
        self.fault_thread.request_again()

    def load_failed(self, detail: str) -> None:
        """The stream cannot be loaded here: fail, stop the guest and the channels. Only a
        broken channel pauses a postcopy migration; QEMU's listen thread fails on a load
        error (and exits)."""
        _, new = self.state.settle(lambda status: None if status in FINAL else "failed")
        if new is None:
            return
        self.control.fail(f"load of migration failed: Invalid argument: {detail}")
        self.stop_guest()
        self.conns.close_channels()
        self.conns.stop_listening()

    def end_of_stream(self, which: int) -> None:
        """EOF on a channel. The migration is over when every channel has said so: quitting
        on main's EOF alone would lose urgent pages still on their way on preempt (a bug
        QEMU had)."""
        with self._eof_lock:
            self.eof[which] = True
            done = all(self.eof)
        if done:
            self._complete()

    def _complete(self) -> None:
        """Every channel said EOF: completed (or failed, with pages missing), from
        postcopy-active or, without postcopy, from active. A pause that landed just before
        stands: the source sends its EOFs again after the recovery, and this runs again."""
        missing = self.cfg.npages - self.placer.present
        old = "postcopy-active" if self.placer.postcopy else "active"
        if not self.state.set(old, "failed" if missing else "completed"):
            return
        self.ended = self.clock.now()  # the guest's progress is counted up to here
        self.stop_guest()
        for vcpu in self.vcpus:
            vcpu.join()
        if missing:
            self.control.fail(f"{missing} host pages missing at the end")
        self.send_rp(wire.rp_message(wire.MIG_RP_MSG_SHUT, b"\0\0\0\0"))
        self.control.emit(Report("destination", self._report()))

    def stop_guest(self) -> None:
        """The vCPUs stop: under userfaultfd, the range is handed back first, so that a vCPU
        asleep in the kernel on a page that will never come wakes (and can be joined)."""
        self.stop.set()
        if self.placer.kernel is not None:
            with self.placer.cond:
                self.placer.kernel.release()

    def channel_failed(self, reason: str) -> None:
        """A channel broke: in postcopy the migration pauses, from postcopy-active or from
        postcopy-recover (postcopy_pause_incoming); before postcopy it fails."""
        self.preempt_in.clear()  # a recovery brings a new one
        with self.conns.lock:  # the state and the channels at once: try_recover()
            old, new = self.state.settle(lambda status: after_failure(status, PAUSES))
            if new == "postcopy-paused" and TRACE_PAUSE.enabled:
                TRACE_PAUSE()  # with the state, as QEMU's comes before it
            if old not in ("completed", "failed"):
                self.conns.close_channels()
        if new == "postcopy-paused":
            self.placer.drop_partial()
            self.control.emit(Paused("destination", reason))
        elif new == "failed":
            self.control.fail(f"{reason}")

    # ---- the return path ----

    def send_rp(self, message: bytes) -> bool:
        """migrate_send_rp_message(): on the main channel's way back; a failure to send is a
        broken channel."""
        ep = self.conns.channels[MAIN]
        if ep is None:
            return False
        try:
            ep.send([message])
            return True
        except ChannelError as err:
            self.channel_failed(f"return path: {err}")
            return False

    def _arrival_meter(self, ready=lambda: 0.0):
        """A frame's lag from the arrival the link stamped on it: a time.monotonic() (channel.py),
        read on this program's clock, since a `link` program's emulated clock started apart from
        ours (a stamp of its emulated time would put every frame that far off here). The
        emulated arrival is returned."""
        lag = lag_meter(self.board, self.clock.now, ready)
        at_real = self.clock.at_real

        def note(stamp: float) -> float:
            arrival = at_real(stamp)
            lag(arrival)
            return arrival
        return note

    def _reader_meter(self, cpu: CpuThread):
        """on_arrival of a channel's endpoint: its lag (a frame read late because its thread
        was busy placing is not the emulator's), and the time its thread's work on the frame
        starts from (the arrival: the emulator's own work on it overlaps the charge)."""
        lag = self._arrival_meter(cpu.ready)

        def note(stamp: float) -> None:
            cpu.mark(lag(stamp))
        return note

    def _placing(self, count: int, which: int, zero: bool) -> None:
        """The listen or a preempt thread (channel slot `which`) is about to place `count` host
        pages (zero: of zeros):
        its CPU time for them (cpu.place-page, cpu.place-byte, cpu.place-zero-page) passes
        before the vCPUs see them."""
        cpu = self.cpu[which]
        place = self.costs.place_zero if zero else self.costs.place
        cpu.charge(place(count, self.cfg.page_size))
        cpu.settle()

    # ---- what the window and the report read ----

    def _placed(self, first: int, count: int, which: int) -> None:
        if count == 1:  # a requested page: numpy's slice costs ten times a memoryview's item
            self._arrival[first] = self.clock.now()
        else:
            self.arrival[first:first + count] = self.clock.now()
        self.board["present"] = self.placer.present
        self.board[PLACED[which]] = self.placer.placed[which]

    def _report(self) -> dict:
        device = self.loadvm.device
        return {
            "states": self.state.changes,
            "faults": np.array(self.fault_thread.records, dtype=FAULT_DTYPE),
            # without postcopy no vCPU ran here: they stand where the device state put them
            "positions": [v.workload.pos for v in self.vcpus] or device.get("vcpus", []),
            "bad-touches": sum(v.bad for v in self.vcpus),
            "increments": self.memory.increments,
            "board": self.board.snapshot(),
            "touches": [self._touches(v.touches) for v in self.vcpus if v.touches],
            "ended": self.ended,
        }

    def _touches(self, touches) -> dict:
        """One vCPU's count for the guest's progress (emu/figures/progress.py)."""
        fault_at, fault_pos = touches.fault
        return {"from": touches.t0, "touches": touches.at(self.ended),
                "faulted": touches.faults > 0,
                "fault-at": fault_at, "fault-touches": fault_pos - touches.pos0,
                "woken": touches.woken}


def main(control, bufs: dict, cfg: Config, front: str = "") -> None:
    dst = Destination(control, bufs, cfg, front)
    control.on_orphan = dst.remove_sockets
    control.serve({"migrate-incoming": dst.incoming, "migrate-recover": dst.recover,
                   "migrate-pause": dst.pause})
    dst.shutdown()
