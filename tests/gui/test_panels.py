"""The window's panels against a made-up migration (gui.synthetic): no processes, no engine
timing; each test says what happened to which page and reads what the panels show."""

import pytest
from PySide6 import QtCore

from emu.migration import ram as R
from gui._qt import style
from gui.session import CHECKING, IDLE
from gui.synthetic import SyntheticSession
from tests.gui.conftest import small_config


@pytest.fixture
def shown(make_window):
    """shown(cfg) -> (window, session): the window showing a SyntheticSession of cfg."""
    def make(cfg):
        window = make_window(cfg)
        session = SyntheticSession(cfg)
        window.show_session(session, follow=False)
        return window, session
    return make


def test_the_bitmap_counts_every_state_and_tells_a_page_story(shown, qtbot):
    window, s = shown(small_config())
    precopy, background = range(0, 100), range(100, 150)
    s.send(precopy, R.SENT_MAIN)
    s.arrive(precopy, R.PRECOPY)
    s.now = 0.2
    s.send(background, R.SENT_MAIN)
    s.arrive(background, R.BACKGROUND)
    s.now = 0.25
    s.block([200, 300, 400])
    s.queue(400)  # still in the source's queue
    s.send(300, R.SENT_URGENT_MAIN)  # on its way, on main
    s.send(200, R.SENT_PREEMPT)
    s.now = 0.301
    s.arrive(200, R.URGENT_PREEMPT)
    s.dst[[500, 501]] = R.DISCARDED  # the source resets discarded pages to unsent ...
    s.send(501, R.SENT_MAIN)  # ... and one is on its way again
    window.refresh()
    counts = {R.PRECOPY: 100, R.BACKGROUND: 50, R.URGENT_PREEMPT: 1, R.INFLIGHT_MAIN: 2,
              R.REQUESTED: 1, R.DISCARDED: 1}
    counts[R.MISSING] = s.cfg.npages - sum(counts.values())
    assert {code: window.bitmap.count(code) for code in counts} == counts
    window.bitmap.select(200)
    assert window.bitmap.info_text() == (
        "page 200 (guest address 0xc8000): asked for, came on preempt, arrived at 0.3010 s on the "
        "preempt channel; vCPU 0 faulted on it at 0.2500 s and waited 51.000 ms")
    window.bitmap.select(400)
    assert window.bitmap.info_text().endswith(
        "requested, not sent yet; a vCPU has been blocked on it for 51.000 ms")
    view = window.bitmap.view.viewport()  # hovering tells the story of the page under the mouse
    # (not at the centre: a later test hovers there, and a move to where the mouse already
    # is sends no event)
    qtbot.mouseMove(view, QtCore.QPoint(view.width() // 2 - 7, view.height() // 2 - 7))
    qtbot.waitUntil(lambda: not window.bitmap.info_text().startswith("page 400 "))
    assert window.bitmap.info_text().startswith("page ")


def test_a_vanilla_request_waits_in_view_behind_the_background_stream(shown):
    window, s = shown(small_config())
    s.boards["network"]["queued-main"] = 1 << 20
    for page, at in ((10, 0.000), (20, 0.001), (30, 0.002), (40, 0.003)):
        s.block(page, at)
    s.now = 0.004
    s.queue(10)  # in the source's queue
    s.send(20, R.SENT_URGENT_MAIN)  # sent on main, behind the background stream
    s.send(30, R.SENT_MAIN)  # already in the background stream when touched
    window.refresh()  # 40: its request is still on the return path
    q = window.queue
    assert q.text("queue") == f"page 10 · <b>{style.duration(0.004)}</b>"
    assert q.text("main") == (f"page 20 · <b>{style.duration(0.003)}</b><br>"
                              f"page 30 · <b>{style.duration(0.002)}</b> (background)")
    assert q.text("return") == f"page 40 · <b>{style.duration(0.001)}</b>"
    assert "off" in q.text("preempt")
    assert window.urgent_pages() == 2  # queued or sent urgently: not the background page
    assert window.select_telling_page() == 10  # the one waiting longest
    assert window.bitmap.info_text().startswith("page 10 ")


def test_preempt_lists_the_pages_on_its_channel(shown):
    window, s = shown(small_config(migration__postcopy_preempt="true"))
    s.block([7, 8, 9])
    s.send([7, 8, 9], R.SENT_PREEMPT)
    s.now = 0.001
    window.refresh()
    assert window.queue.text("preempt") == (
        f"page 7 · <b>{style.duration(0.001)}</b><br>"
        f"page 8 · <b>{style.duration(0.001)}</b><br>+ 1 more")
    assert "none" in window.queue.text("main")


def test_with_preempt_a_page_asked_for_on_main_is_named_background_and_dropped(shown):
    window, s = shown(small_config(migration__postcopy_preempt="true"))
    s.block(30)
    s.send(30, R.SENT_MAIN)  # already in the background stream: the source drops the request
    s.boards["source"]["postcopy-requests"] = 1
    s.boards["source"]["dropped-requests"] = 1
    s.now = 0.002
    s.arrive(30, R.URGENT_MAIN)
    window.refresh()
    assert window.bitmap.count(R.URGENT_MAIN) == 1
    assert window.bitmap.legend_text(R.URGENT_MAIN) == "asked for, came in the background"
    assert window.counters.value("urgent pages sent") == "on main 0 · on preempt 0"
    assert window.counters.value("requests dropped") == "1 (page already sent)"


def test_without_preempt_a_page_asked_for_on_main_came_on_main(shown):
    window, _ = shown(small_config())
    assert window.bitmap.legend_text(R.URGENT_MAIN) == "asked for, came on main"


def test_the_memory_check_shows_as_soon_as_the_run_has_ended(shown):
    window, s = shown(small_config())
    s.phase = CHECKING  # the run has completed; the check and the report are being made
    s.status = {"source": "completed", "destination": "completed"}
    window.refresh()
    assert window.counters.value("memory check") == "checking the guest's memory…"
    s.integrity = {"ok": True, "bad-pages": 0, "checked": "4 pages"}  # the report is not yet
    window.refresh()
    assert window.counters.value("memory check") == "ok (4 pages; bad pages 0)"
    assert window.counters.value("status") == "completed → completed"


def test_hovering_the_histogram_names_the_whole_bucket(shown, qtbot):
    window, _ = shown(small_config())
    window.refresh()
    assert window.latency.bucket_tip(13.5) == "bucket 13: [8.19 ms, 16.4 ms) = [2^13, 2^14) us"
    view = window.latency.histogram.viewport()
    qtbot.mouseMove(view, QtCore.QPoint(view.width() // 2, view.height() // 2))
    qtbot.waitUntil(lambda: window.latency.histogram.toolTip().startswith("bucket "))


def test_faults_reach_the_plot_the_figures_the_counters_and_the_log(shown):
    window, s = shown(small_config(migration__postcopy_preempt="true"))
    s.status = {"source": "postcopy-active", "destination": "postcopy-active"}
    s.boards["source"]["transferred"] = 3 << 20
    for page in range(10):
        s.now = 0.1 + page * 0.01
        s.block(page)
        s.send(page, R.SENT_PREEMPT)
        s.now += 0.001 * (page + 1)
        s.arrive(page, R.URGENT_PREEMPT)
    s.log("postcopy-active")
    window.refresh()
    assert window.session.faults.count == 10
    assert window.latency.point_count() == 10
    assert "10 faults" in window.latency.stats_text()
    assert f"p50 {style.duration(0.0055)}" in window.latency.stats_text()
    assert window.counters.value("status") == "postcopy-active → postcopy-active"
    assert window.counters.value("ram transferred") == "3 MiB"
    assert "postcopy-active" in window.events.toPlainText()
    s.finish()
    window.refresh()
    assert window.counters.value("memory check").startswith("ok")
    assert window.counters.value("status") == "completed → completed"
    assert "run <b>completed</b>" in window.banner.text()


def test_a_finished_run_stays_as_the_overlay_and_reset_shows_an_empty_guest(shown):
    window, s = shown(small_config())
    s.block(5)
    s.now = 0.002
    s.send(5, R.SENT_URGENT_MAIN)
    s.arrive(5, R.URGENT_MAIN)
    s.finish()
    window.refresh()
    window.controls.reset.click()
    assert window.latency.previous_label() == "vanilla postcopy"
    assert "previous run" in window.latency.stats_text()
    assert window.session is not s and window.session.phase == IDLE
    assert window.bitmap.count(R.MISSING) == window.session.cfg.npages


def test_reset_stops_a_running_session(shown):
    window, s = shown(small_config())
    window.controls.reset.click()
    assert s.phase == "failed"  # Session.stop() on a running session
    assert window.latency.previous_label() is None  # only a completed run is kept


def test_the_controls_drive_the_session(shown):
    window, s = shown(small_config(migration__switchover_after="60s"))
    controls = window.controls
    window.refresh()
    assert controls.pause.isEnabled() and not controls.postcopy.isEnabled()
    s.can_start_postcopy = True
    window.refresh()
    controls.postcopy.click()
    controls.pause.click()
    controls.pause.click()
    controls.scale.setValue(controls.scale.value() - 50)
    assert s.commands == [("migrate-start-postcopy",), ("pause", True), ("pause", False),
                          ("time-scale", controls.time_scale())]
    assert controls.note.text() == ""
    controls.set_value("guest.vcpus", 2)  # anything but the time scale waits for the next run
    assert "next run" in controls.note.text()
