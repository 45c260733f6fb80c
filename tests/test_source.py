"""The source's parts in-process with fake channels: page search and sending (ram_save), the
return path, the migration thread's rate limiter and recovery handshake. Mostly through the
trace points named after QEMU's trace-events."""

import threading
import time

import numpy as np
import pytest

from emu import trace
from emu.board import Board
from emu.clock import Clock
from emu.migration import ram as R
from emu.migration import wire
from emu.migration.page_requests import PageRequestQueue
from emu.migration.ram_save import Pacer, RAMState
from emu.migration.return_path import ReturnPath
from emu.migration.source import FIELDS, Source
from emu.net.channel import ChannelError
from tests.conftest import PATIENCE, config, one_write, recorded

KIB, MIB = 1 << 10, 1 << 20
HUGE = {"guest__page_size": "2MiB", "emulator__chunk": "512KiB",  # 4 records a host page
        "emulator__payload": "false"}


class FakeEndpoint:
    """Keeps the RAM records sent as (offset, target pages) and the commands; `on_send` runs
    after each message, `incoming` is what recv() returns."""

    def __init__(self, name: str, on_send=None, incoming=()) -> None:
        self.name = name
        self.records: list[tuple[int, int]] = []
        self.commands: list[int] = []
        self.on_send = on_send
        self.incoming = list(incoming)

    def send_write(self, frames, more: bool = False) -> None:
        self.send(*one_write(frames), more=more)

    def send(self, parts, virt: int = 0, more: bool = False) -> None:
        msg = wire.decode_main(b"".join(bytes(p) for p in parts), payload=False)
        if isinstance(msg, wire.RamRecord):
            self.records.append((msg.offset, msg.npages))
        elif isinstance(msg, wire.Command):
            self.commands.append(msg.cmd)
        if self.on_send:
            self.on_send()

    def flush(self) -> None:
        pass

    def recv(self) -> bytes:
        if not self.incoming:
            raise ChannelError(f"{self.name}: connection closed")
        return self.incoming.pop(0)


@pytest.fixture
def traced():
    """What the enabled trace points say, in order: [(name, fields)]."""
    yield from recorded()


def ram_state(**sets) -> RAMState:
    cfg = config(**{**HUGE, **sets})
    return RAMState(cfg, Board(FIELDS), Clock(), np.zeros(cfg.npages, np.uint8),
                    PageRequestQueue(), None)


def names(seen) -> list[str]:
    return [name for name, _ in seen]


def test_a_request_is_queued_then_sent_on_preempt(traced):
    trace.enable(["ram_save_queue_pages", "get_queued_page*"])
    rs = ram_state()
    main, preempt = FakeEndpoint("main"), FakeEndpoint("preempt")
    rs.queue_pages(3 * 2 * MIB, 2 * MIB)
    assert rs.serve_queued_page(main, preempt)
    assert traced == [
        ("ram_save_queue_pages", {"rbname": "pc.ram", "start": 6 * MIB, "len": 2 * MIB,
                                  "page": 3}),
        ("get_queued_page", {"rbname": "pc.ram", "offset": 6 * MIB, "page": 3,
                             "channel": "preempt"})]
    assert preempt.records == [(6 * MIB + i * 512 * 1024, 128) for i in range(4)]
    assert main.records == []
    assert rs.states[3] == R.SENT_PREEMPT and not rs.dirty[3]
    assert rs.board["postcopy-requests"] == 1 and rs.board["urgent-preempt"] == 1
    assert not rs.serve_queued_page(main, preempt)  # the queue is empty


def test_a_request_for_a_page_already_sent_is_dropped(traced):
    trace.enable(["get_queued_page*"])
    rs = ram_state()
    main = FakeEndpoint("main")
    assert rs.save_host_page(main, 2, "postcopy-bytes") == 1
    rs.queue_pages(2 * 2 * MIB + 4096, 4096)  # anywhere in the host page
    assert rs.serve_queued_page(main, None)
    assert traced == [("get_queued_page_not_dirty",
                       {"rbname": "pc.ram", "offset": 4 * MIB, "page": 2})]
    assert len(main.records) == 4  # the background copy only
    assert rs.board["dropped-requests"] == 1 and rs.board["urgent-main"] == 0


def test_without_preempt_an_urgent_page_goes_on_main_and_the_scan_follows_it(traced):
    trace.enable(["get_queued_page"])
    rs = ram_state()
    main = FakeEndpoint("main")
    rs.queue_pages(7 * 2 * MIB, 2 * MIB)
    assert rs.serve_queued_page(main, None)
    assert traced[0][1]["channel"] == "main"
    assert rs.states[7] == R.SENT_URGENT_MAIN and rs.board["urgent-main"] == 1
    assert rs.find_dirty_block() == 8  # the guest will likely touch the neighbours next


def test_a_page_another_sender_took_is_not_sent_again():
    rs = ram_state()
    main, preempt = FakeEndpoint("main"), FakeEndpoint("preempt")
    rs.queue_pages(0, 2 * MIB)
    rs.serve_queued_page(main, preempt)
    assert rs.save_host_page(main, 0, "postcopy-bytes") == 0  # found dirty a moment ago
    assert main.records == []


def test_a_request_beyond_ram_is_a_protocol_error():
    rs = ram_state()
    with pytest.raises(wire.ProtocolError, match="beyond RAM"):
        rs.queue_pages(32 * MIB, 4096)


def test_break_huge_leaves_a_huge_page_for_the_queue_and_comes_back_to_it(traced):
    # QEMU's postcopy_do_preempt() breaks out of ram_save_host_page(); the migration thread
    # serves the queue, then postcopy_preempt_restore() goes on with the page
    trace.enable(["postcopy_preempt_*", "get_queued_page"])
    rs = ram_state()
    preempt = FakeEndpoint("preempt")

    def request_once() -> None:  # the return path queues a page as the first record goes
        if len(main.records) == 1:
            rs.queue_pages(5 * 2 * MIB, 2 * MIB)

    main = FakeEndpoint("main", on_send=request_once)
    assert rs.save_host_page(main, 0, "postcopy-bytes", None, preempt) == 1
    assert len(main.records) == 1 and rs.pss.preempted == (0, 128)
    assert rs.serve_queued_page(main, preempt)
    assert rs.resume_preempted(main, "postcopy-bytes", None, preempt, None)
    assert rs.find_dirty_block() == 1  # the scan goes on after the interrupted page
    where = {"rbname": "pc.ram", "page": 0, "offset": 512 * 1024}
    assert names(traced) == ["postcopy_preempt_triggered", "get_queued_page",
                             "postcopy_preempt_restored"]
    assert traced[0][1] == where and traced[2][1] == where
    assert main.records == [(i * 512 * 1024, 128) for i in range(4)]  # the whole page, in order
    assert len(preempt.records) == 4 and rs.board["break-huge"] == 1


def test_without_break_huge_a_huge_page_goes_whole(traced):
    trace.enable(["postcopy_preempt_*"])
    rs = ram_state()
    main = FakeEndpoint("main", on_send=lambda: rs.queue_pages(5 * 2 * MIB, 2 * MIB))
    rs.save_host_page(main, 0, "postcopy-bytes")
    assert traced == [] and rs.board["break-huge"] == 0
    assert len(rs.queue) == 4  # waiting for the migration thread


def test_small_pages_go_as_runs_of_dirty_pages():
    rs = ram_state(guest__page_size="4KiB", emulator__chunk="64KiB")
    rs.dirty[5] = False
    main = FakeEndpoint("main")
    assert rs.save_host_page(main, 0, "precopy-bytes") == 5  # up to the clean page
    assert rs.find_dirty_block() == 6
    assert rs.save_host_page(main, 6, "precopy-bytes") == 16  # a record's worth
    assert main.records == [(0, 5), (6 * 4096, 16)]
    assert rs.board["precopy-bytes"] > 21 * 4096


def test_a_postcopy_write_of_small_pages_is_records_of_one_read_and_a_huge_page_one_record():
    # the destination places a 4 KiB page once the 32 KiB read it is in has arrived (QEMU's
    # IO_BUF_SIZE), and a huge page only once whole: so records of 32 KiB and of a whole
    # write; in precopy, where no vCPU waits, a write is one record
    writes = []

    class Frames(FakeEndpoint):
        def send(self, parts, virt: int = 0, more: bool = False) -> None:
            self.send_write([(parts, virt)], more)

        def send_write(self, frames, more: bool = False) -> None:
            writes.append([(rec.offset, rec.npages) for rec in (
                wire.decode_main(b"".join(bytes(p) for p in parts), payload=False)
                for parts, _ in frames)])

    small = ram_state(guest__page_size="4KiB", emulator__chunk="128KiB")
    assert small.save_host_page(Frames("main"), 0, "precopy-bytes") == 32
    small.writer.postcopy_records()
    assert small.save_host_page(Frames("main"), 32, "postcopy-bytes") == 32
    assert writes == [[(0, 32)], [(128 * KIB + i * 32 * KIB, 8) for i in range(4)]]
    writes.clear()
    huge = ram_state()  # 2 MiB pages, 512 KiB writes
    huge.writer.postcopy_records()
    huge.save_host_page(Frames("main"), 0, "postcopy-bytes")
    assert writes == [[(i * 512 * KIB, 128)] for i in range(4)]


def test_the_return_path_queues_requests_and_wakes_the_migration_thread(traced):
    trace.enable(["source_return_path_thread_*", "migrate_handle_rp_*", "ram_save_queue_pages"])
    rs = ram_state()
    failures = []
    rp = ReturnPath(rs, rs.board, len(rs.dirty), lambda reason, ep: failures.append(reason))
    ep = FakeEndpoint("main", incoming=[
        wire.req_pages(2 * MIB, 2 * MIB, first=True),
        wire.rp_message(wire.MIG_RP_MSG_PONG, (3).to_bytes(4, "big")),
        wire.rp_message(wire.MIG_RP_MSG_RESUME_ACK, b"\0\0\0\1"),
        wire.rp_message(wire.MIG_RP_MSG_SHUT, b"\0\0\0\0")])
    rp.start(ep).join(10)
    assert names(traced) == [
        "source_return_path_thread_entry",
        "source_return_path_thread_loop_top", "migrate_handle_rp_req_pages",
        "ram_save_queue_pages",
        "source_return_path_thread_loop_top", "source_return_path_thread_pong",
        "source_return_path_thread_loop_top", "source_return_path_thread_resume_ack",
        "source_return_path_thread_loop_top", "source_return_path_thread_shut",
        "source_return_path_thread_loop_top"]
    assert traced[2][1] == {"rbname": "pc.ram", "start": 2 * MIB, "len": 2 * MIB}
    assert traced[5][1] == {"value": 3} and traced[7][1] == {"value": 1}
    assert rs.queue.pop()[0] == 1 and rp.resume_ack.is_set() and rp.shut.is_set()
    assert rs.board["pongs"] == 1
    assert failures == []  # the connection closing after SHUT is no failure


def test_a_received_bitmap_makes_what_did_not_arrive_dirty_again(traced):
    trace.enable(["migrate_handle_rp_recv_bitmap"])
    rs = ram_state()
    for page in range(len(rs.dirty)):
        rs.save_host_page(FakeEndpoint("main"), page, "postcopy-bytes")
    received = np.ones(len(rs.dirty), bool)
    received[[3, 9]] = False
    rs.pss.preempted = (3, 128)  # break-huge left page 3 when the channel broke
    failures = []
    rp = ReturnPath(rs, rs.board, len(rs.dirty), lambda reason, ep: failures.append(reason))
    ep = FakeEndpoint("main", incoming=[wire.recv_bitmap(received)])
    rp.start(ep).join(10)
    assert traced == [("migrate_handle_rp_recv_bitmap", {"rbname": "pc.ram"})]
    assert rp.bitmap_received.is_set()
    assert np.flatnonzero(rs.dirty).tolist() == [3, 9]
    assert rs.pss.preempted is None  # a huge page left half sent goes again whole
    assert rs.states[3] == R.UNSENT and rs.states[4] == R.SENT_MAIN
    assert failures == ["return path: main: connection closed"]  # no SHUT came


class Control:
    def emit(self, event) -> None:
        pass

    def fail(self, message: str) -> None:
        raise AssertionError(message)


def source() -> Source:
    cfg = config(**HUGE)
    bufs = {"clock": bytearray(Clock.NBYTES), "src-board": bytearray(Board.nbytes(FIELDS)),
            "src-ram": bytearray(), "src-states": bytearray(cfg.npages),
            "src-queue": bytearray(PageRequestQueue.nbytes())}
    src = Source(Control(), bufs, cfg)
    src.clock.start(1.0)
    src.main, src.preempt = FakeEndpoint("main"), FakeEndpoint("preempt")
    return src


def over_budget(src: Source) -> Pacer:
    src.rates["max-bandwidth"] = 10 * MIB  # 1 MiB a window
    pacer = src._pacer("max-bandwidth")
    pacer.charge(2 * MIB)
    return pacer


def test_the_rate_limiter_waits_for_the_next_window(traced):
    trace.enable(["migration_rate_limit_*"])
    src = source()
    go_to(src, "setup", "active")
    pacer = over_budget(src)
    assert not src._rate_limit(pacer)
    assert names(traced) == ["migration_rate_limit_pre", "migration_rate_limit_post"]
    assert 0 < traced[0][1]["ms"] <= 100
    assert traced[1][1] == {"urgent": 0}
    assert src.clock.now() >= pacer.end
    assert not src._rate_limit(pacer) and pacer.used == 0  # the next window, from now
    assert len(traced) == 2


def go_to(src: Source, *statuses: str) -> None:
    for old, new in zip(("none", *statuses), statuses, strict=False):
        assert src.state.set(old, new)


POSTCOPY = ("setup", "active", "device", "postcopy-active")


def test_a_queued_request_wakes_the_rate_limiter_but_is_not_sent_by_it(traced):
    # rate_limit_sem: the wait returns at once, the page goes only from ram_save_iterate()
    trace.enable(["migration_rate_limit_post", "get_queued_page"])
    src = source()
    go_to(src, *POSTCOPY)
    pacer = over_budget(src)
    src.rs.queue_pages(4 * MIB, 2 * MIB)
    assert src._rate_limit(pacer)
    assert traced == [("migration_rate_limit_post", {"urgent": 1})]
    assert src.preempt.records == [] and len(src.rs.queue) == 1


def test_the_bitmap_lock_is_taken_by_the_scan():
    rs = ram_state()
    found = []
    with rs.bitmap_mutex:
        scan = threading.Thread(target=lambda: found.append(rs.find_dirty_block()))
        scan.start()
        scan.join(0.2)
        assert found == []  # waits for the lock
    scan.join(10)
    assert found == [0]


def test_the_recovery_waits_for_the_migration_thread_to_park():
    """QEMU's migration thread runs the recovery handshake itself, once parked in
    postcopy_pause(): a page it claimed after the bitmap reload would be lost."""
    src = source()
    go_to(src, *POSTCOPY, "postcopy-paused")
    new_main = FakeEndpoint("main")
    src._connect = lambda address: setattr(src, "main", new_main)
    resume = threading.Thread(target=src._resume, args=("unix:/new",))
    resume.start()
    try:
        # before 9.1 the source stays postcopy-paused while the recovery waits to connect
        resume.join(0.2)
        assert resume.is_alive() and src.state.status == "postcopy-paused"
        assert new_main.commands == []  # the migration thread streams still: no RECV_BITMAP
        src.parked.set()
        until(lambda: new_main.commands == [wire.MIG_CMD_RECV_BITMAP])
        src.rp.bitmap_received.set()
        until(lambda: new_main.commands[-1] == wire.MIG_CMD_POSTCOPY_RESUME)
        src.rp.resume_ack.set()
        resume.join(PATIENCE)
        assert src.state.status == "postcopy-active" and src.resumed.is_set()
    finally:
        src.quit.set()
        resume.join(PATIENCE)


def until(condition) -> None:
    deadline = time.monotonic() + PATIENCE
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.01)
