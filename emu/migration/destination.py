"""The destination: receives guest RAM and, after switchover, runs the guest on it.

Threads, as QEMU names them: the listen thread reads the main channel, the preempt thread the
preempt channel (both place pages), the fault thread turns vCPU faults into page requests on the
return path, and the vCPU threads run the workload and block on pages that are not present.
Connections come in on the address of migrate-incoming (and of migrate-recover after a failure);
the hello in each connection's first frame says which channel it is. A connection through an
emulated link starts with the link's RELAYED frame; one without it comes straight from a source,
and goes through the program's own link (its front, link.py) if it has one, or is closed.

During postcopy, a broken channel pauses the migration (postcopy-paused) instead of failing it:
the guest keeps running here, and only vCPUs touching missing pages stay blocked.
"""

from __future__ import annotations

import queue
import selectors
import socket
import threading
import time

import numpy as np

from emu import shm
from emu.board import LAG_FIELDS, Board, lag_meter
from emu.child import start_thread
from emu.clock import Clock
from emu.config import Config
from emu.figures.metrics import FAULT_DTYPE, FaultRing
from emu.migration import ram as R
from emu.migration import wire
from emu.migration.placement import MAIN, PREEMPT, Placer
from emu.migration.states import FINAL, StateLog, after_failure, pause_refusal
from emu.migration.workload import MAX_POS, SLICED, Memory, VCpu, Workload
from emu.net import channel, link, uri
from emu.net.channel import ChannelError, Endpoint

FIELDS = ("faults", "postcopy-requests", "duplicate-requests", "present", "blocked",
          "placed-main", "placed-preempt") + LAG_FIELDS
RING = 1 << 16
PAUSES = ("postcopy-active", "postcopy-recover")  # postcopy_pause_incoming() from these


# QEMU's PostcopyState, for its "CMD_POSTCOPY_RUN in wrong postcopy state (%d)"
PS_NONE, PS_ADVISE, PS_LISTENING, PS_RUNNING = 0, 1, 3, 4
# real seconds from a main channel's hello to its first record: the source sends both at once
MAIN_SETUP_TIMEOUT = 5.0
TICK = 0.25  # real seconds between the accept thread's looks at its deadlines


def _admit(listener: socket.socket, pending: dict, sel) -> None:
    """Accept one connection (one per turn, so that a hello in is read before the next
    stranger can push it out) and wait for its hello."""
    try:
        sock, _ = listener.accept()
    except OSError:  # closing (the loop ends), or out of descriptors: try again soon
        time.sleep(0.05)
        return
    if len(pending) >= channel.MAX_PENDING:
        _drop(next(iter(pending)), pending, sel)
    sock.setblocking(False)
    pending[uri.tune(sock)] = channel.Hello(sock, time.monotonic() + channel.HANDSHAKE_TIMEOUT)
    sel.register(sock, selectors.EVENT_READ)


def _drop(sock: socket.socket, pending: dict, sel) -> None:
    del pending[sock]
    sel.unregister(sock)
    channel.refuse(sock)


class LoadError(ValueError):
    """The stream parses, but what it says does not fit this destination: the incoming
    migration fails (QEMU: "load of migration failed"), in postcopy too."""


def check_device_state(state: dict, cfg: Config) -> dict:
    """The device state, checked against this destination's own configuration: a vCPU
    thread starts per position, so the source must not choose how many, or what they are."""
    vcpus, n = state.get("vcpus"), cfg["guest.vcpus"]
    if not (isinstance(vcpus, list) and len(vcpus) == n
            and all(type(p) is int and 0 <= p <= MAX_POS for p in vcpus)):
        shown = repr(vcpus)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise LoadError(f"device state: 'vcpus' must be the positions of the guest's {n} "
                        f"vCPU(s), integers from 0 to {MAX_POS}, got {shown}")
    return state


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
    def __init__(self, control, bufs: dict, cfg: Config, front: str = "") -> None:
        """front: where this program's own link takes a source connected straight to it
        (a standalone destination's); "" if every source comes through a link."""
        self.control = control
        self.cfg = cfg
        self.front = front
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
        self.socket_files: list[uri.Pin] = []  # what our listeners bound
        self.lock = threading.Lock()  # channel set-up and tear-down
        self.faults: queue.SimpleQueue = queue.SimpleQueue()
        self.records: list[tuple] = []
        self.stop = threading.Event()
        self.memory = DestMemory(self)
        self.vcpus: list[VCpu] = []
        self.device: dict = {}
        self.advised = False  # POSTCOPY_ADVISE came
        self._block_named = False  # REQ_PAGES_ID names the block once per connection
        # the main channel on trial (_hello): it and when its first record is due
        self._unconfirmed: tuple[Endpoint, float] | None = None

    # ---- commands ----

    def incoming(self, address: str) -> None:
        """migrate-incoming: listen for the source's channels (qemu_start_incoming_migration)."""
        if self.state.status != "none":
            self.control.emit(("refused", "migrate-incoming",
                               "The incoming migration has already been started"))
            return
        listener = self._bind(address, "migrate-incoming")
        if listener is None:
            return  # refused, and nothing started: it may be told again, as in QEMU
        self.state.set("none", "setup")
        self._serve(listener)
        start_thread("fault", self._fault_thread)

    def recover(self, address: str) -> None:
        """migrate-recover: listen on a new address for the source to resume; may be retried."""
        if self.state.status != "postcopy-paused":
            self.control.emit(("refused", "migrate-recover",
                               "Migrate recover can only be run when postcopy is paused."))
            return
        listener = self._bind(address, "migrate-recover")
        if listener is not None:
            self._serve(listener)

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

    def _bind(self, address: str, command: str) -> socket.socket | None:
        """A listener on `address`, or None once `command` is refused with why (a file that
        is not a socket, another program's socket, a bad path: nothing of theirs is touched)."""
        self._stop_listening()
        try:
            listener = uri.listen(address)
        except (OSError, ValueError) as err:
            self.control.emit(("refused", command, str(err)))
            return None
        if pin := uri.bound_file(listener):
            self.socket_files.append(pin)
            self.control.emit(("bound", self.control.role, pin.file))  # the program removes it
        return listener

    def _serve(self, listener: socket.socket) -> None:
        self.listener = listener
        try:
            start_thread("accept", self._accept_thread, listener)
        except RuntimeError:  # can't start new thread: the command fails, and says why
            self._stop_listening()
            raise
        self.control.emit(("listening", uri.bound(listener)))

    def remove_sockets(self) -> None:
        """The program that would remove our socket files is gone (killed): remove them."""
        for pin in self.socket_files:
            pin.remove()

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
        """Accept connections and read their hellos, all in this one thread: a stranger costs
        a socket and a few bytes for channel.HANDSHAKE_TIMEOUT at most, never a thread, and
        at most channel.MAX_PENDING wait at a time."""
        pending: dict[socket.socket, channel.Hello] = {}  # oldest first
        sel = selectors.DefaultSelector()
        sel.register(listener, selectors.EVENT_READ)
        try:
            while not self.stop.is_set() and listener.fileno() >= 0:
                now = time.monotonic()
                for sock in [s for s, hello in pending.items() if hello.deadline <= now]:
                    _drop(sock, pending, sel)
                self._check_main_setup(now)
                try:
                    ready = sel.select(TICK)
                except (OSError, ValueError):
                    return  # closed: a newer listener took over, or we are done
                for key, _ in ready:
                    if key.fileobj is listener:
                        _admit(listener, pending, sel)
                    elif key.fileobj in pending:
                        self._read_hello(key.fileobj, pending, sel)
        finally:
            for sock in list(pending):
                _drop(sock, pending, sel)
            sel.close()

    def _read_hello(self, sock, pending: dict, sel) -> None:
        try:
            payload = pending[sock].read()
        except ChannelError:
            _drop(sock, pending, sel)  # not a migration stream: closed unheard
            return
        if payload is None:
            return  # more to come
        hello = pending.pop(sock)
        sel.unregister(sock)
        if hello.direct:
            self._through_front(sock, hello.read_so_far, pending, sel)
            return
        sock.setblocking(True)
        self._hello(sock, self._identify(payload), hello.arrival)

    def _through_front(self, sock, read_so_far: bytes, pending: dict, sel) -> None:
        """A connection straight from a source, with no link in between: hand it to this
        program's front, which emulates the link, and take it back from there like any
        connection through a link. With no front (under `run`), it is refused."""
        back = link.hand_over(self.front, sock, read_so_far) if self.front else None
        if back is None:
            channel.refuse(sock)
            return
        back.setblocking(False)
        pending[back] = channel.Hello(back, time.monotonic() + channel.HANDSHAKE_TIMEOUT)
        sel.register(back, selectors.EVENT_READ)

    def _identify(self, hello: bytes) -> int | None:
        """The channel a hello names, or None for anything else."""
        if hello == channel.MAIN_HELLO:
            return MAIN
        if hello == channel.PREEMPT_HELLO and self.cfg["migration.postcopy-preempt"]:
            return PREEMPT
        return None

    def _hello(self, sock, which: int | None, arrival: float) -> None:
        """A connection said which channel it is: it takes that channel's place, and its
        thread starts. A main channel is on trial until its first record (_confirm): before
        that, a newer main takes its place, as one that is a stranger's hello must not keep
        the real source out."""
        with self.lock:
            if which == MAIN and self.channels[MAIN] and not self._unconfirmed:
                which = None  # the migration stream is in: a second one is a stranger
            if which is not None:
                ep = Endpoint(sock, self.cfg["link.socket-buffer"], ("main", "preempt")[which],
                              self.lag)
                old, self.channels[which] = self.channels[which], ep
                if which == MAIN:
                    self._unconfirmed = (ep, time.monotonic() + MAIN_SETUP_TIMEOUT)
        if which is None:
            channel.refuse(sock)
            return
        self.lag(arrival)  # the hello is a frame like any other
        if old:
            old.close()
        try:
            start_thread(("listen", "preempt")[which], self._read_channel, ep, which)
        except RuntimeError:  # can't start new thread: refuse this one, keep listening
            self._forget(ep)
            return
        if which == PREEMPT:
            self._stop_listening_if_complete()

    def _confirm(self, ep: Endpoint) -> bool:
        """The first record on a main channel: a migration stream, not a stranger's hello.
        False if it was given up meanwhile."""
        with self.lock:
            if not self._unconfirmed or self._unconfirmed[0] is not ep:
                return False
            self._unconfirmed = None
        self._block_named = False
        self._stop_listening_if_complete()
        if self.state.status == "postcopy-paused":  # postcopy_try_recover()
            self.state.set("postcopy-paused", "postcopy-recover")
        return True

    def _stop_listening_if_complete(self) -> None:
        """Every channel is in: like QEMU, take no more connections (a recovery listens
        anew)."""
        with self.lock:
            complete = self.channels[MAIN] and not self._unconfirmed and (
                self.channels[PREEMPT] or not self.cfg["migration.postcopy-preempt"])
        if complete:
            self._stop_listening()

    def _check_main_setup(self, now: float) -> None:
        """A main channel that said its hello and then nothing: a stranger's, given up after
        MAIN_SETUP_TIMEOUT, while the listener stays open for the real source."""
        with self.lock:
            trial = self._unconfirmed
        if trial and trial[1] <= now:
            self._forget(trial[0], trial)

    def _forget(self, ep: Endpoint, trial: tuple | None = None) -> None:
        """Give up a channel that never carried a migration stream: nothing fails. With
        `trial`: only if that trial is still on (its first record may have come meanwhile)."""
        with self.lock:
            if trial and self._unconfirmed is not trial:
                return
            if self._unconfirmed and self._unconfirmed[0] is ep:
                self._unconfirmed = None
            for which, current in enumerate(self.channels):
                if current is ep:
                    self.channels[which] = None
        ep.close()

    def _close_channels(self) -> None:
        with self.lock:
            eps, self.channels = self.channels, [None, None]
            self._unconfirmed = None
        for ep in eps:
            if ep:
                ep.close()

    # ---- listen and preempt threads ----

    def _read_channel(self, ep: Endpoint, which: int) -> None:
        payload = self.cfg["emulator.payload"]
        unconfirmed = which == MAIN  # until its first record, it may be a stranger's
        try:
            while True:
                msg = wire.decode_main(ep.recv(), payload)
                if unconfirmed:
                    if not self._confirm(ep):
                        return  # given up: MAIN_SETUP_TIMEOUT, or a newer main took over
                    unconfirmed = False
                if self.state.status == "setup":  # process_incoming_migration_co()
                    self.state.set("setup", "active")
                if isinstance(msg, wire.RamRecord):
                    self.placer.receive(which, msg)
                elif isinstance(msg, wire.Eof):
                    self._end_of_stream(which)
                    return
                elif which == MAIN:
                    self._main_message(msg)
                else:
                    raise wire.ProtocolError("the preempt channel carries RAM only")
        except LoadError as err:
            self._load_failed(str(err))
        except (ChannelError, wire.ProtocolError) as err:
            if unconfirmed:
                self._forget(ep)  # it never was a migration stream: nothing to fail
            elif self.channels[which] is ep:  # not a connection we already replaced
                self._channel_failed(f"{ep.name} channel: {err}")

    def _main_message(self, msg) -> None:
        if isinstance(msg, wire.DeviceState):
            self.device = check_device_state(msg.state, self.cfg)
        elif msg.cmd == wire.MIG_CMD_POSTCOPY_ADVISE:
            self.advised = True
        elif msg.cmd == wire.MIG_CMD_POSTCOPY_RAM_DISCARD:
            for start, length in wire.parse_discard(msg.data):
                self.placer.discard(start // self.cfg.page_size, length // self.cfg.page_size)
        elif msg.cmd == wire.MIG_CMD_POSTCOPY_LISTEN:
            self.placer.postcopy = True
            self.state.set("active", "postcopy-active")  # postcopy_ram_listen_thread()
        elif msg.cmd == wire.MIG_CMD_POSTCOPY_RUN:
            if self.vcpus or not self.placer.postcopy:  # the guest starts here once
                raise LoadError(f"CMD_POSTCOPY_RUN in wrong postcopy state "
                                f"({self._postcopy_state()})")
            self._start_vcpus()
        elif msg.cmd == wire.MIG_CMD_PING:
            self._send_rp(wire.rp_message(wire.MIG_RP_MSG_PONG, msg.data))
        elif msg.cmd == wire.MIG_CMD_RECV_BITMAP:
            self._send_rp(wire.recv_bitmap(self.placer.states >= R.PRESENT))
        elif msg.cmd == wire.MIG_CMD_POSTCOPY_RESUME:
            self._resume()

    def _resume(self) -> None:
        """POSTCOPY_RESUME: back to postcopy-active; ask again for every page still wanted,
        since the source's queue was lost with the connection. Only from postcopy-recover
        (loadvm_postcopy_handle_resume): a channel that broke after the listen thread read
        the command has paused the migration again, and that pause stands, or no recovery
        could ever be started (no RESUME_ACK either: the channels are gone)."""
        if not self.state.set("postcopy-recover", "postcopy-active"):
            return
        self._send_rp(wire.rp_message(wire.MIG_RP_MSG_RESUME_ACK, b"\0\0\0\1"))
        for page in np.flatnonzero(self.placer.states == R.REQUESTED):
            self._request(int(page))

    def _postcopy_state(self) -> int:
        if self.vcpus:
            return PS_RUNNING
        if self.placer.postcopy:
            return PS_LISTENING
        return PS_ADVISE if self.advised else PS_NONE

    def _load_failed(self, detail: str) -> None:
        """The stream cannot be loaded here: fail, stop the guest and the channels. Only a
        broken channel pauses a postcopy migration; QEMU's listen thread fails on a load
        error (and exits)."""
        _, new = self.state.settle(lambda status: None if status in FINAL else "failed")
        if new is None:
            return
        self.control.fail(f"destination: load of migration failed: Invalid argument: {detail}")
        self.stop.set()
        self._close_channels()
        self._stop_listening()

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
        """Every channel said EOF: completed (or failed, with pages missing), from
        postcopy-active or, without postcopy, from active. A pause that landed just before
        stands: the source sends its EOFs again after the recovery, and this runs again."""
        missing = self.cfg.npages - self.placer.present
        old = "postcopy-active" if self.placer.postcopy else "active"
        if not self.state.set(old, "failed" if missing else "completed"):
            return
        self.stop.set()
        for vcpu in self.vcpus:
            vcpu.join()
        if missing:
            self.control.fail(f"destination: {missing} host pages missing at the end")
        self._send_rp(wire.rp_message(wire.MIG_RP_MSG_SHUT, b"\0\0\0\0"))
        self.control.emit(("report", "destination", self._report()))

    def _channel_failed(self, reason: str) -> None:
        """A channel broke: in postcopy the migration pauses, from postcopy-active or from
        postcopy-recover (postcopy_pause_incoming); before postcopy it fails."""
        old, new = self.state.settle(lambda status: after_failure(status, PAUSES))
        if new == "postcopy-paused":
            self.placer.drop_partial()
            self.control.emit(("paused", "destination", reason))
        elif new == "failed":
            self.control.fail(f"destination: {reason}")
        if old not in ("completed", "failed"):
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


def main(control, bufs: dict, cfg: Config, front: str = "") -> None:
    dst = Destination(control, bufs, cfg, front)
    control.on_orphan = dst.remove_sockets
    control.serve({"migrate-incoming": dst.incoming, "migrate-recover": dst.recover,
                   "migrate-pause": dst.pause})
    dst.shutdown()
