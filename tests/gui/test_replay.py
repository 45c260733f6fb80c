"""The window on a recording: `gui --record`, the player (scrub, steps, play), and
`replay --screenshot --at`. No engine process runs during a replay."""

import multiprocessing
import os
import subprocess
import sys

import numpy as np
import pytest
from PySide6 import QtCore

from emu.migration import ram as R
from gui import pagemap
from gui.record import Recording
from gui.replay import ReplaySession
from gui.session import COMPLETED
from tests.conftest import PATIENCE
from tests.gui.conftest import small_config
from tests.recording import record

WAIT_MS = 30_000


@pytest.fixture(scope="module")
def recording(tmp_path_factory):
    path = tmp_path_factory.mktemp("replay") / "run.pcr"
    session, live = record(path, small_config())
    return Recording.open(path), live


def _replay_window(make_window, recording):
    window = make_window(recording.cfg)
    window.show_replay(ReplaySession(recording), recording.path.name)
    return window


def test_the_window_records_each_run_it_starts(make_window, qtbot, tmp_path):
    from gui._qt.window import QtMainWindow

    path = tmp_path / "lesson.pcr"
    window = QtMainWindow(small_config(), record=str(path))
    qtbot.addWidget(window)
    try:
        for expected in (path, tmp_path / "lesson-2.pcr"):  # the second run numbered
            window.start_migration()
            qtbot.waitUntil(lambda: window.session.phase == COMPLETED, timeout=WAIT_MS)
            assert f"recording this run in {expected}" in window.events.toPlainText()
            assert Recording.open(expected).header["report"]["status"] == "completed"
    finally:
        window.close()


def test_a_replay_shows_the_end_with_no_process(make_window, recording, qtbot):
    rec, live = recording
    window = _replay_window(make_window, rec)
    window.transport.buttons[">|"].click()
    window.refresh()
    assert multiprocessing.active_children() == []
    assert window.transport.isVisible() and not window.controls.isEnabled()
    assert window.bitmap.count(R.MISSING) == 0
    faults = len(rec.arrays["faults"])
    assert window.latency.point_count() == faults > 0
    assert window.counters.value("memory check").startswith("ok")
    assert "run completed" in window.events.toPlainText()


def test_scrubbing_back_shows_that_instant_and_only_what_came_before(make_window, recording,
                                                                    qtbot):
    rec, live = recording
    window = _replay_window(make_window, rec)
    window.transport.buttons[">|"].click()
    running = [s for s, _ in live if s["phase"] == "running"]
    state = running[len(running) // 3]  # pages still to come
    timeline = window.transport.timeline
    x = timeline.x_of(state["now"])
    qtbot.mouseClick(timeline, QtCore.Qt.MouseButton.LeftButton,
                     pos=QtCore.QPoint(round(x), timeline.height() // 2))
    window.refresh()
    replay = window.session
    t = replay.now
    shown = next(s for s, _ in reversed(live) if s["now"] <= replay.position)
    assert t == shown["now"]
    queued = np.array([p for p, _ in shown["urgent"]["queued"]], np.int64)
    keys = pagemap.page_keys(shown["dst"], shown["src"], np.empty(rec.cfg.npages, np.uint8),
                             queued)
    expected = pagemap.counts(keys)
    assert expected[R.MISSING] + expected[R.INFLIGHT_MAIN] > 0  # not everything there yet
    for code in pagemap.LEGEND_ORDER:
        assert window.bitmap.count(code) == expected[code], pagemap.LEGEND[code]
    assert window.latency.point_count() == len(shown["faults"])
    shown_events = next(e for s, e in reversed(live) if s["now"] <= replay.position)
    assert window.events.toPlainText().splitlines() == shown_events


def test_the_buttons_step_and_play(make_window, recording, qtbot):
    rec, _ = recording
    window = _replay_window(make_window, rec)
    buttons, replay = window.transport.buttons, window.session
    buttons["|<"].click()
    assert replay.frame == 0
    buttons["frame >"].click()
    assert replay.frame == 1
    buttons["< frame"].click()
    assert replay.frame == 0
    buttons["1 ms >"].click()
    assert replay.position == pytest.approx(replay.start_time + 1e-3)
    buttons["event >"].click()
    assert replay.frame > 0
    assert f"frame {replay.frame + 1}/{rec.frames}" in window.transport.where.text()
    window.transport.speed.setCurrentText("10x")
    window.transport.play.click()
    assert replay.playing and window.transport.play.text() == "Pause"
    qtbot.waitUntil(lambda: not replay.playing, timeout=WAIT_MS)  # played to the end
    assert replay.frame == rec.frames - 1 and window.transport.play.text() == "Play"


def test_marks_say_what_they_are(make_window, recording):
    rec, _ = recording
    window = _replay_window(make_window, rec)
    timeline = window.transport.timeline
    switch = next(m for m in rec.header["marks"] if m["kind"] == "switchover")
    assert timeline.tip_at(timeline.x_of(switch["t"])).startswith("source device at")


def test_replay_screenshot_at_an_instant(recording, tmp_path):
    rec, live = recording
    path = tmp_path / "at.png"
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen"}
    out = subprocess.run([sys.executable, "-m", "emu.cli", "replay", str(rec.path),
                          "--screenshot", str(path), "--at", "0.15s"], env=env,
                         capture_output=True, text=True, timeout=PATIENCE)
    assert out.returncode == 0, out.stderr
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def preempt_recording(tmp_path_factory):
    path = tmp_path_factory.mktemp("replay") / "preempt.pcr"
    record(path, small_config(migration__postcopy_preempt="true"))
    return Recording.open(path)


def test_two_runs_side_by_side_with_a_baseline_to_pin(recording, preempt_recording, qtbot):
    from gui._qt.app import application
    from gui._qt.compare import QtCompareWindow

    application()
    recs = [recording[0], preempt_recording]
    for rec in recs:
        rec.header["report"]["emulator"]["keeping-up"] = True
    window = QtCompareWindow([ReplaySession(r) for r in recs], ["vanilla.pcr", "preempt.pcr"])
    qtbot.addWidget(window)
    window.resize(1280, 720)
    window.show()
    try:
        window.seek(window.group.end_time)
        window.refresh()
        vanilla, pre = window.columns
        assert "baseline" in vanilla.title.text() and "baseline" not in pre.title.text()
        assert window.difference.text().startswith(
            "postcopy-preempt against vanilla postcopy: ")
        assert "lower mean latency" in window.difference.text()
        for column in window.columns:
            assert column.bitmap.count(R.MISSING) == 0
            assert column.latency.point_count() == len(column.replay.recording.arrays["faults"])
        pre.pin.click()
        assert window.group.baseline == 1 and "baseline" in pre.title.text()
        assert window.difference.text().startswith("vanilla postcopy against postcopy-preempt")
        assert "higher mean latency" in window.difference.text()
        pre.pin.click()  # unpinned: back to the first run that kept up
        assert window.group.baseline == 0
        # the shared player: back to the start clears both columns
        window.transport.buttons["|<"].click()
        assert all(c.latency.point_count() == 0 for c in window.columns)
    finally:
        window.close()


def test_replay_two_files_screenshot(recording, preempt_recording, tmp_path):
    path = tmp_path / "both.png"
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen"}
    out = subprocess.run([sys.executable, "-m", "emu.cli", "replay", str(recording[0].path),
                          str(preempt_recording.path), "--screenshot", str(path), "--at",
                          "300ms"], env=env, capture_output=True, text=True, timeout=PATIENCE)
    assert out.returncode == 0, out.stderr
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_live_run_next_to_a_recording_becomes_a_replay_when_it_ends(recording, qtbot,
                                                                      tmp_path):
    from gui._qt.app import application
    from gui._qt.compare import QtCompareWindow
    from gui.session import Session

    application()
    rec = recording[0]
    live = Session(small_config(migration__postcopy_preempt="true"), record=tmp_path / "l.pcr")
    window = QtCompareWindow([live, ReplaySession(rec)], ["live", rec.path.name])
    qtbot.addWidget(window)
    window.show()
    try:
        live.start()
        qtbot.waitUntil(lambda: window.group.live is not None and live.phase == "running",
                        timeout=WAIT_MS)
        assert not window.transport.isEnabled()  # the recording follows the live run
        assert "following the live run" in window.transport.where.text()
        qtbot.waitUntil(lambda: window.group.position > 0.05, timeout=WAIT_MS)
        recorded = window.columns[1].replay
        assert recorded.position == min(window.group.position, recorded.end_time)
        assert recorded.now <= recorded.position
        qtbot.waitUntil(lambda: isinstance(window.columns[0].replay, ReplaySession),
                        timeout=WAIT_MS)
        assert window.transport.isEnabled() and window.group.live is None
        assert window.columns[0].name == "postcopy-preempt (live)"
        window.transport.buttons[">|"].click()
        window.refresh()
        replayed = window.columns[0].replay
        assert window.columns[0].latency.point_count() == len(replayed.recording.arrays["faults"])
        assert multiprocessing.active_children() == []
    finally:
        window.close()
