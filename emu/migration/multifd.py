"""multifd: precopy pages on several connections, each with a sender thread on the source and a
receiver thread on the destination (QEMU's migration/multifd.c, multifd-nocomp.c and
multifd-zero-page.c).

The migration thread finds and claims dirty pages as before and queues them in a packet
(multifd_queue_page()); a full packet goes to the next idle channel (multifd_send()), waiting
while every channel is busy. The channel's sender thread checks the pages for zeros
(zero-page-detection=multifd, QEMU 9.0's default), writes the packet: page offsets, then the
normal pages' bytes, and charges its own CPU time (cpu.write, cpu.write-byte, cpu.zero-check):
so N channels give N threads' worth of writing, all sharing the link's bottleneck.

Packets on different channels arrive in any order, so a page sent twice must not be sent again
before the earlier copy is placed: multifd_send_sync_main() (after each complete round of the
dirty bitmap, before stop-and-copy's device state, and before postcopy starts) sends a SYNC
packet on every channel and RAM_SAVE_FLAG_MULTIFD_FLUSH on main; at that flag the destination's
listen thread waits until every receiver thread has read its SYNC (multifd_recv_sync_main()),
then lets them all go on. In postcopy (QEMU 10.1, "migration: enable multifd and postcopy
together") no page goes on multifd: the last sync before postcopy_start() leaves nothing in
flight there, and a receiver that still gets a page fails the migration (QEMU asserts).
"""

from __future__ import annotations

import queue
import threading
from typing import TYPE_CHECKING

import numpy as np

from emu import trace
from emu.board import Board
from emu.child import start_thread
from emu.clock import Clock
from emu.cpu import Costs, CpuThread
from emu.migration import wire
from emu.migration.ram import TARGET_PAGE
from emu.migration.ram_save import zero_pages
from emu.net.channel import ChannelError, Endpoint

if TYPE_CHECKING:
    from emu.migration.destination import Destination

# multifd.c's trace-events
TRACE_SEND = trace.point("multifd_send")
TRACE_RECV = trace.point("multifd_recv")
TRACE_SEND_SYNC_MAIN = trace.point("multifd_send_sync_main")
TRACE_SEND_SYNC_SIGNAL = trace.point("multifd_send_sync_main_signal")
TRACE_SEND_SYNC_WAIT = trace.point("multifd_send_sync_main_wait")
TRACE_RECV_SYNC_MAIN = trace.point("multifd_recv_sync_main")
TRACE_RECV_SYNC_SIGNAL = trace.point("multifd_recv_sync_main_signal")
TRACE_RECV_SYNC_WAIT = trace.point("multifd_recv_sync_main_wait")
TRACE_RECV_NEW_CHANNEL = trace.point("multifd_recv_new_channel")
# multifd_recv_zero_page_process(): zero pages written, or only marked received
TRACE_RECV_ZERO = trace.point("multifd_recv_zero_page_process")

POLL = 0.1  # real seconds between looks at whether to give up a wait


def sender_cost(costs: Costs, pages: int, nbytes: int, zero: int) -> float:
    """A sender thread's time for a packet: its writevs, its bytes, its zero checks; finding
    the pages (cpu.save-page) was the migration thread's."""
    return costs.save(pages, nbytes, zero) - pages * costs.save_page


class SendChannel:
    """One multifd channel of the source (MultiFDSendParams) and its sender thread."""

    def __init__(self, channel_id: int, ep: Endpoint, clock: Clock) -> None:
        self.id = channel_id
        self.ep = ep
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()  # pages (an array), SYNC, or None
        self.busy = False  # pending_job: a packet of pages is this channel's
        self.synced = threading.Semaphore(0)  # sem_sync: its SYNC packet is written
        self.cpu = CpuThread(f"multifd_send_{channel_id}", clock)
        self.packet_num = 0


class MultiFDSend:
    """The source's multifd channels; the migration thread calls queue_pages() and
    sync_main(); fail(reason) is told when a channel breaks."""

    def __init__(self, eps: list[Endpoint], board: Board, clock: Clock, costs: Costs,
                 raw: memoryview | None, packet_pages: int, fail) -> None:
        self.channels = [SendChannel(i, ep, clock) for i, ep in enumerate(eps)]
        self.board = board
        self.costs = costs
        self.raw = raw
        self.words = None if raw is None else np.frombuffer(raw, np.uint64).reshape(
            -1, TARGET_PAGE // 8)
        self.packet_pages = packet_pages  # target pages per packet at most
        self.fail = fail
        self.pages: list[np.ndarray] = []  # the packet being filled (target page numbers)
        self.counter = "precopy-bytes"  # the phase's bytes: the migration thread's to set
        self.filled = 0
        self.next = 0  # the channel multifd_send() looks at first
        self.idle = threading.Condition()
        self.sent_bytes = 0  # written by the senders, not yet charged to main's rate limit
        self.broken = False
        for ch in self.channels:
            start_thread(f"multifd_send_{ch.id}", self._sender_thread, ch)

    # ---- the migration thread ----

    def queue_pages(self, first: int, count: int) -> None:
        """multifd_queue_page(): target pages [first, first + count), claimed; a packet goes
        once full (a host page is never split between two)."""
        if self.filled + count > self.packet_pages and self.filled:
            self._send()
        self.pages.append(np.arange(first, first + count))
        self.filled += count
        if self.filled >= self.packet_pages:
            self._send()

    def take_bytes(self) -> int:
        """Bytes the senders wrote since the last call: main's rate limit counts them too
        (migration_transferred_bytes() includes multifd_bytes)."""
        with self.idle:
            sent, self.sent_bytes = self.sent_bytes, 0
        return sent

    def sync_main(self) -> bool:
        """multifd_send_sync_main(): the packet being filled goes, then a SYNC on every
        channel; wait until each is written. False if a channel broke meanwhile."""
        if self.filled:
            self._send()
        if TRACE_SEND_SYNC_MAIN.enabled:
            TRACE_SEND_SYNC_MAIN(packet_num=max(ch.packet_num for ch in self.channels))
        for ch in self.channels:
            if TRACE_SEND_SYNC_SIGNAL.enabled:
                TRACE_SEND_SYNC_SIGNAL(id=ch.id)
            ch.jobs.put(wire.MULTIFD_FLAG_SYNC)
        for ch in self.channels:
            if TRACE_SEND_SYNC_WAIT.enabled:
                TRACE_SEND_SYNC_WAIT(id=ch.id)
            while not ch.synced.acquire(timeout=POLL):
                if self.broken:
                    return False
        return not self.broken

    def shutdown(self) -> None:
        """multifd_send_shutdown(): the sender threads end, their connections close."""
        self.broken = True  # first: a sender's write that fails now is no failure
        for ch in self.channels:
            ch.jobs.put(None)
            ch.ep.close()

    def _send(self) -> None:
        """multifd_send(): the packet to the next idle channel, round robin."""
        pages, self.pages, self.filled = np.concatenate(self.pages), [], 0
        n = len(self.channels)
        with self.idle:
            while True:
                idle = [ch for k in range(n)
                        if not (ch := self.channels[(self.next + k) % n]).busy]
                if idle or self.broken:
                    break
                self.idle.wait(POLL)
            if not idle:
                return  # a channel broke: the migration fails, the pages are lost with it
            ch = idle[0]
            ch.busy = True
            self.next = (ch.id + 1) % n
        ch.jobs.put((pages, self.counter))

    # ---- the sender threads ----

    def _sender_thread(self, ch: SendChannel) -> None:
        """multifd_send_thread(): write what the migration thread hands over."""
        try:
            while (job := ch.jobs.get()) is not None:
                if isinstance(job, tuple):
                    self._write_packet(ch, *job)
                    with self.idle:
                        ch.busy = False
                        self.idle.notify_all()
                else:
                    self._write(ch, wire.MULTIFD_FLAG_SYNC, np.zeros(0, np.int64),
                                np.zeros(0, np.int64), "precopy-bytes")
                    ch.synced.release()
        except ChannelError as err:
            if not self.broken:
                self.broken = True
                self.fail(f"multifd channel {ch.id}: {err}")
            with self.idle:
                self.idle.notify_all()

    def _write_packet(self, ch: SendChannel, pages: np.ndarray, counter: str) -> None:
        """multifd_send_prepare(): zero pages told apart here (multifd_send_zero_page_detect()),
        the normal ones' bytes read straight from guest RAM as the packet is written."""
        zero = np.zeros(len(pages), bool) if self.words is None else zero_pages(
            self.words[pages])
        self._write(ch, 0, pages[~zero], pages[zero], counter)

    def _write(self, ch: SendChannel, flags: int, normal: np.ndarray, zero: np.ndarray,
               counter: str) -> None:
        header = wire.multifd_header(flags, ch.packet_num, normal * TARGET_PAGE,
                                     zero * TARGET_PAGE)
        size = len(normal) * TARGET_PAGE
        ch.cpu.charge(sender_cost(self.costs, len(normal) + len(zero), len(header) + size,
                                  len(zero)))
        ch.cpu.settle()
        if TRACE_SEND.enabled:
            TRACE_SEND(id=ch.id, packet_num=ch.packet_num, normal=len(normal), zero=len(zero),
                       flags=flags, next_packet_size=size)
        if self.raw is None:
            ch.ep.send([header], virt=size)
        else:
            ch.ep.send([header, *self._runs(normal)])
        ch.packet_num += 1
        b = self.board
        total = len(header) + size
        b.add("multifd-bytes", total)
        b.add("transferred", total)
        b.add(counter, total)
        b.add("normal", len(normal))
        b.add("normal-bytes", size)
        b.add("duplicate", len(zero))
        with self.idle:
            self.sent_bytes += total

    def _runs(self, pages: np.ndarray) -> list[memoryview]:
        """The bytes of target pages `pages` (ascending), one view per contiguous run."""
        if not len(pages):
            return []
        starts = np.flatnonzero(np.diff(pages, prepend=-2) != 1)
        ends = [*starts[1:], len(pages)]
        return [self.raw[int(pages[s]) * TARGET_PAGE:(int(pages[e - 1]) + 1) * TARGET_PAGE]
                for s, e in zip(starts, ends, strict=True)]


class RecvChannel:
    """One multifd channel of the destination (MultiFDRecvParams)."""

    def __init__(self, channel_id: int, ep: Endpoint, cpu: CpuThread) -> None:
        self.id = channel_id
        self.ep = ep
        self.cpu = cpu
        self.synced = threading.Semaphore(0)  # main's sem_sync: its SYNC came
        self.release = threading.Semaphore(0)  # its own sem_sync: main let it go on
        self.packet_num = 0


class MultiFDRecv:
    """The destination's multifd channels (the connections give them as their hellos come)
    and the listen thread's side of the sync."""

    def __init__(self, dst: Destination) -> None:
        self.dst = dst
        self.nchannels = dst.cfg["migration.multifd-channels"]
        self.channels: list[RecvChannel | None] = [None] * self.nchannels
        self.arrived = threading.Condition()
        self.costs = Costs.from_config(dst.cfg)
        self.tpp = dst.cfg.target_pages_per_host_page

    @property
    def complete(self) -> bool:
        return all(self.channels)

    def new_channel(self, channel_id: int, ep: Endpoint, cpu: CpuThread) -> RecvChannel | None:
        """multifd_recv_new_channel(): channel `channel_id` is in; None if there is no such
        channel, or it is in already (a stranger's hello)."""
        with self.arrived:
            if not 0 <= channel_id < self.nchannels or self.channels[channel_id]:
                return None
            ch = self.channels[channel_id] = RecvChannel(channel_id, ep, cpu)
            self.arrived.notify_all()
        if TRACE_RECV_NEW_CHANNEL.enabled:
            TRACE_RECV_NEW_CHANNEL(id=channel_id)
        return ch

    def recv_sync_main(self) -> bool:
        """multifd_recv_sync_main(), at RAM_SAVE_FLAG_MULTIFD_FLUSH on main: wait until every
        channel has read its SYNC, so that every page sent before it is placed, then let them
        all go on. False if the migration stops meanwhile."""
        for channel_id in range(self.nchannels):
            if TRACE_RECV_SYNC_WAIT.enabled:
                TRACE_RECV_SYNC_WAIT(id=channel_id)
            ch = self._wait_channel(channel_id)
            while ch is not None and not ch.synced.acquire(timeout=POLL):
                if self.dst.stop.is_set():
                    return False
            if ch is None:
                return False
        packet_num = max(ch.packet_num for ch in self.channels)
        if TRACE_RECV_SYNC_MAIN.enabled:
            TRACE_RECV_SYNC_MAIN(packet_num=packet_num)
        for ch in self.channels:
            if TRACE_RECV_SYNC_SIGNAL.enabled:
                TRACE_RECV_SYNC_SIGNAL(id=ch.id)
            ch.release.release()
        return True

    def _wait_channel(self, channel_id: int) -> RecvChannel | None:
        with self.arrived:
            while self.channels[channel_id] is None:
                if self.dst.stop.is_set():
                    return None
                self.arrived.wait(POLL)
            return self.channels[channel_id]

    def recv_thread(self, ch: RecvChannel) -> None:
        """multifd_recv_thread(): place each packet's pages as precopy does; at a SYNC, tell
        the listen thread and wait for it. A connection that ends is the end of the channel
        (the source closes it when done); one that breaks in precopy fails the migration."""
        dst = self.dst
        payload = dst.cfg["emulator.payload"]
        try:
            while True:
                packet = wire.decode_multifd(ch.ep.recv(), payload)
                if TRACE_RECV.enabled:
                    TRACE_RECV(id=ch.id, packet_num=packet.packet_num, normal=len(packet.normal),
                               zero=len(packet.zero), flags=packet.flags,
                               next_packet_size=len(packet.normal) * TARGET_PAGE)
                ch.packet_num = packet.packet_num
                if len(packet.normal) or len(packet.zero):
                    self._place(ch, packet)
                if packet.sync:
                    ch.synced.release()
                    while not ch.release.acquire(timeout=POLL):
                        if dst.stop.is_set():
                            return
        except wire.ProtocolError as err:
            dst.load_failed(f"multifd channel {ch.id}: {err}")
        except ChannelError as err:
            if dst.state.status in ("setup", "active") and not dst.stop.is_set():
                dst.channel_failed(f"multifd channel {ch.id}: {err}")

    def _place(self, ch: RecvChannel, packet: wire.MultifdPacket) -> None:
        """The packet's pages into guest RAM; the thread's time for it: its normal host pages
        read and copied, and each zero page it writes (the others only marked received)."""
        normal, zero = packet.normal // TARGET_PAGE, packet.zero // TARGET_PAGE
        write_zero = self.dst.cfg["migration.postcopy-ram"]
        page_size = self.dst.cfg.page_size
        ch.cpu.charge(self.costs.place(len(normal) // self.tpp, page_size))
        written = self.dst.placer.place_multifd(normal, packet.data, zero, write_zero)
        ch.cpu.charge(self.costs.place_zero(-(-written // self.tpp), page_size))
        ch.cpu.settle()
        if TRACE_RECV_ZERO.enabled and len(zero):
            TRACE_RECV_ZERO(id=ch.id, zero=len(zero), written=written)
