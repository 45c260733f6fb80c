"""The destination's connections: where the source's channels come in (QEMU: the incoming half
of migration/socket.c and channel.c, migration_ioc_process_incoming()).

Connections come in on the address of migrate-incoming (and of migrate-recover after a
failure). One accept thread admits them and reads their hellos: a stranger costs a socket and a
few bytes for channel.HANDSHAKE_TIMEOUT at most, never a thread. The hello in each connection's
first frame says which channel it is. A connection through an emulated link starts with the
link's RELAYED frame; one without it comes straight from a source, and goes through this
program's own link (its front, link.py) if it has one, or is closed. A main channel is on trial
until its first record; once every channel is in, the listener closes, as QEMU's does (a
recovery listens anew).
"""

from __future__ import annotations

import selectors
import socket
import threading
import time
from typing import TYPE_CHECKING

from emu import trace
from emu.child import start_thread
from emu.config import PREEMPT_CHANNELS_MAX
from emu.cpu import CpuThread
from emu.events import Bound, Listening, Refused
from emu.migration import wire
from emu.migration.placement import MAIN, PREEMPT, slot_name
from emu.net import channel, link, uri
from emu.net.channel import ChannelError, Endpoint

if TYPE_CHECKING:
    from emu.migration.destination import Destination

# real seconds from a main channel's hello to its first record: the source sends both at once
MAIN_SETUP_TIMEOUT = 5.0
TICK = 0.25  # real seconds between the accept thread's looks at its deadlines

# postcopy-emu's own (QEMU has no emulated link): how a connection came in, route "relayed"
# (through a link: its RELAYED mark first), "front" (straight from a source, handed to this
# program's front) or "refused" (straight from a source, and no front to take it)
TRACE_ROUTE = trace.point("pce_incoming_route")
# postcopy_preempt_new_channel(): the preempt channel is in (postcopy-ram.c)
TRACE_PREEMPT_CHANNEL = trace.point("postcopy_preempt_new_channel")
# what _identify() gives multifd channel i: past every channel slot (main, the preempt ones)
MULTIFD = PREEMPT + PREEMPT_CHANNELS_MAX


def _thread_name(slot: int) -> str:
    """The thread reading the channel in `slot`: listen for main, preempt, preempt1, ... for
    the preempt channels."""
    return "listen" if slot == MAIN else channel.preempt_name(slot - PREEMPT)


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
    _wait_hello(uri.tune(sock), pending, sel)


def _wait_hello(sock: socket.socket, pending: dict, sel) -> None:
    sock.setblocking(False)
    pending[sock] = channel.Hello(sock, time.monotonic() + channel.HANDSHAKE_TIMEOUT)
    sel.register(sock, selectors.EVENT_READ)


def _drop(sock: socket.socket, pending: dict, sel) -> None:
    del pending[sock]
    sel.unregister(sock)
    channel.refuse(sock)


class Connections:
    """The listener and the channels of one incoming migration (main and, with
    postcopy-preempt, preempt: with migration.x-preempt-channels several, slots 1..N); each
    channel's reader is a thread of loadvm.py."""

    def __init__(self, dst: Destination) -> None:
        self.dst = dst
        self.channels: list[Endpoint | None] = [None] * dst.slots  # MAIN, PREEMPT...
        self.listener: socket.socket | None = None
        self.socket_files: list[uri.Pin] = []  # what our listeners bound
        # channel set-up and tear-down; re-entrant: a failure settles the state and closes the
        # channels under it (Destination.channel_failed), atomically with try_recover()
        self.lock = threading.RLock()
        # the main channel on trial (_hello): it and when its first record is due
        self._unconfirmed: tuple[Endpoint, float] | None = None

    # ---- the listener ----

    def bind(self, address: str, command: str) -> socket.socket | None:
        """A listener on `address`, or None once `command` is refused with why (a file that
        is not a socket, another program's socket, a bad path: nothing of theirs is touched)."""
        control = self.dst.control
        self.stop_listening()
        try:
            listener = uri.listen(address)
        except (OSError, ValueError) as err:
            control.emit(Refused(command, str(err)))
            return None
        if pin := uri.bound_file(listener):
            self.socket_files.append(pin)
            control.emit(Bound(control.role, pin.file))  # the program removes it
        return listener

    def serve(self, listener: socket.socket) -> None:
        self.listener = listener
        try:
            start_thread("accept", self._accept_thread, listener)
        except RuntimeError:  # can't start new thread: the command fails, and says why
            self.stop_listening()
            raise
        self.dst.control.emit(Listening(uri.bound(listener)))

    def remove_sockets(self) -> None:
        """The program that would remove our socket files is gone (killed): remove them."""
        for pin in self.socket_files:
            pin.remove()

    def stop_listening(self) -> None:
        """Really stop: close() alone leaves a socket that a thread sits in accept() on
        listening (the kernel holds it), and a recovery could not listen there again."""
        if self.listener:
            try:
                self.listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.listener.close()

    # ---- the accept thread ----

    def _accept_thread(self, listener) -> None:
        """Accept connections and read their hellos, all in this one thread: a stranger costs
        a socket and a few bytes for channel.HANDSHAKE_TIMEOUT at most, never a thread, and
        at most channel.MAX_PENDING wait at a time."""
        pending: dict[socket.socket, channel.Hello] = {}  # oldest first
        sel = selectors.DefaultSelector()
        sel.register(listener, selectors.EVENT_READ)
        try:
            while not self.dst.stop.is_set() and listener.fileno() >= 0:
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
            routed = self._through_front(sock, hello.read_so_far, pending, sel)
            if TRACE_ROUTE.enabled:
                TRACE_ROUTE(route="front" if routed else "refused")
            return
        if TRACE_ROUTE.enabled:
            TRACE_ROUTE(route="relayed")
        sock.setblocking(True)
        self._hello(sock, self._identify(payload), hello.arrival)

    def _through_front(self, sock, read_so_far: bytes, pending: dict, sel) -> bool:
        """A connection straight from a source, with no link in between: hand it to this
        program's front, which emulates the link, and take it back from there like any
        connection through a link. With no front (under `run`), it is refused (False)."""
        front = self.dst.front
        back = link.hand_over(front, sock, read_so_far) if front else None
        if back is None:
            channel.refuse(sock)
            return False
        _wait_hello(back, pending, sel)
        return True

    def _identify(self, hello: bytes) -> int | None:
        """The channel a hello names, or None for anything else."""
        if hello == channel.MAIN_HELLO:
            return MAIN
        preempt_id = channel.preempt_channel_id(hello)
        if preempt_id is not None and self.dst.cfg["migration.postcopy-preempt"] \
                and PREEMPT + preempt_id < self.dst.slots:
            return PREEMPT + preempt_id
        if self.dst.multifd and (channel_id := wire.multifd_channel_id(hello)) is not None:
            return MULTIFD + channel_id  # QEMU 10.1 tells every channel by its magic
        return None

    def _hello(self, sock, which: int | None, arrival: float) -> None:
        """A hello that names a channel: it takes that channel's place, and its reader
        thread starts. A main channel is on trial until its first record (confirm): before
        that, a newer main takes its place, as one that is a stranger's hello must not keep
        the real source out."""
        dst = self.dst
        if which is not None and which >= MULTIFD:
            self._multifd_hello(sock, which - MULTIFD, arrival)
            return
        with self.lock:
            if which == MAIN and self.channels[MAIN] and not self._unconfirmed:
                which = None  # the migration stream is in: a second one is a stranger
            if which is not None:
                ep = Endpoint(sock, dst.cfg["link.socket-buffer"], slot_name(which),
                              dst.lags[which])
                old, self.channels[which] = self.channels[which], ep
                if which == MAIN:
                    self._unconfirmed = (ep, time.monotonic() + MAIN_SETUP_TIMEOUT)
        if which is None:
            channel.refuse(sock)
            return
        dst.lag(arrival)  # the hello is a frame like any other
        if old:
            old.close()
        try:
            start_thread(_thread_name(which), dst.loadvm.read_channel, ep, which)
        except RuntimeError:  # can't start new thread: refuse this one, keep listening
            self.forget(ep)
            return
        if which >= PREEMPT:
            if TRACE_PREEMPT_CHANNEL.enabled:
                TRACE_PREEMPT_CHANNEL()
            with self.lock:  # x-preempt-channels: once every preempt channel is in
                every = all(self.channels[PREEMPT:])
            if every:
                dst.preempt_in.set()  # postcopy_qemufile_dst_done
            self._stop_listening_if_complete()

    def _multifd_hello(self, sock, channel_id: int, arrival: float) -> None:
        """multifd_recv_new_channel(): multifd channel `channel_id` and its receiver thread,
        with a CPU time of its own; a second hello for one that is in is a stranger's."""
        dst = self.dst
        cpu = CpuThread(f"multifd_recv_{channel_id}", dst.clock, dst.board)
        ep = Endpoint(sock, dst.cfg["link.socket-buffer"], f"multifd{channel_id}",
                      dst._reader_meter(cpu))
        ch = dst.multifd.new_channel(channel_id, ep, cpu)
        if ch is None:
            channel.refuse(sock)
            return
        dst.lag(arrival)
        start_thread(f"multifd_recv_{channel_id}", dst.multifd.recv_thread, ch)
        self._stop_listening_if_complete()

    # ---- the main channel's trial ----

    def confirm(self, ep: Endpoint) -> bool:
        """The first record on a main channel: a migration stream, not a stranger's hello.
        False if it was given up meanwhile."""
        with self.lock:
            if not self._unconfirmed or self._unconfirmed[0] is not ep:
                return False
            self._unconfirmed = None
        self._stop_listening_if_complete()
        self.dst.main_channel_confirmed()
        return True

    def current(self, ep: Endpoint, which: int = MAIN) -> bool:
        """Whether `ep` is still the migration's channel `which` (not closed by a failure,
        not replaced by a recovery's)."""
        return self.channels[which] is ep

    def _stop_listening_if_complete(self) -> None:
        """Every channel is in: like QEMU, take no more connections (a recovery listens
        anew)."""
        with self.lock:
            complete = self.channels[MAIN] and not self._unconfirmed and (
                all(self.channels[PREEMPT:]) or not self.dst.cfg["migration.postcopy-preempt"]
            ) and (
                not self.dst.multifd or self.dst.multifd.complete)
        if complete:
            self.stop_listening()

    def _check_main_setup(self, now: float) -> None:
        """A main channel that said its hello and then nothing: a stranger's, given up after
        MAIN_SETUP_TIMEOUT, while the listener stays open for the real source."""
        with self.lock:
            trial = self._unconfirmed
        if trial and trial[1] <= now:
            self.forget(trial[0], trial)

    def forget(self, ep: Endpoint, trial: tuple | None = None) -> None:
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

    def close_channels(self) -> None:
        with self.lock:
            eps, self.channels = self.channels, [None] * len(self.channels)
            self._unconfirmed = None
        if self.dst.multifd:
            eps += [ch.ep for ch in self.dst.multifd.channels if ch]
        for ep in eps:
            if ep:
                ep.close()
