"""Placing pages on the destination: temporary pages, atomic placement, split brain."""

import threading

import numpy as np
import pytest

from emu.migration import ram as R
from emu.migration import wire
from emu.migration.placement import MAIN, PREEMPT, Placer

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
