"""The window's event log: every line in emulated-time order, whoever wrote it."""

import re
import time

from emu.controller import Run
from emu.events import Link, StateChanged
from gui.session import COMPLETED, FAILED, RUNNING, Session
from tests.gui.conftest import small_config

LINE = re.compile(r"\[\s*([\d.]+) s\] (.*)")


def _entries(lines: list[str]) -> list[tuple[float, str]]:
    return [(float(m[1]), m[2]) for m in map(LINE.fullmatch, lines)]


def test_the_window_and_the_run_write_one_log_in_time_order():
    session = Session(small_config())
    session.run = Run(session.cfg)
    try:
        session.phase = RUNNING
        session.run._event(Link("connected", "main", 0.002))
        session._log("paused", 0.001)  # the window's own line, between the run's
        session.run._event(StateChanged("source", "setup", 0.0))
        session._log_run(final=True)
        shown = _entries(session._events)
    finally:
        session.stop()
    assert shown == [(0.0, "source: setup"), (0.001, "paused"),
                     (0.002, "link: main connection connected")]


def test_a_real_run_s_event_log_is_in_time_order():
    session = Session(small_config(migration__postcopy_preempt="true"))
    lines = []
    try:
        session.start()
        deadline = time.monotonic() + 60
        while session.phase not in (COMPLETED, FAILED) and time.monotonic() < deadline:
            lines += session.tick().events
            time.sleep(0.03)
        lines += session.tick().events
    finally:
        session.stop()
    assert session.phase == COMPLETED, lines
    times = [t for t, _ in _entries(lines)]
    assert len(times) >= 10 and times == sorted(times), lines
