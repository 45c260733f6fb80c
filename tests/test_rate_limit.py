"""Urgent pages under max-postcopy-bandwidth, as QEMU 7.1/7.2's migration thread treats them
(docs/concepts.md, "The rate limiter and urgent pages"; docs/qemu-code.md 1.2, 1.3, 5.1).

The source's migration thread runs in-process on endpoints that take every record at once
(an infinitely fast link) and note its emulated time, so a window's budget goes out in a
burst and the thread then sleeps until the window ends: what happens to a request depends
only on the rate limiter. The five cases that follow from QEMU's code, then locality.
"""

import threading
import time

import pytest

from emu import trace
from emu.board import Board
from emu.clock import Clock
from emu.migration import wire
from emu.migration.page_requests import PageRequestQueue
from emu.migration.ram_save import Pacer
from emu.migration.source import FIELDS, Source
from tests.conftest import PATIENCE, config, one_write

KIB, MIB = 1 << 10, 1 << 20
RECORD = 4 * KIB + len(wire.ram_header(0, 1, 0))  # a 4 KiB page's record on main
SMALL = {"guest__ram": "4MiB", "emulator__chunk": "4KiB"}  # one record a page
HUGE = {"guest__ram": "32MiB", "guest__page_size": "2MiB",
        "emulator__chunk": "512KiB"}  # four records a host page
MODES = {
    "vanilla": {"migration__postcopy_preempt": "false"},
    "preempt": {"migration__postcopy_preempt": "true"},
    "preempt-no-break-huge": {"migration__postcopy_preempt": "true",
                              "migration__x_postcopy_preempt_break_huge": "false"},
}


class TimedEndpoint:
    """Takes each message at once; notes RAM records as (emulated time, channel, offset,
    target pages) in a log both channels share. on_send(endpoint) runs before each."""

    def __init__(self, name: str, clock: Clock, log: list, on_send=None) -> None:
        self.name, self.clock, self.log, self.on_send = name, clock, log, on_send

    def send_write(self, frames, more: bool = False) -> None:
        self.send(*one_write(frames), more=more)

    def send(self, parts, virt: int = 0, more: bool = False) -> None:
        if self.on_send:
            self.on_send(self)
        msg = wire.decode_main(b"".join(bytes(p) for p in parts), payload=False)
        if isinstance(msg, wire.RamRecord):
            self.log.append((self.clock.now(), self.name, msg.offset, msg.npages))

    def flush(self) -> None:
        pass


class Control:
    def emit(self, event) -> None:
        pass

    def fail(self, message: str) -> None:
        raise AssertionError(message)


SCALE = 0.25


class Stream:
    """A source in postcopy-active whose migration thread streams in the background; `steps`
    are the rate-limit trace points in order, as (emulated time, name, fields); on_send(stream,
    endpoint) runs before each message on main."""

    def __init__(self, mode: str, cap: str, on_send=None, **sets) -> None:
        cfg = config(emulator__payload="false", migration__max_postcopy_bandwidth=cap,
                     **MODES[mode], **sets)
        bufs = {"clock": bytearray(Clock.NBYTES), "src-board": bytearray(Board.nbytes(FIELDS)),
                "src-ram": bytearray(), "src-states": bytearray(cfg.npages),
                "src-queue": bytearray(PageRequestQueue.nbytes())}
        self.src = src = Source(Control(), bufs, cfg)
        # emulated time at a quarter of real time: a thread a busy machine schedules a few ms
        # late is a few ms late in real time, under a millisecond in the figures asserted on
        src.clock.start(SCALE)
        self.log: list = []
        hook = (lambda ep: on_send(self, ep)) if on_send else None
        src.main = TimedEndpoint("main", src.clock, self.log, hook)
        if cfg["migration.postcopy-preempt"]:
            src.preempt = TimedEndpoint("preempt", src.clock, self.log)
        for old, new in (("none", "setup"), ("setup", "active"), ("active", "device"),
                         ("device", "postcopy-active")):
            assert src.state.set(old, new)
        self.pacer = src._pacer("max-postcopy-bandwidth")
        self.steps: list = []
        self.slept = threading.Event()
        trace.enable(["migration_rate_limit_*", "postcopy_preempt_*"])
        trace.set_sink(self._traced)
        self.thread = threading.Thread(target=src._postcopy_stream)

    def _traced(self, name: str, fields: dict) -> None:
        self.steps.append((self.src.clock.now(), name, fields))
        if name == "migration_rate_limit_pre":
            self.slept.set()

    def __enter__(self) -> "Stream":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.src.quit.set()
        self.thread.join(PATIENCE)
        trace.enable([])
        trace.set_sink(lambda name, fields: None)
        assert not self.thread.is_alive()

    def request(self, offset: int, length: int) -> float:
        """The return path queues a page; its emulated time."""
        t = self.src.clock.now()
        self.src.rs.queue_pages(offset, length)
        return t

    def request_while_asleep(self, offset: int, length: int) -> tuple[float, float]:
        """Wait for the first sleep, then request 20 ms into it: (request time, when the
        sleep's window ends)."""
        assert self.slept.wait(PATIENCE)
        t_pre, _, fields = next(s for s in self.steps if s[1] == "migration_rate_limit_pre")
        time.sleep(0.02)
        return self.request(offset, length), t_pre + fields["ms"] / 1000

    def sent(self, offset: int) -> tuple[int, float, str]:
        """Wait for the first record at `offset`: (its index in the log, time, channel)."""
        deadline = time.monotonic() + PATIENCE
        while True:
            for i, (t, channel, off, _) in enumerate(list(self.log)):
                if off == offset:
                    return i, t, channel
            assert time.monotonic() < deadline, f"offset {offset} never sent"
            time.sleep(0.005)

    def names(self) -> list:
        return [(name, fields) for _, name, fields in self.steps]


def urgent_channel(mode: str) -> str:
    return "main" if mode == "vanilla" else "preempt"


@pytest.mark.parametrize("mode", ["vanilla", "preempt"])
def test_4k_a_request_made_during_the_sleep_waits_for_the_next_window(mode):
    # 1 MiB a window goes in a burst; the request 20 ms into the sleep wakes the thread, but
    # qemu_savevm_state_iterate()'s gate lets nothing through until the window ends; then
    # the page is that window's first record
    with Stream(mode, "10MiB/s", **SMALL) as s:
        t_req, window_end = s.request_while_asleep(900 * 4 * KIB, 4 * KIB)
        i, t_sent, channel = s.sent(900 * 4 * KIB)
    assert t_sent >= window_end - 1e-3 and t_sent - t_req > 0.05
    assert channel == urgent_channel(mode)
    assert all(t < t_req for t, *_ in s.log[:i])  # the first record after the sleep
    # the wake-up, then the spin through the gate, traced as one more step
    assert s.names()[:4] == [("migration_rate_limit_pre", s.steps[0][2]),
                             ("migration_rate_limit_post", {"urgent": 1}),
                             ("migration_rate_limit_pre", s.steps[2][2]),
                             ("migration_rate_limit_post", {"urgent": 1})]


@pytest.mark.parametrize("mode", ["vanilla", "preempt"])
def test_4k_a_request_made_during_the_iterate_goes_at_once_even_past_the_budget(mode):
    # queued as the record that spends the budget goes: ram_save_iterate()'s loop goes on
    # while a request waits, so the page goes before the thread sleeps
    times = {}

    def spend(s, ep) -> None:
        if ep.name == "main" and not times and s.pacer.used + RECORD > s.pacer.rate / 10:
            times["req"] = s.request(900 * 4 * KIB, 4 * KIB)

    with Stream(mode, "10MiB/s", on_send=spend, **SMALL) as s:
        i, t_sent, channel = s.sent(900 * 4 * KIB)
        assert s.slept.wait(PATIENCE)
    assert channel == urgent_channel(mode) and t_sent - times["req"] < 2e-3
    assert t_sent <= s.steps[0][0]  # before the first rate-limit step


@pytest.mark.parametrize("mode", ["vanilla", "preempt"])
def test_4k_urgent_pages_count_in_main_s_budget_only_on_main(mode):
    # the budget is the main QEMUFile's: a vanilla urgent page spends it, a preempt one not
    def early(s, ep) -> None:
        if ep.name == "main" and len(s.log) == 3:
            s.request(900 * 4 * KIB, 4 * KIB)

    with Stream(mode, "10MiB/s", on_send=early, **SMALL) as s:
        assert s.slept.wait(PATIENCE)
        t_sleep = s.steps[0][0]
    in_window = [c for t, c, off, _ in s.log if t <= t_sleep and off != 900 * 4 * KIB]
    budget_records = int(MIB // RECORD) + 1  # the one that goes past it included
    assert len(in_window) == budget_records - (mode == "vanilla")


def test_2m_preempt_break_huge_a_request_during_the_sleep_goes_at_once():
    # 1.1 MiB a window: spent by the third 512 KiB record of host page 0, so the thread
    # sleeps inside the page (ram_save_host_page()'s rate limit); woken, break-huge leaves
    # the page and the request goes at once on preempt; the page's rest waits for the window
    with Stream("preempt", "11MiB/s", **HUGE) as s:
        t_req, window_end = s.request_while_asleep(10 * 2 * MIB, 2 * MIB)
        i, t_sent, channel = s.sent(10 * 2 * MIB)
        _, t_rest, _ = s.sent(3 * 512 * KIB)
    assert channel == "preempt" and t_sent - t_req < 2e-3
    assert [c for _, c, _, _ in s.log[:i]] == ["main"] * 3  # asleep inside host page 0
    assert t_rest >= window_end - 1e-3
    assert s.src.board["break-huge"] == 1
    assert [name for _, name, _ in s.steps][:3] == [
        "migration_rate_limit_pre", "migration_rate_limit_post", "postcopy_preempt_triggered"]


@pytest.mark.parametrize("mode", ["vanilla", "preempt-no-break-huge"])
def test_2m_without_break_huge_a_request_during_the_sleep_waits_for_the_page_only(mode):
    # woken inside host page 0, the thread finishes it unthrottled (the request keeps the
    # semaphore posted), then serves the request: long before the window ends
    with Stream(mode, "11MiB/s", **HUGE) as s:
        t_req, window_end = s.request_while_asleep(10 * 2 * MIB, 2 * MIB)
        i, t_sent, channel = s.sent(10 * 2 * MIB)
    assert channel == urgent_channel(mode) and t_sent - t_req < 2e-3
    assert t_sent < window_end - 0.05
    assert [(c, off) for _, c, off, _ in s.log[:i]] == [("main", k * 512 * KIB)
                                                        for k in range(4)]
    assert s.log[2][0] < t_req <= s.log[3][0]  # asleep after 3 of its 4 records
    assert s.src.board["break-huge"] == 0


def test_unlimited_a_request_never_waits_and_the_scan_follows_it():
    # no cap: no rate-limit step at all; and in preempt too the background scan goes on
    # right after the requested page (7.1/7.2's get_queued_page() sets the scan position)
    def mid(s, ep) -> None:
        if ep.name == "main" and len(s.log) == 3:
            s.request(600 * 4 * KIB, 4 * KIB)

    with Stream("preempt", "0", on_send=mid, **SMALL) as s:
        i, t_sent, channel = s.sent(600 * 4 * KIB)
        s.sent(1023 * 4 * KIB)
    assert channel == "preempt" and s.steps == []
    assert t_sent - s.log[i - 1][0] < 2e-3
    assert s.log[i + 1][1:3] == ("main", 601 * 4 * KIB)


def test_the_switchover_keeps_the_window_and_restarts_the_scan():
    # postcopy_start() sets the new limit on the main QEMUFile, whose used bytes stay; and
    # ram_postcopy_send_discard_bitmap() sets rs->last_page = 0
    with Stream("vanilla", "0", **SMALL) as s:
        pass
    src = s.src
    src.rates["max-bandwidth"] = 100 * MIB
    pacer = src._pacer("max-bandwidth")
    pacer.used = 0
    pacer.charge(3 * MIB)
    assert not pacer.exceeded()  # 10 MiB a window in precopy
    src.rates["max-postcopy-bandwidth"] = 10 * MIB
    assert src._pacer("max-postcopy-bandwidth") is pacer
    assert pacer.used == 3 * MIB and pacer.exceeded()
    src.rs.pss.page = 700
    src.rs.send_discard_bitmap(TimedEndpoint("main", src.clock, []))
    assert src.rs.pss.page == 0


def test_a_window_starts_when_the_thread_looks_not_on_a_grid():
    pacer = Pacer(10 * MIB, now=0.0)
    pacer.charge(2 * MIB)
    pacer.update(0.099)
    assert pacer.exceeded() and pacer.end == pytest.approx(0.1)
    pacer.update(0.137)
    assert not pacer.exceeded() and pacer.end == pytest.approx(0.237)
