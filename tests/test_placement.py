"""Placing pages on the destination: temporary pages, atomic placement, split brain."""

import threading
from types import SimpleNamespace

import numpy as np
import pytest

from emu.board import Board
from emu.clock import Clock
from emu.cpu import Costs
from emu.figures.metrics import FaultRing
from emu.migration import ram as R
from emu.migration import wire
from emu.migration.fault_thread import FaultQueue, FaultThread
from emu.migration.placement import MAIN, PREEMPT, Bell, Placer
from tests.conftest import recorded

HUGE = 2 << 20
TPP = HUGE // R.TARGET_PAGE


def placer(npages=4, page_size=HUGE, payload=True):
    states = np.zeros(npages, np.uint8)
    mem = np.zeros((npages * page_size // R.TARGET_PAGE, R.TARGET_PAGE), np.uint8)
    return Placer(states, mem if payload else None, page_size)


def piece(page, first, n, fill):
    data = np.full(n * R.TARGET_PAGE, fill, np.uint8).tobytes()
    return wire.RamRecord(page * HUGE + first * R.TARGET_PAGE, n, wire.RAM_SAVE_FLAG_PAGE,
                          memoryview(data))


def test_huge_page_is_placed_only_when_its_last_piece_arrives():
    p = placer()
    p.postcopy = True
    for first in range(0, TPP - 8, 8):
        p.receive(MAIN, piece(1, first, 8, 7))
        assert p.states[1] == R.MISSING
        assert not p.ram[TPP:2 * TPP].any()  # nothing visible before placement
    p.receive(MAIN, piece(1, TPP - 8, 8, 7))
    assert p.states[1] == R.BACKGROUND
    assert (p.ram[TPP:2 * TPP] == 7).all()


def test_each_channel_assembles_in_its_own_temporary_page():
    """Break-huge: main is half-way through page 0 while preempt delivers page 2."""
    p = placer()
    p.postcopy = True
    p.request(2)
    p.receive(MAIN, piece(0, 0, TPP // 2, 1))
    p.receive(PREEMPT, piece(2, 0, TPP, 2))
    assert p.states[2] == R.URGENT_PREEMPT
    p.receive(MAIN, piece(0, TPP // 2, TPP // 2, 1))
    assert p.states[0] == R.BACKGROUND
    assert (p.ram[:TPP] == 1).all() and (p.ram[2 * TPP:3 * TPP] == 2).all()


def test_pieces_of_one_host_page_on_two_channels_are_rejected():
    p = placer()
    p.receive(MAIN, piece(0, 0, 8, 1))
    with pytest.raises(wire.ProtocolError, match="split brain"):
        p.receive(PREEMPT, piece(0, 0, 8, 1))


def test_a_host_page_must_be_finished_before_the_next_starts_on_a_channel():
    p = placer()
    p.receive(MAIN, piece(0, 0, 8, 1))
    with pytest.raises(wire.ProtocolError, match="expected offset"):
        p.receive(MAIN, piece(1, 0, 8, 1))


def test_requests_are_deduplicated():
    p = placer(page_size=R.TARGET_PAGE)
    assert p.request(3)
    assert not p.request(3)
    p.postcopy = True
    p.receive(MAIN, wire.RamRecord(3 * R.TARGET_PAGE, 1, wire.RAM_SAVE_FLAG_PAGE,
                                   memoryview(bytes(R.TARGET_PAGE))))
    assert p.states[3] == R.URGENT_MAIN
    assert not p.request(3)


def test_postcopy_never_overwrites_a_present_page():
    p = placer(page_size=R.TARGET_PAGE)
    p.postcopy = True
    rec = wire.RamRecord(0, 2, wire.RAM_SAVE_FLAG_PAGE, memoryview(bytes([5]) * 2 * 4096))
    p.receive(MAIN, rec)
    p.ram[0, 0] = 99  # the guest wrote it
    p.receive(MAIN, wire.RamRecord(0, 2, wire.RAM_SAVE_FLAG_PAGE,
                                   memoryview(bytes([6]) * 2 * 4096)))
    assert p.ram[0, 0] == 99 and p.ram[1, 0] == 5


def test_discard_drops_received_pages_and_their_content():
    p = placer(page_size=R.TARGET_PAGE)
    p.receive(MAIN, wire.RamRecord(0, 4, wire.RAM_SAVE_FLAG_PAGE, memoryview(bytes([9]) * 16384)))
    assert p.present == 4
    p.discard(1, 2)
    assert p.states.tolist() == [R.PRECOPY, R.DISCARDED, R.DISCARDED, R.PRECOPY]
    assert p.present == 2 and not p.ram[1:3].any()


def test_placement_wakes_a_blocked_vcpu():
    p = placer(page_size=R.TARGET_PAGE)
    p.postcopy = True
    p.request(0)
    woke = threading.Event()

    def vcpu():
        p.wait_present(0, threading.Event())
        woke.set()
    threading.Thread(target=vcpu, daemon=True).start()
    assert not woke.wait(0.05)
    p.receive(PREEMPT, wire.RamRecord(0, 1, wire.RAM_SAVE_FLAG_PAGE, memoryview(bytes(4096))))
    assert woke.wait(2)
    assert p.states[0] == R.URGENT_PREEMPT


def test_a_vcpu_waits_on_its_page_before_the_fault_thread_has_its_fault():
    # the fault thread, woken by the hand-over, must find the vCPU asleep already, not busy
    # joining the page's waiters (which it did after the hand-over before)
    p = placer(page_size=R.TARGET_PAGE)
    p.postcopy = True
    board = Board(("blocked", "faults"))
    dst = SimpleNamespace(placer=p, clock=Clock(), board=board, stop=threading.Event(),
                          cfg={"guest.vcpus": 1}, costs=Costs())
    faults = FaultThread(dst, FaultRing(memoryview(bytearray(FaultRing.nbytes(4))), 4))
    seen = []

    class HandOver:
        def put(self, fault):
            vcpu, page = fault
            seen.append(faults.bells[vcpu] in p._waiters.get(page, []))
            p.request(page)  # the fault thread's part, and the page comes
            p.receive(PREEMPT, wire.RamRecord(page * R.TARGET_PAGE, 1, wire.RAM_SAVE_FLAG_PAGE,
                                              memoryview(bytes(4096))))
    faults.faults = HandOver()
    assert faults.fault(0, 2)
    assert seen == [True]
    assert p._waiters == {} and board["faults"] == 1 and board["blocked"] == 0
    assert faults.records[0][2] == 2 and faults.records[0][4] == PREEMPT


def test_a_placement_wakes_only_the_vcpus_blocked_on_its_page():
    p = placer(page_size=R.TARGET_PAGE)
    p.postcopy = True
    stop = threading.Event()
    woke = {page: threading.Event() for page in (0, 1)}
    for page in woke:
        bell = Bell()
        assert p.expect(page, bell)

        def vcpu(page=page, bell=bell):
            p.wait_present(page, stop, bell)
            woke[page].set()
        threading.Thread(target=vcpu, daemon=True).start()
    p.receive(MAIN, wire.RamRecord(0, 1, wire.RAM_SAVE_FLAG_PAGE, memoryview(bytes(4096))))
    assert woke[0].wait(2)
    assert not woke[1].wait(0.2)
    assert list(p._waiters) == [1]
    stop.set()  # a vCPU stopped while it waits leaves the page's waiters
    assert woke[1].wait(2)
    assert p._waiters == {}
    assert not p.expect(0, Bell())  # present: nothing to wait for


def test_a_page_placed_alone_is_placed_as_in_a_run(traced_placements):
    # a requested page on its own takes a path of its own (_place_one): the same outcome
    def place(records):
        p = placer(npages=4, page_size=R.TARGET_PAGE)
        p.receive(MAIN, wire.RamRecord(0, 4, wire.RAM_SAVE_FLAG_PAGE,
                                       memoryview(bytes([1]) * 4 * 4096)))
        p.discard(2, 2)
        p.postcopy = True
        p.request(1)  # present already: not requested
        p.request(3)
        p.request(2)
        traced_placements.clear()
        for rec in records:
            p.receive(PREEMPT, rec)
        return (p.states.tolist(), p.present, p.placed, p.requested, p.ram[:, :2].tolist(),
                list(traced_placements))

    data = bytes([7]) * 4 * 4096
    run = place([wire.RamRecord(0, 3, wire.RAM_SAVE_FLAG_PAGE, memoryview(data[:3 * 4096])),
                 wire.RamRecord(3 * 4096, 1, wire.RAM_SAVE_FLAG_ZERO, None)])
    alone = [wire.RamRecord(i * 4096, 1, wire.RAM_SAVE_FLAG_PAGE,
                            memoryview(data[i * 4096:(i + 1) * 4096])) for i in range(3)]
    alone.append(wire.RamRecord(3 * 4096, 1, wire.RAM_SAVE_FLAG_ZERO, None))
    assert place(alone) == run
    states, present, placed, requested, ram, traced = run
    assert states == [R.PRECOPY, R.PRECOPY, R.URGENT_PREEMPT, R.URGENT_PREEMPT]
    assert present == 4 and placed[PREEMPT] == 2 and requested == 0
    assert ram == [[1, 1], [1, 1], [7, 7], [0, 0]]
    assert [name for name, _ in traced] == [
        "postcopy_page_req_del", "postcopy_place_page",
        "postcopy_page_req_del", "postcopy_place_page_zero"]


@pytest.fixture
def traced_placements():
    yield from recorded(("postcopy_page_req_del", "postcopy_place_page*"))


def test_a_bell_rung_before_its_wait_is_not_lost_and_rings_once():
    bell = Bell()
    assert not bell.wait(0.01)
    bell.ring()
    assert bell.wait(0.01) and not bell.wait(0.01)
    woke = threading.Event()

    def sleeper():
        if bell.wait(5):
            woke.set()
    threading.Thread(target=sleeper, daemon=True).start()
    assert not woke.wait(0.05)
    bell.ring()
    assert woke.wait(2)
    bell.close()


def test_the_fault_queue_hands_faults_over_in_order_and_blocks_when_empty():
    faults = FaultQueue()
    faults.put((0, 1))
    faults.put((1, 2))  # two puts, one wake-up: both are there
    assert faults.get() == (0, 1) and faults.get() == (1, 2)
    got = []
    reader = threading.Thread(target=lambda: got.append(faults.get()), daemon=True)
    reader.start()
    reader.join(0.05)
    assert reader.is_alive() and not got
    faults.put(None)
    reader.join(2)
    assert got == [None]
