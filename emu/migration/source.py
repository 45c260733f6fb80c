"""The source: holds guest RAM, runs the guest until switchover, and migrates it.

This is QEMU's migration.c: the commands (migrate, migrate-pause, migrate_cancel, ...) and the
migration thread's state machine: setup, precopy iterations, the switchover (stop-and-copy, or
postcopy_start()), postcopy, completion, and the recovery handshake after a pause. Page search
and sending are ram_save's (QEMU's ram.c), the destination's messages return_path's.

Threads, as QEMU names them: the migration thread (precopy, switchover, then postcopy: serve
the request queue first, else the next dirty page), the return-path thread (parses the
destination's messages and queues page requests) and the vCPU threads. As in QEMU 7.1 the
migration thread also sends the urgent pages on the preempt channel, so while it is blocked
writing the main channel, urgent pages wait too; and under a rate cap a request made while it
sleeps waits for the next 100 ms window (docs/concepts.md, "The rate limiter and urgent
pages"). With migration.multifd the precopy pages go on the multifd channels instead of main
(multifd.py), synced at each round and before postcopy starts, and none in postcopy.
migration.design 8.0 ("preempt-full") moves preempt urgent pages to the return-path thread
(docs/concepts.md, "Designs: 7.1, 8.0, 10.1").
"""

from __future__ import annotations

import threading

import numpy as np

from emu import shm, trace
from emu.board import Board
from emu.child import start_thread
from emu.clock import Clock
from emu.config import Config
from emu.cpu import fields as cpu_fields
from emu.events import Paused, Refused, Report
from emu.migration import ram as R
from emu.migration import versions, wire
from emu.migration.multifd import MultiFDSend
from emu.migration.page_requests import PageRequestQueue
from emu.migration.ram_save import Pacer, RAMState
from emu.migration.return_path import ReturnPath
from emu.migration.states import FINAL, StateLog, after_failure
from emu.migration.workload import Memory, VCpu, Workload
from emu.net import channel, uri
from emu.net.channel import ChannelError, Endpoint

FIELDS = ("transferred", "precopy-bytes", "downtime-bytes", "postcopy-bytes", "normal",
          "normal-bytes", "dirty-sync-count", "postcopy-requests", "remaining", "setup-time",
          "downtime", "total-time", "urgent-main", "urgent-preempt", "dropped-requests",
          "break-huge", "pongs", "duplicate", "multifd-bytes",
          "postcopy-package-loaded")
FIELDS += cpu_fields(("migration", "return-path"))  # their CPU time (emu/cpu.py)
# where a broken channel pauses the migration instead of failing it (postcopy_pause())
PAUSES = ("postcopy-active", "postcopy-recover-setup", "postcopy-recover")

MAX_WAIT = 0.05  # ram.c: the longest a ram_save_iterate() call goes on, in seconds

TRACE_RATE_LIMIT_PRE = trace.point("migration_rate_limit_pre")
TRACE_RATE_LIMIT_POST = trace.point("migration_rate_limit_post")
# migration.x-main-nonblocking (an experiment, not QEMU: postcopy-emu's own names): main is
# full, the migration thread waits for room or a request instead of sleeping in write(); and
# what ended the wait (urgent=1: a request, served before main is written again)
TRACE_MAIN_FULL = trace.point("pce_main_would_block")
TRACE_MAIN_WRITABLE = trace.point("pce_main_writable")
# postcopy_preempt_send_channel_new(): the preempt channel is connected (postcopy-ram.c)
TRACE_PREEMPT_NEW_CHANNEL = trace.point("postcopy_preempt_new_channel")
TRACE_FD_ERROR = trace.point("migrate_fd_error")
# postcopy-emu's own (QEMU's sem_wait has no trace point): the migration thread waited `ms`
# emulated milliseconds for the preempt channel (postcopy_preempt_wait_channel(), 8.0's
# postcopy_preempt_establish_channel()), before `what` (postcopy_start or the recovery)
TRACE_PREEMPT_WAIT = trace.point("pce_postcopy_preempt_wait_channel")


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
        self.clock = Clock(bufs[shm.CLOCK])
        self.board = Board(FIELDS, bufs[shm.SRC_BOARD])
        self.tpp = cfg.target_pages_per_host_page
        raw = bufs[shm.SRC_RAM] if cfg["emulator.payload"] else None
        self.guest_ram = None  # what the vCPUs write, by target page
        if raw is not None:
            ntarget = cfg["guest.ram"] // R.TARGET_PAGE
            self.guest_ram = np.ndarray((ntarget, R.TARGET_PAGE), np.uint8, buffer=raw)
            R.stamp(self.guest_ram, cfg["guest.populated"])
        states = np.ndarray((cfg.npages,), np.uint8, buffer=bufs[shm.SRC_STATES])
        self.rs = RAMState(cfg, self.board, self.clock, states,
                           PageRequestQueue(bufs[shm.SRC_QUEUE]), raw)
        self.rp = ReturnPath(self.rs, self.board, cfg.npages, self._channel_failed)
        self.state = StateLog("source", self.clock.now, control.emit)
        self.main: Endpoint | None = None
        # the preempt channel, or migration.x-preempt-channels of them (an experiment)
        self.preempts: list[Endpoint] = []
        self.multifd: MultiFDSend | None = None  # its channels, with migration.multifd
        self.lock = threading.Lock()  # the channels, and the state changes that go with them
        self.switchover = threading.Event()
        self.quit = threading.Event()
        self.resumed = threading.Event()  # set again when a recovery has finished
        self.parked = threading.Event()  # the migration thread waits for a recovery
        self.workloads = [Workload(cfg, v) for v in range(cfg["guest.vcpus"])]
        self.vcpus: list[VCpu] = []  # the running vCPU threads
        self.vcpu_stop = threading.Event()
        self.vcpu_lock = threading.Lock()
        self.guest_running = True  # QMP stop/cont: the vCPUs run only while this holds
        # migrate-set-parameters changes them while the migration runs, as in QEMU
        self.rates = {"max-bandwidth": cfg["migration.max-bandwidth"],
                      "max-postcopy-bandwidth": cfg["migration.max-postcopy-bandwidth"]}
        self.pacer: tuple[str, Pacer] | None = None  # the rate cap in force, by parameter
        # x-main-nonblocking: a request queued wakes the migration thread waiting for room
        self.nonblocking = cfg["migration.x-main-nonblocking"]
        if self.nonblocking:
            self.rs.queue.on_put = self._wake_main
            self._page_bytes = self._host_page_bytes()
        # the preempt channel connects in the background: postcopy_qemufile_src_sem, posted
        # once its connection is made or has failed (self.preempt then stays None)
        self.preempt_done = threading.Event()
        self.preempt_gen = 0  # the connection attempt that may install its channel
        self.preempt_error = ""
        self.address = ""  # where the channels connect (migrate's, or the last resume's)
        self.connect_delays = {"main": 0.0, "preempt": 0.0}  # fault: delay CHANNEL-connect

    # ---- commands ----

    def migrate(self, address: str) -> None:
        """migrate: connect to the destination (through the link) and start streaming."""
        if not self.state.set("none", "setup"):  # migrate_init(): one migration per source
            return
        self.address = address
        try:
            self._connect(address)
        except (OSError, ChannelError) as err:
            if TRACE_FD_ERROR.enabled:
                TRACE_FD_ERROR(error_desc=str(err))
            self.control.fail(f"cannot connect to {address}: {err}")
            self.state.set("setup", "failed")  # migrate_fd_error()
            return
        # the migration thread first: its first message goes before the vCPU threads take
        # the interpreter (256 of them starting would keep it waiting for seconds, and the
        # destination gives up a main channel silent for MAIN_SETUP_TIMEOUT)
        start_thread("migration", self._migration_thread)
        with self.vcpu_lock:
            # not once the switchover was asked for: the migration thread may have stopped
            # the vCPUs for it already (under this lock), and none may run after that
            if self.guest_running and not self.switchover.is_set():
                self._start_vcpus()

    def resume(self, address: str) -> None:
        """migrate with resume=true: reconnect and run the recovery handshake."""
        if self.state.status != "postcopy-paused":
            self.control.emit(Refused("migrate", "Cannot resume if there is no paused "
                                      "migration"))
            return
        self.address = address
        start_thread("resume", self._resume, address)

    def pause(self) -> None:
        """migrate-pause: break the channels on purpose; both sides go to postcopy-paused."""
        if self.state.pause_allowed():
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

    def delay_connect(self, name: str, seconds: float) -> None:
        """The fault `delay CHANNEL-connect TIME`: that channel's connections (recoveries'
        too) are set up `seconds` of emulated time late."""
        self.connect_delays[name] = seconds

    def shutdown(self) -> None:
        self.quit.set()
        self.vcpu_stop.set()
        self.switchover.set()
        self._close_channels()

    # ---- connections ----

    def _connect(self, address: str) -> None:
        """A new main channel (migrate, or a recovery's), and with 7.1 the preempt channel's
        connection started behind it (migrate_fd_connect() calls postcopy_preempt_setup()):
        it reaches the destination before main's first frame if main's is late."""
        main = self._endpoint("main", address)
        with self.lock:
            olds, self.main, self.preempts = self.preempts, main, []
        for old in olds:
            old.close()  # a recovery's channel that connected after its recovery failed
        if self.cfg["migration.postcopy-preempt"] and not versions.preempt_after_main(self.cfg):
            self._preempt_setup(address)
        self.rp.preempt = None  # 8.0: the return-path thread owns it once it is up
        self._hello(main, channel.MAIN_HELLO)
        if self.cfg["migration.multifd"] and self.multifd is None:  # not again on a recovery
            self.multifd = self._connect_multifd(address)
        self.rp.start(main)

    def _endpoint(self, name: str, address: str) -> Endpoint:
        window, wakeup = self.cfg["link.socket-buffer"], self.cfg["link.write-wakeup"]
        return Endpoint(uri.connect(address), window, name, wakeup=wakeup)

    def _hello(self, ep: Endpoint, hello: bytes) -> None:
        """The channel's first frame, late by its `delay CHANNEL-connect` fault."""
        delay = self.connect_delays[ep.name]
        if delay:
            self._sleep(delay)
        ep.send([hello])

    def _sleep(self, seconds: float) -> None:
        until = self.clock.now() + seconds
        while not self.clock.sleep_until(until, 0.01) and not self.quit.is_set():
            pass

    def _preempt_setup(self, address: str) -> None:
        """postcopy_preempt_setup(): connect the preempt channel in the background
        (socket_send_channel_create()); preempt_done is posted either way."""
        with self.lock:
            self.preempt_gen += 1
            gen = self.preempt_gen
        self.preempt_done.clear()
        start_thread("preempt-connect", self._preempt_connect, address, gen)

    def _preempt_connect(self, address: str, gen: int) -> None:
        """postcopy_preempt_send_channel_new(): the channel is ours once connected, unless a
        newer connection (a recovery) or the end came meanwhile."""
        eps: list[Endpoint] = []
        try:
            # with migration.x-preempt-channels N (an experiment QEMU does not have), N
            # connections, each its own hello; the connect delay once, for them all
            for index in range(self.cfg["migration.x-preempt-channels"]):
                ep = self._endpoint(channel.preempt_name(index), address)
                eps.append(ep)
                hello = channel.preempt_hello(index)
                if index == 0:
                    self._hello(ep, hello)
                else:
                    ep.send([hello])
        except (OSError, ChannelError) as err:
            self.preempt_error = f"preempt channel: {err}"  # migrate_set_error()
            for ep in eps:
                ep.close()
            eps = []
        if eps:
            with self.lock:
                current = gen == self.preempt_gen and not self.quit.is_set()
                if current:
                    self.preempts = self.rp.preempt = eps
            if not current:
                for ep in eps:
                    ep.close()
                return
            if TRACE_PREEMPT_NEW_CHANNEL.enabled:
                TRACE_PREEMPT_NEW_CHANNEL()
            for ep in eps:
                ep.read_credits_in_background(
                    lambda err, ep=ep: self._channel_failed(f"{ep.name} channel: {err}", ep))
        self.preempt_done.set()

    def _preempt_wait_channel(self, what: str) -> bool:
        """postcopy_preempt_wait_channel() (7.1) or postcopy_preempt_establish_channel() (8.0:
        it starts the connection here, once main is known to be up): wait for the preempt
        channel. False if it could not connect, or the source quits meanwhile. With the
        what-if x-preempt-wait-channel=false, no wait: until the channel is up, urgent pages
        go on main (serve_queued_page() without one), and the EOFs wait for it instead."""
        if not self.cfg["migration.postcopy-preempt"]:
            return True
        if versions.preempt_after_main(self.cfg):
            self._preempt_setup(self.address)
        if not self.cfg["migration.x-preempt-wait-channel"]:
            return True
        return self._preempt_wait(what)

    def _preempt_wait(self, what: str) -> bool:
        t0 = self.clock.now()
        while not self.preempt_done.wait(0.05):
            if self.quit.is_set():
                return False
        if TRACE_PREEMPT_WAIT.enabled:
            TRACE_PREEMPT_WAIT(what=what, ms=round((self.clock.now() - t0) * 1000, 3))
        return self.preempt is not None

    @property
    def preempt(self) -> Endpoint | None:
        """The (first) preempt channel, None without one."""
        return self.preempts[0] if self.preempts else None

    @preempt.setter
    def preempt(self, ep: Endpoint | None) -> None:
        self.preempts = [ep] if ep else []

    def _connect_multifd(self, address: str) -> MultiFDSend:
        """multifd_send_setup(): migration.multifd-channels connections, each saying its id
        first (multifd_send_initial_packet()), and their sender threads."""
        window, wakeup = self.cfg["link.socket-buffer"], self.cfg["link.write-wakeup"]
        eps = []
        for channel_id in range(self.cfg["migration.multifd-channels"]):
            ep = Endpoint(uri.connect(address), window, f"multifd{channel_id}", wakeup=wakeup)
            ep.send([wire.multifd_hello(channel_id)])
            ep.read_credits_in_background()  # a broken one fails the sender writing to it
            eps.append(ep)
        raw = None if self.guest_ram is None else memoryview(self.guest_ram).cast("B")
        packet = max(self.rs.piece, self.tpp)  # target pages: whole host pages
        return MultiFDSend(eps, self.board, self.clock, self.rs.writer.costs, raw, packet,
                           lambda why: self._channel_failed(why))

    def _close_channels(self) -> None:
        with self.lock:
            eps = (self.main, *self.preempts)
        for ep in eps:
            if ep:
                ep.close()
        if self.multifd:
            self.multifd.shutdown()

    def _channel_failed(self, reason: str, ep: Endpoint | None = None) -> None:
        """A channel broke. In postcopy the guest's memory is split between the hosts, so
        the migration pauses and waits for recovery; before that, it fails."""
        with self.lock:
            if ep is not None and (ep.closed or ep not in (self.main, *self.preempts)):
                return  # a connection already given up (a recovery may be using new ones)
            old, new = self.state.settle(lambda status: after_failure(status, PAUSES))
            if new == "postcopy-paused":  # postcopy_pause()
                self.resumed.clear()
                self.rs.queue.clear()  # lost: the destination asks again after resuming
                self.control.emit(Paused("source", reason))
            elif new == "failed":
                self.control.fail(f"{reason}")
            broken = (self.main, *self.preempts)  # not what a recovery connects meanwhile
        for channel_ep in broken:
            if channel_ep:
                channel_ep.close()
        if old == "postcopy-device" and new == "failed":
            self._guest_runs_on()

    def _guest_runs_on(self) -> None:
        """migration_iteration_finish() after a failure in postcopy-device (QEMU 10.2): the
        destination never ran the guest, this side holds its latest state, so vm_start()
        runs it on here (QMP: RESUME, query-status "running"). Unless the destination's PONG
        said it loaded the device state and runs the guest already, the migration thread not
        having left postcopy-device yet (it does so between iterations): QEMU then cannot
        take the drives back (migration_block_activate() fails) and leaves the guest stopped
        here; the failure, not a pause, leaves the destination's guest without its pages."""
        if self.rp.package_loaded.is_set():
            return
        with self.vcpu_lock:
            self.switchover.clear()  # cont works again, as after a failed precopy
            if self.guest_running:
                self._start_vcpus()

    # ---- migration thread ----

    def _migration_thread(self) -> None:
        try:
            self._migrate()
        except ChannelError as err:
            self._channel_failed(str(err))
        self.control.emit(Report("source", {"states": self.state.changes,
                                                "board": self.board.snapshot()}))

    def _migrate(self) -> None:
        t0 = self.clock.now()
        self.main.send([wire.command(wire.MIG_CMD_OPEN_RETURN_PATH)])
        if self.cfg["migration.postcopy-ram"]:
            # migration_thread(): "a ping that will make stuff easier to debug"; from 8.0 its
            # PONG tells postcopy_start() that the main channel is up (rp_pong_acks)
            self.main.send([wire.ping(1)])
            self.main.send([wire.command(wire.MIG_CMD_POSTCOPY_ADVISE)])
        self.rs.migration_bitmap_sync()  # ram_init_bitmaps()
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
            if not self._wait_for(self.rp.shut):
                return
            last = "device"
        if self.multifd:  # multifd_send_shutdown(): nothing more goes on them
            self.multifd.shutdown()
        if self.state.status in FINAL or self.quit.is_set():
            return
        self.board["remaining"] = 0
        self.board["total-time"] = self.clock.now() - t0
        self.state.set(last, "completed")  # migration_completion_end()

    def _precopy(self) -> None:
        """migration_thread() in precopy: the gate, ram_save_iterate(), the rate-limit step."""
        pacer = self._pacer("max-bandwidth")
        while not self._phase_over():
            if not pacer.exceeded():  # qemu_savevm_state_iterate()'s gate
                if not self._ram_save_iterate(pacer, "precopy-bytes"):
                    self.main.flush()
                    self.switchover.wait(0.01)  # all clean: wait for the guest to dirty some
                    continue
            self._rate_limit(pacer)
        self.main.flush()

    def _start_postcopy(self) -> bool:
        """migrate-start-postcopy: stop the guest, discard, device state, run on the other side.
        False if the migration failed or was cancelled meanwhile."""
        if not self._postcopy_start_preempt():
            return False
        if not self.state.set("active", "device"):  # migration_switchover_prepare()
            return False
        # ram_save_postcopy_prepare() (10.1), before the VM stops: every page queued on
        # multifd is placed before the destination takes the discards and listens
        if not self._multifd_sync():
            return False
        t_stop = self.clock.now()  # the guest ran on through the sync: downtime starts here
        with self.vcpu_lock:
            self._stop_vcpus()
        self.rs.send_discard_bitmap(self.main)
        self.rs.writer.postcopy_records()
        # postcopy_start() applies max-postcopy-bandwidth here, to the window under way: the
        # bytes precopy counted in it stay counted (rate_limit_used is not reset)
        self._pacer("max-postcopy-bandwidth")
        # postcopy_start(): pings 2 and 3 around the device state "help line traces up"
        self.main.send([wire.ping(2)])
        self.main.send([wire.command(wire.MIG_CMD_POSTCOPY_LISTEN)])
        self.main.send([wire.device_state({"vcpus": [w.pos for w in self.workloads]})])
        self.main.send([wire.ping(3)])
        device = versions.postcopy_device(self.cfg)
        if device:  # its PONG says the device state is loaded: the guest starts there
            self.main.send([wire.ping(wire.QEMU_VM_PING_PACKAGED_LOADED)])
        self.main.send([wire.command(wire.MIG_CMD_POSTCOPY_RUN)])
        self.board["downtime"] = self.clock.now() - t_stop
        self.resumed.set()  # before the change: a pause right after it clears it again
        # postcopy_start(): until the destination runs the guest, a failure leaves it here
        return self.state.set("device", "postcopy-device" if device else "postcopy-active")

    def _postcopy_start_preempt(self) -> bool:
        """postcopy_start()'s first step: the preempt channel must be up (7.1: it connected
        behind main; 8.0: connect it now, once main's first PONG came). The guest runs on
        here meanwhile. If it cannot connect, the migration fails."""
        if not self.cfg["migration.postcopy-preempt"]:
            return True
        if versions.preempt_after_main(self.cfg) and not self._wait_main_channel():
            return False
        if self._preempt_wait_channel("postcopy_start"):
            return True
        if not self.quit.is_set():
            self.control.fail(self.preempt_error or "preempt channel: not connected")
            self.state.set("active", "failed")
            self._close_channels()
        return False

    def _wait_main_channel(self) -> bool:
        """migration_wait_main_channel() (8.0): one PONG received."""
        while not self.rp.pong_acks.acquire(timeout=0.05):
            if self.quit.is_set() or self.state.status != "active":
                return False
        return True

    def _postcopy(self) -> None:
        """Stream until the destination has it all, pausing and resuming across failures."""
        while not self.quit.is_set():
            main = self.main  # a failure noticed late must not break a recovery's new channels
            try:
                if self._postcopy_stream() and self._wait_for(self.rp.shut):
                    return
            except ChannelError as err:
                self._channel_failed(str(err), main)
            if self.state.status in FINAL or not self._postcopy_pause():
                return  # failed in postcopy-device: the guest runs on here

    def _package_loaded(self, complete_ready: bool) -> bool:
        """migration_iteration_run() in postcopy-device (QEMU 10.2): postcopy-active once
        the destination said it loaded the device state; with nothing left to send (complete
        ready) it is waited for. False if the migration left postcopy-device otherwise."""
        if self.state.status != "postcopy-device":
            return True
        if not (complete_ready or self.rp.package_loaded.is_set()):
            return True
        return self._wait_for(self.rp.package_loaded) and \
            self.state.set("postcopy-device", "postcopy-active")

    def _postcopy_pause(self) -> bool:
        """postcopy_pause(): wait for a recovery; False if the source quits meanwhile. Parked
        here, this thread sends no more, so the recovery may reload the dirty bitmap: a page
        claimed after the reload would be lost with the broken channel it went on."""
        self.parked.set()
        try:
            while not self.resumed.wait(0.1):
                if self.quit.is_set():
                    return False
        finally:
            self.parked.clear()
        return True

    def _postcopy_stream(self) -> bool:
        """migration_thread() in postcopy until nothing is dirty (True: EOF sent) or the
        migration pauses (False): QEMU 7.1/7.2's structure, where the migration thread sends
        the urgent pages too. With migration.design 8.0 or 10.1 and preempt, the return-path
        thread sends them itself (RAMState.save_host_page_urgent()), past the gate and the
        budget: no request is queued, so this loop only streams the background and its rate
        limit is never woken (vanilla keeps the 7.x path in 8.0)."""
        pacer = self.pacer[1]
        urgent = False
        while not self._phase_over() and self._package_loaded(False):
            if urgent or not pacer.exceeded():
                if pacer.exceeded():  # woken for a request, but the gate lets nothing through
                    self._spin(pacer)
                elif not self._ram_save_iterate(pacer, "postcopy-bytes"):
                    if not self._package_loaded(True):
                        return False
                    self._send_eofs()
                    return True
            urgent = self._rate_limit(pacer)
        return False

    def _ram_save_iterate(self, pacer: Pacer, counter: str) -> bool:
        """ram_save_iterate(): pages while main is under budget or a request waits, at most
        MAX_WAIT (QEMU looks at the clock every 64 host pages, we at every record), then EOS
        and a flush of main. False if nothing was left to send."""
        t0 = self.clock.now()
        queued = self.rs.queue.nonempty
        while not pacer.exceeded() or queued.is_set():
            if not self._find_and_save_block(pacer, counter):
                return False
            if self.clock.now() - t0 > MAX_WAIT or self._phase_over():
                break
        self.main.flush()
        return True

    def _find_and_save_block(self, pacer: Pacer, counter: str) -> bool:
        """ram_find_and_save_block(): the queue first, then the huge page break-huge
        interrupted, then the next dirty page. False if there is nothing to send."""
        rs = self.rs
        postcopy = counter == "postcopy-bytes"
        break_huge = self.tpp > 1 and not versions.preempt_full(self.cfg) and \
            self.cfg["migration.x-postcopy-preempt-break-huge"]
        preempt = self.preempt if postcopy and break_huge else None
        # 8.0: preempt requests never reach the queue; what does (the preempt channel not up)
        # goes on main, the return-path thread owning preempt
        urgent = [] if rs.rp_sends else self.preempts

        def rate_limit() -> bool:  # ram_save_host_page()'s call, inside a huge page
            return self._rate_limit(pacer)

        if postcopy and (rs.serve_queued_page(self.main, urgent, pacer)
                         or rs.resume_preempted(self.main, counter, pacer, preempt, rate_limit)):
            return True
        if postcopy and self.nonblocking and not self._main_room():
            return True  # a request came while main was full: this loop serves it next
        page = rs.find_dirty_block()
        if not postcopy and rs.pss.complete_round:  # ram_save_pending()
            # find_dirty_block(): a round complete, the pages of the next may be sent again
            if not self._multifd_sync():
                return False
            rs.migration_bitmap_sync()
        if page is None:
            return False
        if self.multifd and not postcopy:  # ram_save_target_page(): not in postcopy (10.1)
            self._save_multifd_page(page, pacer)
        else:
            rs.save_host_page(self.main, page, counter, pacer, preempt, rate_limit)
        return True

    def _save_multifd_page(self, page: int, pacer: Pacer | None) -> None:
        """ram_save_multifd_page(): claim the run of dirty pages `page` starts and queue it
        on multifd; the bytes the senders wrote count against main's rate limit."""
        count = self.rs.claim_run(page)
        if count:
            # finding the pages is this thread's work (cpu.save-page), writing them the sender's
            writer = self.rs.writer
            writer.cpu.charge(count * self.tpp * writer.costs.save_page)
            writer.cpu.settle()
            self.multifd.queue_pages(page * self.tpp, count * self.tpp)
            self.rs.publish_remaining()
        if pacer:
            pacer.charge(self.multifd.take_bytes())

    def _multifd_sync(self) -> bool:
        """multifd_ram_flush_and_sync(): a SYNC on every multifd channel, then
        RAM_SAVE_FLAG_MULTIFD_FLUSH on main. True at once without multifd; False if a
        channel broke."""
        if not self.multifd:
            return True
        if not self.multifd.sync_main():
            return False
        self.main.send([wire.multifd_flush()])
        return True

    def _send_eofs(self) -> None:
        """EOF on every channel: the destination completes once each has said it, so a
        preempt channel still connecting (x-preempt-wait-channel=false) is waited for."""
        waits = self.cfg["migration.postcopy-preempt"] and \
            not self.cfg["migration.x-preempt-wait-channel"]
        if waits and not self._preempt_wait("eof"):
            raise ChannelError(self.preempt_error or "preempt channel: not connected")
        for ep in (self.main, *self.preempts):
            if ep:
                ep.send([wire.eof()])

    def _wait_for(self, event: threading.Event) -> bool:
        """Wait for `event` (a reply from the destination, the migration thread parking);
        False if the channels broke or the source quits meanwhile."""
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
        self.rs.migration_bitmap_sync()  # ram_save_complete()
        if self.multifd:
            self.multifd.counter = "downtime-bytes"
        while (page := self.rs.find_dirty_block()) is not None:
            if self.multifd:
                self._save_multifd_page(page, None)
            else:
                self.rs.save_host_page(self.main, page, "downtime-bytes")
        if not self._multifd_sync():
            return False
        self.main.send([wire.device_state({"vcpus": [w.pos for w in self.workloads]})])
        self.board["downtime"] = self.clock.now() - t_stop
        return True

    def _start_vcpus(self) -> None:
        """Run the vCPUs from where their workloads stand (a thread runs once: new ones)."""
        self.vcpu_stop = threading.Event()
        memory = SourceMemory(self.guest_ram, self.rs.dirty, self.tpp)
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
        """Main's rate limit, from `parameter` on: one for the whole migration, as QEMU keeps
        it in the main QEMUFile, so a new rate applies to the window under way."""
        if self.pacer is None:
            self.pacer = (parameter, Pacer(self.rates[parameter], self.clock.now()))
        pacer = self.pacer[1]
        pacer.rate = self.rates[parameter]
        self.pacer = (parameter, pacer)
        return pacer

    def _phase_over(self) -> bool:
        """The migration thread has something else to do than stream: the switchover was
        asked for in precopy, or the migration ended, paused or is quitting."""
        status = self.state.status
        if status == "active":
            return self.switchover.is_set()
        return self.quit.is_set() or status not in ("postcopy-active", "postcopy-device")

    def _host_page_bytes(self) -> int:
        """What main is given for one background host page (a run of small pages: a record),
        headers included: the room x-main-nonblocking waits for before claiming one."""
        return wire.pages_bytes(self.tpp if self.tpp > 1 else self.rs.piece, self.rs.writer.record)

    def _main_room(self) -> bool:
        """migration.x-main-nonblocking (the cover letter's TODO "Avoid precopy write() blocks
        postcopy", solution 1): main as a non-blocking socket. The migration thread never
        sleeps in write() on it: with no room for the next host page it waits for room or a
        request, whichever comes first (a poll() on main and the request semaphore). True: room,
        write on; False: a request waits (or the phase is over), serve it first."""
        main, queued = self.main, self.rs.queue.nonempty
        if main.wait_room(self._page_bytes, lambda: True):
            return True  # room now: never traced
        if TRACE_MAIN_FULL.enabled:
            TRACE_MAIN_FULL(queued=main.outstanding, size=self._page_bytes,
                            then="serve" if queued.is_set() else "wait")
        room = main.wait_room(self._page_bytes, lambda: queued.is_set() or self._phase_over())
        if TRACE_MAIN_WRITABLE.enabled:
            TRACE_MAIN_WRITABLE(urgent=int(not room and queued.is_set()))
        return room

    def _wake_main(self) -> None:
        """A request was queued: a wait for room on main looks at the queue again."""
        main = self.main
        if main is not None:
            main.wake()

    def _rate_limit(self, pacer: Pacer) -> bool:
        """migration_rate_limit(): start a new window once 100 ms have passed; over budget,
        sleep until the window ends or a request is queued (rate_limit_sem). True if woken
        for a request (urgent); the call inside a huge page goes on with it whatever this
        says, so there a waiting request lets the rest of the page through unthrottled."""
        pacer.update(self.clock.now())
        if not pacer.exceeded():
            return False
        if TRACE_RATE_LIMIT_PRE.enabled:  # in emulated ms, as the figures are
            TRACE_RATE_LIMIT_PRE(ms=round((pacer.end - self.clock.now()) * 1000))
        self.main.flush()
        urgent = self._sem_timedwait(pacer.end)
        if TRACE_RATE_LIMIT_POST.enabled:
            TRACE_RATE_LIMIT_POST(urgent=int(urgent))
        return urgent

    def _sem_timedwait(self, until: float) -> bool:
        """qemu_sem_timedwait(&rate_limit_sem, ms) == 0, then qemu_sem_post() again: the
        semaphore counts the requests queued and not yet taken (ram_save_queue_pages() posts,
        unqueue_page() consumes), so it is the queue's being non-empty, which this wait
        leaves as it found it. True at once while a request waits."""
        queued = self.rs.queue.nonempty
        while not queued.is_set():
            wait = self.clock.real_wait(until)
            if wait <= 0 or self._phase_over():
                return False
            queued.wait(min(wait, 0.01))
        return True

    def _spin(self, pacer: Pacer) -> None:
        """Woken for a request while over budget: QEMU's migration thread loops through the
        gate (qemu_savevm_state_iterate() returns at once) and migration_rate_limit(), whose
        wait returns at once while the request stays queued, sending nothing until the
        window ends. It burns a core meanwhile; here it sleeps until then, traced as one
        more rate-limit step."""
        if TRACE_RATE_LIMIT_PRE.enabled:
            TRACE_RATE_LIMIT_PRE(ms=round((pacer.end - self.clock.now()) * 1000))
        while not self.clock.sleep_until(pacer.end, 0.01):
            if self._phase_over():
                break
        if TRACE_RATE_LIMIT_POST.enabled:
            TRACE_RATE_LIMIT_POST(urgent=1)

    # ---- recovery ----

    def _resume(self, address: str) -> None:
        """QEMU's recovery handshake: reconnect, RECV_BITMAP (every page the destination did
        not receive becomes dirty again: what was in flight is lost), POSTCOPY_RESUME,
        RESUME_ACK. A failure anywhere goes back to postcopy-paused. A new connection can
        break as soon as it is made (its reader thread then pauses the migration): each step
        changes the state only from the one before it, so that pause is never overwritten.
        Before 9.1 (versions.recover_setup) it connects in postcopy-paused, and a connection
        that fails leaves it there without a word."""
        connecting = "postcopy-recover-setup" if versions.recover_setup(self.cfg) \
            else "postcopy-paused"
        if not self.state.set("postcopy-paused", connecting):  # migrate_prepare()
            return
        self.rp.bitmap_received.clear()
        self.rp.resume_ack.clear()
        # QEMU's migration thread runs the handshake once woken in postcopy_pause(); ours
        # runs here, once the migration thread has seen the failure and parked there
        while not self.parked.wait(0.05):
            if self.quit.is_set() or self.state.status != connecting:
                return
        try:
            self._connect(address)
        except (OSError, ChannelError) as err:
            self._fd_error(f"recovery: {err}")
            return
        # migrate_fd_connect(): a new main QEMUFile, its rate limit max-postcopy-bandwidth
        # and nothing counted yet (the migration thread is parked: the pacer is ours)
        if self.pacer:
            self.pacer[1].used = 0
        if not self.state.set(connecting, "postcopy-recover"):
            return
        try:
            if not self._resume_handshake():
                return
        except (OSError, ChannelError) as err:
            self._channel_failed(f"recovery: {err}")
            return
        with self.lock:  # a pause clears `resumed` under this lock: it must come after this
            if self.state.set("postcopy-recover", "postcopy-active"):
                self.resumed.set()  # migrate_handle_rp_resume_ack()


    def _resume_handshake(self) -> bool:
        """postcopy_do_resume(): RECV_BITMAP and its answer, the preempt channel (where the
        design waits for it), POSTCOPY_RESUME and RESUME_ACK. False if it broke meanwhile."""
        early = not versions.preempt_after_main(self.cfg)
        if early and not self._recovery_preempt():
            return False
        self.main.send([wire.command(wire.MIG_CMD_RECV_BITMAP, bytes([len(wire.BLOCK)])
                                     + wire.BLOCK)])
        if not self._wait_for(self.rp.bitmap_received):
            return False
        if not early and not self._recovery_preempt():
            return False
        self.main.send([wire.command(wire.MIG_CMD_POSTCOPY_RESUME)])
        return self._wait_for(self.rp.resume_ack)

    def _fd_error(self, reason: str) -> None:
        """migrate_fd_error(): a recovery could not connect. From postcopy-recover-setup (9.1)
        back to postcopy-paused; before 9.1 the state stays postcopy-paused and only the
        trace tells (what 9.1's state is for)."""
        if TRACE_FD_ERROR.enabled:
            TRACE_FD_ERROR(error_desc=reason)
        self._channel_failed(reason)

    def _recovery_preempt(self) -> bool:
        """The recovery's preempt channel: 7.1 waits for it in postcopy_pause() before the
        handshake, 8.0 connects it after the bitmaps went both ways (postcopy_do_resume()),
        main being up for sure then. If it cannot connect, the migration pauses again."""
        if self._preempt_wait_channel("recovery"):
            return True
        if not self.quit.is_set():
            self._channel_failed(self.preempt_error or "preempt channel: not connected")
        return False


def main(control, bufs: dict, cfg: Config) -> None:
    src = Source(control, bufs, cfg)
    control.serve({"migrate": src.migrate, "migrate-resume": src.resume,
                   "migrate-pause": src.pause, "migrate-start-postcopy": src.start_postcopy,
                   "migrate_cancel": src.cancel, "stop": src.stop_guest, "cont": src.cont_guest,
                   "migrate-set-parameters": src.set_parameters,
                   "x-delay-connect": src.delay_connect})
    src.shutdown()
