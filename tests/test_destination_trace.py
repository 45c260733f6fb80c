"""The destination's trace points, with QEMU's names and the fields each decision has: a fault,
its duplicate and its placement, the listen thread's commands, a pause and its recovery, how a
connection came in. The destination runs in this process (tests/wire_peer.py), so what its
points say is read straight from the sink."""

import os
import socket
import threading
import time

import numpy as np
import pytest

from emu.migration import ram as R
from emu.migration import wire
from emu.migration.placement import MAIN, Placer
from emu.net import channel
from tests.conftest import recorded
from tests.wire_peer import WAIT, closed, destination, frame, peer, read_frame

PAGE = R.TARGET_PAGE  # the tests' guests have 4 KiB host pages
UP_TO_LISTEN = [channel.MAIN_HELLO, wire.command(wire.MIG_CMD_OPEN_RETURN_PATH),
                wire.command(wire.MIG_CMD_POSTCOPY_ADVISE),
                wire.command(wire.MIG_CMD_POSTCOPY_LISTEN)]
FAULT_PATH = ("postcopy_ram_fault_thread_request", "postcopy_request_shared_page_present",
              "postcopy_page_req_add", "postcopy_page_req_del", "postcopy_place_page")


class Traced(list):
    """What the enabled points said, (name, fields) in order, from any thread."""

    def named(self, *names: str) -> list[tuple[str, dict]]:
        return [(name, fields) for name, fields in self if name in names]

    def wait_for(self, name: str, timeout: float = WAIT) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if found := self.named(name):
                return found[-1][1]
            time.sleep(0.005)
        raise AssertionError(f"no {name} in {list(self)}")


@pytest.fixture
def traced():
    yield from recorded(("postcopy_*", "loadvm_*", "pce_*"), Traced())


def ram_record(page: int, npages: int = 1) -> bytes:
    """RAM records as a source without payload sends them: headers only."""
    return wire.ram_header(page * PAGE, npages, wire.RAM_SAVE_FLAG_PAGE)


def requested_page(sock) -> int:
    kind, data = wire.decode_rp(read_frame(sock))
    return wire.parse_req_pages(kind, data)[0] // PAGE


def vcpu_faults(dst, vcpu: int, page: int) -> threading.Thread:
    """A vCPU touching `page`: it blocks in the fault path until the page is placed."""
    thread = threading.Thread(target=dst.fault_thread.fault, args=(vcpu, page), daemon=True)
    thread.start()
    return thread


def test_a_fault_its_duplicate_and_its_placement(traced):
    """vCPU 0 faults on page 5 and the page is requested; vCPU 1 faults on it too and nothing
    more is sent; the page comes on main, leaves the requested tree and is placed, and both
    vCPUs wake."""
    with destination(guest__vcpus="2") as (dst, control, path):
        sock = peer(path, *UP_TO_LISTEN)
        control.wait_state("postcopy-active")
        first = vcpu_faults(dst, 0, 5)
        assert requested_page(sock) == 5
        second = vcpu_faults(dst, 1, 5)
        traced.wait_for("postcopy_request_shared_page_present")
        sock.sendall(frame(ram_record(5)))
        first.join(WAIT)
        second.join(WAIT)
        assert not first.is_alive() and not second.is_alive()
        assert sorted(r[1] for r in dst.fault_thread.records) == [0, 1]  # both woke
        assert traced.named(*FAULT_PATH) == [
            ("postcopy_ram_fault_thread_request", {"page": 5, "offset": 5 * PAGE, "vcpu": 0}),
            ("postcopy_page_req_add", {"page": 5, "count": 1}),
            ("postcopy_ram_fault_thread_request", {"page": 5, "offset": 5 * PAGE, "vcpu": 1}),
            ("postcopy_request_shared_page_present",
             {"page": 5, "offset": 5 * PAGE, "vcpu": 1, "already": "requested"}),
            ("postcopy_page_req_del", {"page": 5, "count": 0}),
            ("postcopy_place_page", {"page": 5, "channel": "main"}),
        ]
        assert dst.board["duplicate-requests"] == 1 and dst.board["postcopy-requests"] == 1


def test_the_listen_thread_traces_each_command_it_loads(traced):
    with destination() as (_, control, path):
        sock = peer(path, *UP_TO_LISTEN, wire.ping(7))
        assert wire.decode_rp(read_frame(sock))[0] == wire.MIG_RP_MSG_PONG
        assert traced.named("loadvm_process_command", "pce_incoming_route") == [
            ("pce_incoming_route", {"route": "relayed"}),
            ("loadvm_process_command", {"com": "OPEN_RETURN_PATH", "len": 0}),
            ("loadvm_process_command", {"com": "POSTCOPY_ADVISE", "len": 0}),
            ("loadvm_process_command", {"com": "POSTCOPY_LISTEN", "len": 0}),
            ("loadvm_process_command", {"com": "PING", "len": 4}),
        ]


def test_an_urgent_page_on_the_preempt_channel(traced):
    with destination(migration__postcopy_preempt="true") as (dst, control, path):
        # both channels first: 7.1's destination loads nothing before (all_channels)
        main = peer(path, *UP_TO_LISTEN)
        preempt = peer(path, channel.PREEMPT_HELLO)
        traced.wait_for("postcopy_preempt_new_channel")
        control.wait_state("postcopy-active")
        vcpu = vcpu_faults(dst, 0, 9)
        assert requested_page(main) == 9
        preempt.sendall(frame(ram_record(9)))
        vcpu.join(WAIT)
        assert traced.wait_for("postcopy_place_page") == {"page": 9, "channel": "preempt"}
        assert dst.fault_thread.records[0][4] == 1  # the record says preempt too


def test_a_pause_its_recovery_and_the_requests_asked_again(traced):
    """The channel breaks with page 3 requested: postcopy_pause_incoming; a new main channel
    comes in on migrate-recover's address: postcopy_pause_incoming_continued; POSTCOPY_RESUME
    asks for page 3 again (postcopy_page_req_sync)."""
    with destination() as (dst, control, path):
        sock = peer(path, *UP_TO_LISTEN)
        control.wait_state("postcopy-active")
        vcpu = vcpu_faults(dst, 0, 3)
        assert requested_page(sock) == 3
        sock.close()
        control.wait_state("postcopy-paused")
        traced.wait_for("postcopy_pause_incoming")  # fired by the reader, after the state
        assert traced.named("postcopy_pause_incoming") == [("postcopy_pause_incoming", {})]
        again = f"{os.path.dirname(path)}/recover.sock"
        try:
            dst.recover(f"unix:{again}")
            sock = peer(again, channel.MAIN_HELLO, wire.ping(1))
            control.wait_state("postcopy-recover")
            traced.wait_for("postcopy_pause_incoming_continued")  # right after the state
            assert traced.named("postcopy_pause_incoming_continued") == [
                ("postcopy_pause_incoming_continued", {})]
            sock.sendall(frame(wire.command(wire.MIG_CMD_POSTCOPY_RESUME)))
            kinds = [wire.decode_rp(read_frame(sock))[0] for _ in range(2)]
            assert kinds == [wire.MIG_RP_MSG_PONG, wire.MIG_RP_MSG_RESUME_ACK]
            assert requested_page(sock) == 3
            assert traced.named("postcopy_page_req_sync") == [
                ("postcopy_page_req_sync", {"page": 3})]
            sock.sendall(frame(ram_record(3)))
            vcpu.join(WAIT)
            assert not vcpu.is_alive()
        finally:
            if os.path.exists(again):
                os.unlink(again)


def test_a_connection_straight_from_a_source_with_no_front_is_refused(traced):
    """No RELAYED mark and no front to hand it to (under `run`): closed, and traced so."""
    with destination() as (dst, _, path):
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(path)
        sock.settimeout(WAIT)
        sock.sendall(frame(channel.MAIN_HELLO))
        assert closed(sock)
        assert traced.wait_for("pce_incoming_route") == {"route": "refused"}
        assert dst.conns.channels == [None, None]


def test_placement_traces_each_host_page_and_the_request_it_resolves(traced):
    """One record places pages 1 and 2, page 2 requested: QEMU's order per page (req_del,
    then place_page) and the count of requests left; precopy placement is not postcopy's."""
    placer = Placer(np.zeros(4, np.uint8), None, PAGE)
    placer.receive(MAIN, wire.RamRecord(0, 1, wire.RAM_SAVE_FLAG_PAGE, None))  # precopy
    placer.postcopy = True
    assert placer.request(2) and placer.request(3) and not placer.request(2)
    placer.receive(MAIN, wire.RamRecord(PAGE, 2, wire.RAM_SAVE_FLAG_PAGE, None))
    placer.receive(MAIN, wire.RamRecord(2 * PAGE, 1, wire.RAM_SAVE_FLAG_PAGE, None))  # again
    assert traced.named(*FAULT_PATH) == [
        ("postcopy_page_req_add", {"page": 2, "count": 1}),
        ("postcopy_page_req_add", {"page": 3, "count": 2}),
        ("postcopy_place_page", {"page": 1, "channel": "main"}),
        ("postcopy_page_req_del", {"page": 2, "count": 1}),
        ("postcopy_place_page", {"page": 2, "channel": "main"}),
    ]
    assert placer.requested == 1  # page 3 still wanted
