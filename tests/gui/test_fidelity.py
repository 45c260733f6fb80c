"""The time-scale slider is honest (issue 14 item 6): while the emulator falls behind the
link's schedule, the window says so beside the figures and names the faithful speed; a
distorted run is marked as such and stays out of the grey comparison. Against a made-up
migration (gui.synthetic) whose destination board reports the lag, as the engine's does."""

from emu.figures import timescale
from emu.migration import ram as R
from gui.session import Fidelity
from gui.synthetic import SyntheticSession
from tests.gui.conftest import small_config


def _show(make_window, cfg):
    window = make_window(cfg)
    session = SyntheticSession(cfg)
    window.show_session(session, follow=False)
    return window, session


def _fault(s, page: int, latency: float) -> None:
    """A vCPU waits *latency* for *page*, which comes on main."""
    s.block(page)
    s.now += latency
    s.send(page, R.SENT_URGENT_MAIN)
    s.arrive(page, R.URGENT_MAIN)


def _frames(s, count: int, lag: float) -> None:
    """*count* more frames reach the destination, each *lag* late (emulated seconds)."""
    dst = s.boards["destination"]
    dst["rx-frames"] += count
    dst["rx-lag-sum"] += count * lag


def _run(window, s, lag: float, latency: float = 1e-3) -> None:
    """Postcopy with faults of *latency* while the frames come *lag* late."""
    s.status = {"source": "postcopy-active", "destination": "postcopy-active"}
    window.refresh()  # the first sample of the lag counters
    for page in range(20):
        _fault(s, page, latency)
        _frames(s, 50, lag)
        window.refresh()


def test_a_run_that_falls_behind_says_so_beside_the_figures_and_names_a_faithful_speed(
        make_window):
    window, s = _show(make_window, small_config(emulator__time_scale="10"))
    _run(window, s, lag=50e-3)
    said = window.latency.warning()
    assert said.startswith("figures distorted: the emulator is 50 ms behind")
    assert s.distorted.faithful == 0.01  # 5 ms of real lag a frame against 1 ms latencies
    assert said.endswith("0.01x, the slowest, comes closest to faithful")
    s.finish()
    window.refresh()
    assert "figures distorted" in window.banner.text()  # not just "run completed"
    assert window.latency.warning() == said  # the mark stays once the run has ended


def test_the_faithful_speed_named_is_the_rule_s(make_window, monkeypatch):
    monkeypatch.setattr(timescale, "known_cost", lambda: timescale.REFERENCE)  # 1 ms a fault
    window, s = _show(make_window, small_config(emulator__time_scale="2"))
    _run(window, s, lag=1e-3, latency=10e-3)  # 0.5 ms of real lag a frame, 10 ms latencies
    faithful = s.distorted.faithful
    assert faithful == timescale.suggest(2, 1e-3, 10e-3, 1e9 / 8 / (128 << 10)) == 0.1
    assert window.latency.warning().endswith("at 0.1x or slower they are faithful")


def test_a_distorted_run_stays_out_of_the_grey_comparison(make_window):
    window, s = _show(make_window, small_config(emulator__time_scale="0.1"))
    _run(window, s, lag=1e-6)  # faithful: kept as the comparison
    assert window.latency.warning() is None and s.distorted is None
    s.finish()
    window.refresh()
    distorted = SyntheticSession(small_config(emulator__time_scale="10"))
    window.show_session(distorted, follow=False)
    assert window.latency.previous_label() == "vanilla postcopy"
    _run(window, distorted, lag=50e-3)
    distorted.finish()
    window.refresh()
    window.show_session(SyntheticSession(small_config()), follow=False)
    # the grey run is still the faithful one: the distorted run did not replace it
    assert window.latency.previous_label() == "vanilla postcopy"
    assert window.latency._previous[1] is s.faults


def test_fidelity_judges_the_recent_lag_against_the_latencies_by_the_run_rule():
    cfg = small_config(emulator__time_scale="1")
    fidelity = Fidelity(cfg)
    log = SyntheticSession(cfg).faults
    board = {"rx-frames": 0.0, "rx-lag-sum": 0.0}
    fidelity.update(board, True, log, 1.0, 0.0)
    board.update({"rx-frames": 100.0, "rx-lag-sum": 100 * 0.5e-3})
    fidelity.update(board, True, log, 1.0, 0.5)
    predicted = timescale.predicted_latency(cfg)
    assert fidelity.now is not None and fidelity.now.latency == predicted  # no faults yet
    assert fidelity.now.lag > timescale.lag_bound(predicted) and fidelity.worst == fidelity.now
    board.update({"rx-frames": 200.0})  # 100 frames on time, but within the window
    fidelity.update(board, True, log, 1.0, 0.9)
    assert fidelity.now is not None
    board.update({"rx-frames": 300.0})  # the late frames have left the window
    fidelity.update(board, True, log, 1.0, 2.0)
    assert fidelity.now is None and fidelity.worst is not None  # the run keeps its mark


def test_a_real_run_far_too_fast_is_marked_and_not_compared(make_window, qtbot):
    """preempt's latencies are a fraction of a millisecond: at 5x no machine keeps its lag
    under 2% of them (20 us of emulated time is 4 us of real time a frame)."""
    from gui.session import COMPLETED

    window = make_window(small_config(migration__postcopy_preempt="true",
                                      emulator__time_scale="5"))
    window.start_migration()
    qtbot.waitUntil(lambda: window.session.phase == COMPLETED, timeout=30_000)
    window.refresh()
    assert window.session.distorted is not None
    assert window.session.report["emulator"]["keeping-up"] is False
    assert "figures distorted" in window.banner.text()
    assert window.latency.warning().startswith("figures distorted: the emulator is ")
    window.controls.reset.click()
    assert window.latency.previous_label() is None  # a completed run, but not a faithful one
