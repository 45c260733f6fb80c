"""migration.design in the window (issue 13 item 8): the chooser reaches the run (an 8.0 run
starts: break-huge is left out), multifd is offered only where the design takes it with
postcopy, the sentence under the urgent pages says what the design does with an urgent page,
and the design's trace points reach the event log, a few per emulated 100 ms."""

import re

import pytest

from emu.config import BREAK_HUGE
from emu.controller import EventLog, Run
from emu.events import StateChanged, Trace
from gui.designs import WINDOW_TRACE, multifd_refused, removed, urgent_path
from gui.session import COMPLETED, RUNNING, TRACE_LINES, Session, TraceLimiter, trace_line
from tests.gui.conftest import small_config

WAIT_MS = 30_000  # generous: a loaded 2-core machine; no test asserts on durations
LINE = re.compile(r"\[\s*([\d.]+) s\] (.*)")


# ---- the sentence under the urgent pages, without Qt ----

@pytest.mark.parametrize(("sets", "says"), [
    ({"migration__postcopy_ram": "false"}, ["Precopy only", "no page is urgent"]),
    ({}, ["Vanilla postcopy", "on main", "behind the background"]),
    ({"migration__design": "8.0"}, ["Vanilla postcopy"]),  # no preempt: 8.0 queues too
    ({"migration__postcopy_preempt": "true"},
     ["QEMU 7.1", "migration thread", "on preempt", "next time it looks"]),
    ({"migration__postcopy_preempt": "true", "migration__design": "8.0"},
     ["QEMU 8.0", "return-path thread", "at once", "only streams the background"]),
    ({"migration__postcopy_preempt": "true", "migration__design": "10.1"},
     ["QEMU 10.1", "return-path thread", "at once", "continues just past"]),
])
def test_the_sentence_says_what_each_design_does_with_an_urgent_page(sets, says):
    text = urgent_path(small_config(**sets))
    for words in says:
        assert words in text, text
    assert "huge page" not in text and "100 ms" not in text


def test_7_1_breaks_huge_pages_and_waits_for_the_next_window_under_a_cap():
    huge = small_config(migration__postcopy_preempt="true", guest__page_size="2MiB")
    assert "between two pieces of a huge page" in urgent_path(huge)
    unbroken = small_config(migration__postcopy_preempt="true", guest__page_size="2MiB",
                            migration__x_postcopy_preempt_break_huge="false")
    assert "huge page" not in urgent_path(unbroken)
    capped = small_config(migration__postcopy_preempt="true",
                          migration__max_postcopy_bandwidth="50MiB/s")
    assert "waits for the next 100 ms window" in urgent_path(capped)
    full = small_config(migration__postcopy_preempt="true", migration__design="8.0",
                        migration__max_postcopy_bandwidth="50MiB/s")
    assert "100 ms" not in urgent_path(full)  # the return-path thread is not rate-limited


def test_what_a_design_refuses_is_said_in_qemus_words():
    assert removed(BREAK_HUGE, "7.1") is None
    assert "8.0 removed" in removed(BREAK_HUGE, "8.0") and removed(BREAK_HUGE, "10.1")
    assert multifd_refused("10.1", True) is None and multifd_refused("7.1", False) is None
    assert "Postcopy is not yet compatible with multifd" in multifd_refused("8.0", True)


# ---- the event log's trace lines, bounded ----

def _trace(t: float, page: int, name: str = "postcopy_preempt_send_host_page") -> Trace:
    return Trace("source", name, t, {"rbname": "pc.ram", "page": page})


def test_a_window_shows_a_few_trace_lines_and_counts_the_rest():
    limiter = TraceLimiter(lines=3, window=0.1)
    shown = []
    for i in range(20):  # 20 in 0.100-0.120 s
        shown += limiter.add(0.1 + i * 0.001, _trace(0.1 + i * 0.001, i))
    assert [text.split()[-1] for _, text in shown] == ["page=0", "page=1", "page=2"]
    assert limiter.close(0.15) == []  # the window is not over yet
    (t, summary), = limiter.close(0.2)
    assert t == pytest.approx(0.119)  # the last one held back: in time order with the rest
    assert summary.startswith("… 17 more trace points in 0.1-0.2 s")
    assert "postcopy_preempt_send_host_page ×17" in summary
    # a line that reached the controller late counts in the window open then
    late = limiter.add(0.13, _trace(0.13, 99))
    assert late == [(0.13, "source: postcopy_preempt_send_host_page page=99")]
    assert len(limiter.add(0.205, _trace(0.205, 1)) + limiter.add(0.206, _trace(0.206, 2))) == 2
    assert limiter.add(0.207, _trace(0.207, 3)) == []  # 0.2-0.3 s had its three


def test_a_trace_line_leaves_out_what_every_line_repeats():
    queued = Trace("source", "get_queued_page", 0.1,
                   {"rbname": "pc.ram", "offset": 8192, "page": 2, "channel": "preempt"})
    assert trace_line(queued) == "source: get_queued_page page=2 channel=preempt"
    hit = Trace("source", "postcopy_preempt_hit", 0.1, {"rbname": "pc.ram", "offset": 8192})
    assert trace_line(hit) == "source: postcopy_preempt_hit offset=8192"


def test_another_event_tells_the_lines_held_back_first():
    limiter = TraceLimiter(lines=1, window=0.1)
    limiter.add(0.10, _trace(0.10, 1))
    limiter.add(0.11, _trace(0.11, 2))
    (t, text), = limiter.before(0.12)
    assert t == 0.11 and "1 more" in text
    assert limiter.add(0.13, _trace(0.13, 3)) == []  # the window's share stays spent


def test_the_session_bounds_the_trace_lines_of_its_event_log():
    session = Session(small_config(), trace=WINDOW_TRACE)
    session.run = Run(session.cfg, trace=WINDOW_TRACE)
    try:
        session.phase = RUNNING
        for i in range(400):  # a request every 0.5 ms for 0.2 s
            session.run._event(_trace(0.2 + i * 0.0005, i))
        session.run._event(StateChanged("source", "completed", 0.45))
        session._log_run(final=True)
        shown = [(float(m[1]), m[2]) for m in map(LINE.fullmatch, session._events)]
    finally:
        session.stop()
    traces = [text for _, text in shown if "postcopy_preempt_send_host_page page=" in text]
    assert len(traces) == 2 * TRACE_LINES  # 0.2-0.3 s and 0.3-0.3995 s
    assert sum(text.startswith("… ") for _, text in shown) == 2
    assert shown[-1] == (0.45, "source: completed")
    times = [t for t, _ in shown]
    assert times == sorted(times)


# ---- the controls ----

def test_8_0_leaves_break_huge_out_and_says_why(make_window):
    window = make_window(small_config(migration__postcopy_preempt="true"))
    controls = window.controls
    huge = controls._editors[BREAK_HUGE]
    assert huge.isEnabled()
    assert any(s.startswith(BREAK_HUGE) for s in controls.overrides())
    controls.set_value("migration.design", "8.0")
    assert "migration.design=8.0" in controls.overrides()
    assert not any(s.startswith(BREAK_HUGE) for s in controls.overrides())
    assert not huge.isEnabled() and "8.0 removed" in huge.toolTip()
    cfg = window.config()  # was refused: "Property ... not found"
    assert cfg is not None and cfg["migration.design"] == "8.0", controls.note.text()
    controls.set_value("migration.design", "7.1")
    assert huge.isEnabled()


def test_multifd_is_offered_only_where_the_design_takes_it_with_postcopy(make_window):
    window = make_window(small_config())
    controls = window.controls
    multifd = controls._editors["migration.multifd"]
    channels = controls._editors["migration.multifd-channels"]
    for design in ("7.1", "8.0"):
        controls.set_value("migration.design", design)
        assert not multifd.isEnabled() and not channels.isEnabled()
        assert "Postcopy is not yet compatible with multifd" in multifd.toolTip()
    controls.set_value("migration.design", "10.1")
    assert multifd.isEnabled() and not channels.isEnabled()  # nothing to count yet
    controls.set_value("migration.multifd", True)
    controls.set_value("migration.multifd-channels", 3)
    assert channels.isEnabled()
    cfg = window.config()
    assert cfg["migration.multifd"] and cfg["migration.multifd-channels"] == 3
    controls.set_value("migration.design", "8.0")  # the engine would refuse: off again
    assert not multifd.isChecked() and window.config() is not None


def test_precopy_only_takes_multifd_with_any_design(make_window):
    window = make_window(small_config(migration__postcopy_ram="false"))
    assert window.controls._editors["migration.multifd"].isEnabled()


def test_an_8_0_run_starts_says_its_design_and_logs_its_decisions(make_window, qtbot):
    window = make_window(small_config())
    window.controls.set_value("migration.postcopy-preempt", True)
    window.controls.set_value("migration.design", "8.0")
    window.start_migration()
    assert window.session.phase != "idle", window.controls.note.text()
    assert window.queue.text("path") == urgent_path(window.session.cfg)
    assert "return-path thread" in window.queue.text("path")
    qtbot.waitUntil(lambda: window.session.phase == COMPLETED, timeout=WAIT_MS)
    assert window.session.run.cfg["migration.design"] == "8.0"
    lines = window.events.toPlainText().splitlines()
    traces = [line for line in lines if "source: postcopy_preempt_send_host_page" in line]
    assert traces, lines
    times = [float(LINE.fullmatch(line)[1]) for line in traces]
    windows = int(max(times) / 0.1) - int(min(times) / 0.1) + 1  # 100 ms windows they span
    assert len(traces) <= TRACE_LINES * windows < window.session.faults.count
    assert any(line.startswith("[") and "more trace points in" in line for line in lines)
    assert window.session.faults.records["channel"].max() == 1  # served on preempt


def test_a_tick_reads_every_message_waiting_not_one_a_child():
    """Run.poll() takes one message per child; a traced run sends one a request or more, and
    read one a tick they queued in the pipes, reaching the log late (and blocking the child
    once a pipe is full)."""
    class OneAPoll:
        log = EventLog()
        waiting = 300

        def poll(self, timeout):
            if self.waiting:
                self.waiting -= 1
                self.log.note(0.1, _trace(0.1, self.waiting))

    session = Session(small_config())
    session.run = OneAPoll()
    session._pump()
    assert session.run.waiting == 0


def test_the_preempt_channels_box_appears_once_the_engine_has_the_key(qtbot, monkeypatch):
    """x-preempt-channels is another change's key: its place waits for it."""
    from emu import config
    from gui._qt.controls import PREEMPT_CHANNELS, QtControls

    if PREEMPT_CHANNELS not in config.KEYS:
        bare = QtControls()
        qtbot.addWidget(bare)
        assert PREEMPT_CHANNELS not in bare._editors
        monkeypatch.setitem(config.KEYS, PREEMPT_CHANNELS,
                            config.KEYS["migration.multifd-channels"])
    controls = QtControls()
    qtbot.addWidget(controls)
    controls.show_config(small_config())
    box = controls._editors[PREEMPT_CHANNELS]
    assert not box.isEnabled() and "needs postcopy-preempt" in box.toolTip()
    controls.set_value("migration.postcopy-preempt", True)
    assert box.isEnabled()
