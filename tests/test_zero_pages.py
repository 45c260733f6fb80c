"""Zero pages, as QEMU sends and places them: an all-zero 4 KiB page goes as a header and its
fill byte (RAM_SAVE_FLAG_ZERO), is counted in ram.duplicate, and is placed as zeros
(postcopy_place_page_zero); a guest that leaves memory zero (guest.populated) migrates faster.
"""

import numpy as np
import pytest

from emu.board import Board
from emu.cli import summary
from emu.clock import Clock
from emu.controller import Run, migrate
from emu.figures import integrity
from emu.migration import ram as R
from emu.migration import wire
from emu.migration.page_requests import PageRequestQueue
from emu.migration.placement import MAIN, PREEMPT, Placer
from emu.migration.ram_save import Pacer, RAMState
from emu.migration.source import FIELDS
from tests.conftest import config, one_write, recorded
from tests.test_destination_trace import (  # noqa: F401 (traced: a fixture)
    UP_TO_LISTEN,
    requested_page,
    traced,
    vcpu_faults,
)
from tests.wire_peer import WAIT, destination, frame, peer

PAGE = R.TARGET_PAGE
NPAGES = (32 << 20) // PAGE  # the tests' guests: 32 MiB
HUGE = 2 << 20
TPP = HUGE // PAGE

# The source's vCPUs write nothing before the switchover: with a touch this long a vCPU's
# first batch of touches ends long after it, so what is zero at setup is zero when sent.
IDLE_SOURCE = {"workload__pattern": "random", "workload__touch_cost": "100us",
               "migration__switchover_after": "20ms"}


# ---- the wire ----

def test_a_zero_record_is_a_header_and_a_fill_byte_per_page():
    msg = wire.zero_record(3 * PAGE, 5)
    assert len(msg) == len(wire.ram_header(0, 1, 0)) + 5
    for payload in (True, False):
        rec = wire.decode_main(msg, payload)
        assert (rec.offset, rec.npages, rec.zero, rec.data) == (3 * PAGE, 5, True, None)
    page = wire.decode_main(wire.ram_header(0, 1, wire.RAM_SAVE_FLAG_PAGE) + bytes(PAGE), True)
    assert not page.zero


@pytest.mark.parametrize("msg, why", [
    (wire.zero_record(0, 2)[:-1], "carries 1 fill bytes"),
    (wire.zero_record(0, 2) + b"\0", "carries 3 fill bytes"),
    (wire.ram_header(0, 1, wire.RAM_SAVE_FLAG_ZERO) + b"\7", "fill byte other than 0"),
    (wire.ram_header(0, 1, wire.RAM_SAVE_FLAG_ZERO | wire.RAM_SAVE_FLAG_PAGE) + b"\0", "flags"),
    (wire.ram_header(0, 0, wire.RAM_SAVE_FLAG_ZERO), "flags"),
    (wire.ram_header(100, 1, wire.RAM_SAVE_FLAG_ZERO) + b"\0", "aligned"),
])
def test_a_malformed_zero_record_is_a_protocol_error(msg, why):
    with pytest.raises(wire.ProtocolError, match=why):
        wire.decode_main(msg, payload=True)


# ---- the source ----

class Recorder:
    """A channel that keeps each RAM record as (offset, pages, zero) and what it cost."""

    name = "main"

    def __init__(self) -> None:
        self.records: list[tuple[int, int, bool]] = []
        self.charged = 0

    def send_write(self, frames, more: bool = False) -> None:
        self.send(*one_write(frames), more=more)

    def send(self, parts, virt: int = 0, more: bool = False) -> None:
        msg = b"".join(bytes(p) for p in parts)
        rec = wire.decode_main(msg, payload=True)
        self.records.append((rec.offset, rec.npages, rec.zero))
        self.charged += len(msg) + virt

    def flush(self) -> None:
        pass


def source_ram(**sets) -> tuple[RAMState, np.ndarray]:
    cfg = config(**sets)
    raw = bytearray(cfg["guest.ram"])
    ram = np.ndarray((cfg["guest.ram"] // PAGE, PAGE), np.uint8, buffer=raw)
    rs = RAMState(cfg, Board(FIELDS), Clock(), np.zeros(cfg.npages, np.uint8),
                  PageRequestQueue(), memoryview(raw))
    return rs, ram


def test_a_run_of_pages_is_split_at_its_zero_pages():
    """Pages 0-1 hold data, 2-4 are zero, 5 has one byte set in its middle (read past the
    first and last words), 6-31 zero: three kinds of record, zero ones counted as QEMU
    counts them, 9 bytes a page."""
    rs, ram = source_ram(emulator__chunk="128KiB")
    ram[0, 0] = ram[1, -1] = ram[5, PAGE // 2] = 1
    main = Recorder()
    rs.clock.start(1.0)
    assert rs.save_host_page(main, 0, "precopy-bytes") == 32  # 4 KiB pages: a run of 32
    assert main.records == [(0, 2, False), (2 * PAGE, 3, True), (5 * PAGE, 1, False),
                            (6 * PAGE, 26, True)]
    b = rs.board
    assert b["duplicate"] == 29 and b["normal"] == 3 and b["normal-bytes"] == 3 * PAGE
    zero_bytes = 3 * wire.ZERO_PAGE_BYTES + 26 * wire.ZERO_PAGE_BYTES
    assert b["transferred"] == b["precopy-bytes"] == main.charged
    assert b["transferred"] == 3 * PAGE + 2 * len(wire.ram_header(0, 1, 0)) + zero_bytes


def test_a_zero_page_costs_the_rate_limit_its_header_only():
    rs, ram = source_ram()
    ram[:32, -1] = 1  # the first record's pages hold data, the second record's are zero
    rs.clock.start(1.0)
    pacer = Pacer(10 << 20)
    rs.save_host_page(Recorder(), 0, "precopy-bytes", pacer)
    data = pacer.used
    rs.save_host_page(Recorder(), 32, "precopy-bytes", pacer)
    assert data > 32 * PAGE and pacer.used - data == 32 * wire.ZERO_PAGE_BYTES


def test_an_urgent_zero_page_goes_on_preempt():
    rs, _ = source_ram(migration__postcopy_ram="true", migration__postcopy_preempt="true")
    rs.clock.start(1.0)
    main, preempt = Recorder(), Recorder()
    rs.queue_pages(7 * PAGE, PAGE)
    assert rs.serve_queued_page(main, preempt)
    assert preempt.records == [(7 * PAGE, 1, True)] and main.records == []
    # one page alone costs its record, a little more than QEMU's 9 bytes
    assert rs.board["duplicate"] == 1
    assert rs.board["postcopy-bytes"] == len(wire.zero_record(0, 1)) > wire.ZERO_PAGE_BYTES


def test_without_payload_every_page_goes_whole():
    cfg = config(emulator__payload="false")
    rs = RAMState(cfg, Board(FIELDS), Clock(), np.zeros(cfg.npages, np.uint8),
                  PageRequestQueue(), None)
    rs.clock.start(1.0)
    sent = []

    class Headers(Recorder):
        def send(self, parts, virt: int = 0, more: bool = False) -> None:
            rec = wire.decode_main(b"".join(bytes(p) for p in parts), payload=False)
            sent.append((rec.npages, rec.zero, virt))

    rs.save_host_page(Headers(), 0, "precopy-bytes")
    assert sent == [(32, False, 32 * PAGE)] and rs.board["duplicate"] == 0


def test_the_fast_zero_check_reads_the_whole_page():
    """The first and last words tell most pages apart; a page zero there is read in full."""
    from emu.migration.ram_save import zero_pages
    words = np.zeros((4, PAGE // 8), np.uint64)
    words[1, 0] = words[2, -1] = words[3, 17] = 1
    assert zero_pages(words).tolist() == [True, False, False, False]


# ---- the destination ----

def placer(npages, page_size, payload=True) -> Placer:
    states = np.zeros(npages, np.uint8)
    mem = np.full((npages * page_size // PAGE, PAGE), 0, np.uint8) if payload else None
    return Placer(states, mem, page_size)


def zero(offset: int, n: int) -> wire.RamRecord:
    return wire.decode_main(wire.zero_record(offset, n), payload=True)


def data(offset: int, n: int, fill: int) -> wire.RamRecord:
    return wire.RamRecord(offset, n, wire.RAM_SAVE_FLAG_PAGE,
                          memoryview(bytes([fill]) * (n * PAGE)))


@pytest.fixture
def placed_points():
    yield from recorded(("postcopy_place_page*", "postcopy_page_req_del"))


def test_4k_zero_pages_are_placed_as_zero_pages_and_wake_the_vcpu(placed_points):
    p = placer(8, PAGE)
    p.postcopy = True
    p.request(3)
    p.receive(PREEMPT, zero(2 * PAGE, 3))
    assert p.states[2:5].tolist() == [R.BACKGROUND, R.URGENT_PREEMPT, R.BACKGROUND]
    assert p.present == 3 and p.requested == 0
    assert placed_points == [
        ("postcopy_place_page_zero", {"page": 2, "channel": "preempt"}),
        ("postcopy_page_req_del", {"page": 3, "count": 0}),
        ("postcopy_place_page_zero", {"page": 3, "channel": "preempt"}),
        ("postcopy_place_page_zero", {"page": 4, "channel": "preempt"})]


def test_a_precopy_zero_page_overwrites_what_an_earlier_copy_left():
    p = placer(4, PAGE)
    p.receive(MAIN, data(PAGE, 1, 9))
    p.receive(MAIN, zero(PAGE, 1))  # the guest zeroed it, and it went again
    assert not p.ram.any() and p.states[1] == R.PRECOPY


def test_a_huge_page_of_zero_pieces_is_a_zero_page(placed_points):
    p = placer(2, HUGE)
    p.postcopy = True
    p.ram[:] = 5  # what must be overwritten (a missing page holds zeros; be sure it is placed)
    for first in range(0, TPP, 128):
        p.receive(MAIN, zero(first * PAGE, 128))
    assert p.states[0] == R.BACKGROUND and not p.ram[:TPP].any() and (p.ram[TPP:] == 5).all()
    assert placed_points == [("postcopy_place_page_zero", {"page": 0, "channel": "main"})]


def test_a_mixed_huge_page_is_assembled_with_its_zero_pieces_memset(placed_points):
    """The channel's temporary page held another page's bytes: the zero pieces must not
    show them (ram_load_postcopy() memsets each one)."""
    p = placer(2, HUGE)
    p.postcopy = True
    for first in range(0, TPP, 256):  # page 0, all data, leaves the temporary page full of 7s
        p.receive(MAIN, data(first * PAGE, 256, 7))
    p.receive(MAIN, zero(HUGE, 100))
    p.receive(MAIN, data(HUGE + 100 * PAGE, 1, 3))
    p.receive(MAIN, zero(HUGE + 101 * PAGE, TPP - 101))
    mem = p.ram[TPP:]
    assert p.states[1] == R.BACKGROUND
    assert not mem[:100].any() and (mem[100] == 3).all() and not mem[101:].any()
    assert placed_points == [("postcopy_place_page", {"page": 0, "channel": "main"}),
                             ("postcopy_place_page", {"page": 1, "channel": "main"})]


def test_a_requested_zero_page_resolves_the_fault(traced):  # noqa: F811
    """The vCPU faults on page 9; the page comes as a zero record on preempt; the vCPU goes
    on, and the fault is recorded as any other."""
    with destination(migration__postcopy_preempt="true") as (dst, control, path):
        # both channels first: 7.1's destination loads nothing before (all_channels)
        main = peer(path, *UP_TO_LISTEN)
        preempt = peer(path, b"QEPC\x00\x00\x00\x01")
        traced.wait_for("postcopy_preempt_new_channel")
        control.wait_state("postcopy-active")
        vcpu = vcpu_faults(dst, 0, 9)
        assert requested_page(main) == 9
        preempt.sendall(frame(wire.zero_record(9 * PAGE, 1)))
        vcpu.join(WAIT)
        assert not vcpu.is_alive()
        placed = traced.wait_for("postcopy_place_page_zero")
        assert placed == {"page": 9, "channel": "preempt"}
        assert not traced.named("postcopy_place_page")
        assert dst.placer.states[9] == R.URGENT_PREEMPT
        assert dst.fault_thread.records[0][4] == 1  # resolved on preempt


# ---- whole migrations ----

def run(trace_points=(), **sets) -> dict:
    return migrate(config(**{**IDLE_SOURCE, **sets}), trace=tuple(trace_points))


def assert_intact(result):
    assert result["status"] == "completed", result["errors"]
    assert result["integrity"]["ok"], result["integrity"]
    assert "content" in result["integrity"]["checked"]


@pytest.mark.parametrize("preempt", ["false", "true"])
def test_a_quarter_populated_guest_sends_three_quarters_as_zero_pages(preempt):
    """populated=0.25: pages 2048 on hold data, and the source's vCPUs write nothing before the
    switchover, so 6144 of the 8192 pages go as zero pages, in precopy and on request in
    postcopy (on preempt with preempt), and land as zeros."""
    result = run(["postcopy_place_page_zero", "postcopy_page_req_del"],
                 guest__populated="0.25", migration__postcopy_preempt=preempt)
    assert_intact(result)
    ram = result["query-migrate"]["ram"]
    assert ram["duplicate"] == NPAGES * 3 // 4
    assert ram["normal"] == NPAGES // 4 and ram["normal-bytes"] == NPAGES // 4 * PAGE
    assert ram["transferred"] < 0.27 * NPAGES * PAGE
    assert ram["postcopy-requests"] > 0
    # a zero page a vCPU asked for: its request resolved, then placed as zeros
    events = [e for e in result["events"] if e.get("role") == "destination"]
    asked = {e["fields"]["page"] for e in events if e["trace"] == "postcopy_page_req_del"}
    zeros = {e["fields"]["page"]: e["fields"]["channel"] for e in events
             if e["trace"] == "postcopy_place_page_zero"}
    urgent = {zeros[page] for page in asked if page in zeros}
    # with preempt, a page may be asked for while the background stream carries it on main
    assert urgent == {"main"} if preempt == "false" else "preempt" in urgent
    assert all(page >= NPAGES // 4 for page in zeros)


def test_a_quarter_populated_guest_migrates_faster_on_the_same_link():
    full = run(guest__populated="1")
    quarter = run(guest__populated="0.25")
    for result in (full, quarter):
        assert_intact(result)
    full_qm, quarter_qm = full["query-migrate"], quarter["query-migrate"]
    assert full_qm["ram"]["duplicate"] == 0
    assert quarter_qm["ram"]["transferred"] < 0.3 * full_qm["ram"]["transferred"]
    assert quarter_qm["total-time"] < 0.6 * full_qm["total-time"], (quarter_qm, full_qm)
    # what run prints says why
    assert "zero pages" not in summary(full, config(**IDLE_SOURCE))
    assert f", {NPAGES * 3 // 4} zero pages (header only)" in summary(
        quarter, config(**IDLE_SOURCE, guest__populated="0.25"))


@pytest.mark.parametrize("preempt, break_huge", [("false", "true"), ("true", "true"),
                                               ("true", "false")])
def test_2M_pages_zero_and_mixed(preempt, break_huge):
    """populated=0.3 of 16 huge pages: 4 hold data, the 5th is mixed (its first 410 target
    pages stamped), 11 are zero huge pages; the memory arrives intact in every mode."""
    result = run(["postcopy_place_page_zero"], guest__page_size="2MiB",
                 guest__populated="0.3", migration__postcopy_preempt=preempt,
                 migration__x_postcopy_preempt_break_huge=break_huge)
    assert_intact(result)
    populated = R.populated_pages(NPAGES, 0.3)
    assert result["query-migrate"]["ram"]["duplicate"] == NPAGES - populated
    zeros = {e["fields"]["page"] for e in result["events"]
             if e.get("trace") == "postcopy_place_page_zero"}
    assert zeros and zeros <= set(range(populated // TPP + 1, NPAGES // TPP))  # not the mixed


def test_without_payload_nothing_changes():
    result = run(guest__populated="0.25", emulator__payload="false")
    assert result["status"] == "completed", result["errors"]
    ram = result["query-migrate"]["ram"]
    assert ram["duplicate"] == 0 and ram["normal"] >= NPAGES
    assert ram["transferred"] >= NPAGES * PAGE


def test_the_replayed_memory_check_knows_where_the_guest_never_wrote():
    """A standalone destination checks its memory alone (integrity.check_replayed): a page past
    guest.populated must be zero but for what the vCPUs wrote, one before it stamped."""
    cfg = config(**IDLE_SOURCE, guest__populated="0.25")
    with Run(cfg) as migration:
        migration.wait()
        assert migration.ok, migration.errors
        dst, report = migration.ram("destination"), migration.reports["destination"]
        states = migration.pages().dst
        assert integrity.check_replayed(cfg, dst, states, report)["ok"]
        pages = dst.reshape(-1, PAGE)
        untouched = next(p for p in range(NPAGES - 1, 0, -1) if not pages[p].any())
        pages[untouched, -8] = 1  # a stamp where the guest never wrote
        pages[5, -8:] = 0  # a populated page that lost its stamp
        result = integrity.check_replayed(cfg, dst, states, report)
        assert not result["ok"] and result["first-bad"] == [5, untouched]
