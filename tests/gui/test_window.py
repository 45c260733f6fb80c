"""The window around real migrations: opens, runs, reaches the engine, and cleans up. What the
panels show is tested without processes, in test_panels.py."""

import os

from emu.migration import ram as R
from gui._qt.app import screenshot
from gui.session import COMPLETED, IDLE, RUNNING
from tests.gui.conftest import small_config

WAIT_MS = 30_000  # generous: a loaded 2-core machine; no test asserts on durations


def _leftovers() -> tuple[list[str], list]:
    import multiprocessing

    mine = f"pce_{os.getpid()}_"
    return ([n for n in os.listdir("/dev/shm") if n.startswith(mine)],
            multiprocessing.active_children())


def _started(window) -> bool:
    return window.session.phase == RUNNING


def test_opens_idle_and_closes_cleanly(make_window):
    window = make_window(small_config())
    assert window.session.phase == IDLE
    assert window.controls.start.isEnabled() and not window.controls.pause.isEnabled()
    assert window.bitmap.count(R.MISSING) == small_config().npages
    window.close()
    assert _leftovers() == ([], [])


def test_a_run_to_completion_fills_the_bitmap_and_the_latency_plot(make_window, qtbot):
    cfg = small_config(migration__postcopy_preempt="true")
    window = make_window(cfg)
    window.start_migration()
    qtbot.waitUntil(lambda: window.session.phase == COMPLETED, timeout=WAIT_MS)
    qtbot.waitUntil(lambda: window.bitmap.count(R.MISSING) == 0, timeout=WAIT_MS)
    present = sum(window.bitmap.count(code) for code in
                  (R.PRECOPY, R.BACKGROUND, R.URGENT_MAIN, R.URGENT_PREEMPT))
    assert present == cfg.npages
    assert window.bitmap.count(R.URGENT_PREEMPT) > 0  # pages came on demand, on preempt
    faults = window.session.faults.count
    assert faults > 0
    assert f"{faults:,} faults" in window.latency.stats_text()
    assert window.latency.point_count() == faults
    assert window.counters.value("memory check").startswith("ok")
    # hovering over a page tells its story
    view = window.bitmap.view.viewport()
    qtbot.mouseMove(view, view.rect().center())
    qtbot.waitUntil(lambda: window.bitmap.info_text().startswith("page "), timeout=WAIT_MS)
    assert "arrived at" in window.bitmap.info_text()
    assert window.counters.value("status") == "completed → completed"
    assert "run completed" in window.events.toPlainText()
    assert _leftovers() == ([], [])  # a finished run frees everything at once


def test_settings_reach_the_engine(make_window, qtbot):
    window = make_window(small_config(emulator__time_scale="0.3"))
    controls = window.controls
    controls.set_value("migration.postcopy-preempt", True)
    controls.set_value("link.rtt", "1ms")
    window.start_migration()
    qtbot.waitUntil(lambda: _started(window), timeout=WAIT_MS)
    run = window.session.run
    assert run.cfg["migration.postcopy-preempt"] is True
    assert run.cfg["link.rtt"] == 0.001
    # the time scale changes the running migration at once
    controls.scale.setValue(controls.scale.value() - 50)
    assert run.clock.scale == controls.time_scale() != 0.3
    # any other setting waits for the next run, and says so
    assert controls.note.text() == ""
    controls.set_value("guest.vcpus", 2)
    assert "next run" in controls.note.text()
    qtbot.waitUntil(lambda: window.session.report is not None, timeout=WAIT_MS)
    assert window.session.report["query-migrate"]["ram"]["postcopy-requests"] > 0
    assert window.session.faults.records["channel"].max() == 1  # served on preempt


def test_pause_freezes_emulated_time_and_postcopy_starts_by_hand(make_window, qtbot):
    window = make_window(small_config(migration__switchover_after="60s"))
    window.start_migration()
    qtbot.waitUntil(lambda: window.session.can_start_postcopy, timeout=WAIT_MS)
    window.controls.pause.click()
    frozen = window.session.run.clock.now()
    qtbot.wait(200)
    assert window.session.run.clock.now() == frozen
    window.controls.pause.click()
    qtbot.waitUntil(lambda: window.session.run.clock.now() > frozen, timeout=WAIT_MS)
    assert window.controls.postcopy.isEnabled()
    window.controls.postcopy.click()
    qtbot.waitUntil(lambda: window.session.phase == COMPLETED, timeout=WAIT_MS)
    assert "migrate-start-postcopy (by hand)" in window.events.toPlainText()


def test_reset_and_closing_mid_migration_leave_nothing_behind(make_window, qtbot):
    window = make_window(small_config(guest__ram="32MiB", emulator__time_scale="0.1"))
    pids = _in_postcopy(window, qtbot)
    window.controls.reset.click()
    _all_gone(pids)
    assert window.session.phase == IDLE
    assert window.bitmap.count(R.MISSING) == window.session.cfg.npages
    pids = _in_postcopy(window, qtbot)
    window.close()
    _all_gone(pids)


def _in_postcopy(window, qtbot) -> list[int]:
    """Start a migration and wait for postcopy; the pids of its processes."""
    window.start_migration()
    qtbot.waitUntil(lambda: window.session.run.status["destination"] == "postcopy-active",
                    timeout=WAIT_MS)
    return [child.pid for child in window.session.run.children.values()]


def _all_gone(pids: list[int]) -> None:
    assert _leftovers() == ([], [])
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or _zombie(pid)


def test_screenshot_saves_the_window_mid_migration(make_window, qtbot, tmp_path):
    from gui._qt.app import application

    window = make_window(small_config(emulator__time_scale="0.2"))
    path = tmp_path / "shot.png"
    assert screenshot(application(), window, str(path), 1.0) == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert _leftovers() == ([], [])


def test_a_bad_setting_is_refused_with_the_engines_words(make_window):
    window = make_window(small_config())
    window.controls.set_value("guest.ram", "3MiB")
    window.controls.set_value("guest.page-size", "2MiB")
    window.start_migration()
    assert window.session.phase == IDLE
    assert "guest.ram" in window.controls.note.text()


def _zombie(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] == "Z"
