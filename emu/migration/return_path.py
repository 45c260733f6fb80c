"""The source's return-path thread: QEMU's source_return_path_thread() (migration.c).

It reads the destination's MIG_RP_MSG_* messages off the main channel: page requests go to
RAMState's queue (ram_save_queue_pages()), or from QEMU 8.0 on in preempt mode straight out
on the preempt channel from this thread (ram_save_host_page_urgent()); a received bitmap
reloads the dirty bitmap, and RESUME_ACK and SHUT wake the migration thread, which waits for
them. A message that makes no sense breaks the connection, as in QEMU (mark_source_rp_bad()).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from emu import trace
from emu.board import Board
from emu.child import start_thread
from emu.cpu import CpuThread
from emu.migration import wire
from emu.migration.ram_save import RBNAME, Preempt, RAMState, RecordWriter
from emu.net.channel import ChannelError, Endpoint

TRACE_ENTRY = trace.point("source_return_path_thread_entry")
TRACE_LOOP_TOP = trace.point("source_return_path_thread_loop_top")
TRACE_PONG = trace.point("source_return_path_thread_pong")
TRACE_SHUT = trace.point("source_return_path_thread_shut")
TRACE_RESUME_ACK = trace.point("source_return_path_thread_resume_ack")
TRACE_REQ_PAGES = trace.point("migrate_handle_rp_req_pages")
TRACE_RECV_BITMAP = trace.point("migrate_handle_rp_recv_bitmap")
TRACE_PACKAGE_LOADED = trace.point("source_return_path_thread_postcopy_package_loaded")


class ReturnPath:
    """What the return-path thread tells the migration thread (QEMU's rp_state)."""

    def __init__(self, rs: RAMState, board: Board, npages: int,
                 on_error: Callable[[str, Endpoint], None]) -> None:
        self.rs = rs
        self.board = board
        self.npages = npages
        self.on_error = on_error  # (reason, the connection that broke)
        # this thread's CPU time per message (cpu.return-path-message), in emulated time
        self.cpu = CpuThread("return-path", rs.clock, board)
        self.cost = rs.writer.costs.return_path_message
        # QEMU 8.0 on, preempt mode: this thread sends requested pages on the preempt channel
        # (the source sets it once connected: with migration.x-preempt-channels, a list), its
        # own CPU time charged for them
        self.preempt: Preempt = None
        self.writer = RecordWriter(rs.writer.raw, board, self.cpu, rs.writer.costs,
                                   rs.writer.page_size)
        self.writer.postcopy_records()  # it sends in postcopy only
        self.shut = threading.Event()  # the destination is done (MIG_RP_MSG_SHUT)
        self.bitmap_received = threading.Event()
        self.resume_ack = threading.Event()
        self.pong_acks = threading.Semaphore(0)  # rp_pong_acks: one per PONG (QEMU 8.0)
        # postcopy_package_loaded_event (QEMU 10.2): the destination loaded the device state
        self.package_loaded = threading.Event()
        self._handlers = {
            wire.MIG_RP_MSG_REQ_PAGES: self._req_pages,
            wire.MIG_RP_MSG_REQ_PAGES_ID: self._req_pages,
            wire.MIG_RP_MSG_RECV_BITMAP: self._recv_bitmap,
            wire.MIG_RP_MSG_RESUME_ACK: self._resume_ack,
            wire.MIG_RP_MSG_SHUT: self._shut,
            wire.MIG_RP_MSG_PONG: self._pong,
        }

    def start(self, ep: Endpoint) -> threading.Thread:
        """A return-path thread for a new main channel (one per connection, recovery too)."""
        return start_thread("return-path", self._thread, ep)

    def _thread(self, ep: Endpoint) -> None:
        if TRACE_ENTRY.enabled:
            TRACE_ENTRY()
        try:
            while True:
                if TRACE_LOOP_TOP.enabled:
                    TRACE_LOOP_TOP()
                self.handle(*wire.decode_rp(ep.recv()))
        except (ChannelError, wire.ProtocolError) as err:
            if not self.shut.is_set():  # after SHUT the destination closes: no failure
                self.on_error(f"return path: {err}", ep)

    def handle(self, kind: int, data: bytes) -> None:
        """One message; wire.ProtocolError if it makes no sense."""
        self.cpu.charge(self.cost)  # read, parse, queue, wake: before the request is seen
        self.cpu.settle()
        if handler := self._handlers.get(kind):
            handler(kind, data)

    def _req_pages(self, kind: int, data: bytes) -> None:
        offset, length = wire.parse_req_pages(kind, data)
        if TRACE_REQ_PAGES.enabled:
            TRACE_REQ_PAGES(rbname=RBNAME, start=offset, len=length)
        preempt = self.preempt
        if self.rs.rp_sends and preempt:  # postcopy_preempt_active()
            self.rs.save_host_page_urgent(preempt, offset, self.writer)
        else:
            self.rs.queue_pages(offset, length)

    def _recv_bitmap(self, kind: int, data: bytes) -> None:
        if TRACE_RECV_BITMAP.enabled:
            TRACE_RECV_BITMAP(rbname=RBNAME)
        self.rs.reload_bitmap(wire.parse_recv_bitmap(data, self.npages))
        self.bitmap_received.set()

    def _resume_ack(self, kind: int, data: bytes) -> None:
        if TRACE_RESUME_ACK.enabled:
            TRACE_RESUME_ACK(value=int.from_bytes(data, "big"))
        self.resume_ack.set()

    def _shut(self, kind: int, data: bytes) -> None:
        if TRACE_SHUT.enabled:
            TRACE_SHUT(value=int.from_bytes(data, "big"))
        self.shut.set()

    def _pong(self, kind: int, data: bytes) -> None:
        if TRACE_PONG.enabled:
            TRACE_PONG(value=int.from_bytes(data, "big"))
        self.board.add("pongs", 1)
        self.pong_acks.release()
        if int.from_bytes(data, "big") == wire.QEMU_VM_PING_PACKAGED_LOADED:
            if TRACE_PACKAGE_LOADED.enabled:
                TRACE_PACKAGE_LOADED()
            self.board["postcopy-package-loaded"] = 1  # what QMP's run state follows
            self.package_loaded.set()
