"""The guest's progress in the window: in the counters next to blocktime, and in the grey
comparison with the previous run (made-up runs, gui.synthetic; one real run)."""

from emu.figures import progress
from emu.migration import ram as R
from gui.comparison import ProgressTrack, compare
from gui.session import COMPLETED
from gui.synthetic import SyntheticSession
from tests.gui.conftest import small_config

WAIT_MS = 30_000


def _synthetic(window, cfg, touches: list[int], resumed=0.1, now=0.3):
    """A run whose guest resumed on the destination at `resumed` and has done `touches`
    (per vCPU) by `now`, one fault served."""
    s = SyntheticSession(cfg)
    window.show_session(s, follow=False)
    s.status = {"source": "postcopy-active", "destination": "postcopy-active"}
    s.boards["destination"][progress.RESUMED] = resumed
    for v, n in enumerate(touches):
        s.boards["destination"][progress.board_field(v)] = n
    s.now = resumed
    s.block(3)
    s.now = now
    s.arrive(3, R.URGENT_MAIN)
    return s


def test_the_counters_show_progress_so_far_then_the_runs_own(make_window):
    window = make_window(small_config())
    window.show_session(SyntheticSession(small_config()), follow=False)
    window.refresh()
    assert window.counters.value("guest progress").startswith("–")  # still on the source
    s = _synthetic(window, small_config(guest__vcpus="2"), [300, 100])
    window.refresh()
    # 400 touches in 200 ms: 2,000 touches/s, by vCPU 1,500 and 500
    assert window.counters.value("guest progress") == \
        "2,000 touches/s (400 in 200.0 ms so far) (per vCPU: 1,500, 500)"
    s.finish()
    window.refresh()
    assert window.counters.value("guest progress").startswith("2,000 touches/s (400 in 200.0 ms)")


def test_the_grey_comparison_says_how_much_further_the_guest_got(make_window):
    window = make_window(small_config())
    vanilla = _synthetic(window, small_config(), [100])  # 100 touches in 200 ms
    window.refresh()
    vanilla.finish()  # 500 touches/s
    window.refresh()
    window.controls.reset.click()  # the finished run becomes the grey one
    assert window.latency.comparison_text() == ""  # nothing to compare with yet
    preempt = _synthetic(window, small_config(migration__postcopy_preempt="true"), [210])
    window.refresh()
    assert window.latency.previous_label() == "vanilla postcopy"
    # while it runs: against what the previous run had done by the same point
    assert window.latency.comparison_text() == \
        "preempt so far: 2.1x more guest progress than vanilla by then"
    assert window.latency.comparison_tip().endswith(
        "this run (preempt) 210 in 200.0 ms, previous run (vanilla) 100 by then")
    preempt.finish()
    window.refresh()
    assert window.latency.comparison_text() == "preempt: 2.1x more guest progress than vanilla"
    assert window.latency.comparison_tip().endswith("this run (preempt) 1,050, previous run "
                                                    "(vanilla) 500")
    assert "2.1x more guest progress" in window.latency.stats_text()


def _progress(seconds: float, touches: int, until: str = "run ended") -> dict:
    return {"total": touches / seconds, "touches": {"total": touches, "per-vcpu": [touches]},
            "window": {"seconds": seconds, "until": until}}


def test_a_run_under_way_is_compared_point_by_point_not_with_a_final_figure():
    # the previous run did 100 touches in its first 200 ms, then ran free to 1,100 by 210 ms
    previous = ProgressTrack()
    for seconds, touches in ((0.1, 50), (0.2, 100)):
        previous.add(_progress(seconds, touches))
    previous.add(_progress(0.21, 1100, "completed"))
    this = ProgressTrack()
    this.add(_progress(0.1, 150))
    # by 100 ms: 150 against 50, not against the previous run's final 5,238 touches/s
    line, _ = compare(this, previous, "preempt", "vanilla")
    assert line == "preempt so far: 3.0x more guest progress than vanilla by then"
    this.add(_progress(0.3, 400))  # past the end of the previous run: nothing to compare
    assert compare(this, previous, "preempt", "vanilla") is None
    this.add(_progress(0.3, 400, "completed"))  # both final: their own figures
    line, _ = compare(this, previous, "preempt", "vanilla")
    assert line == "preempt: 3.9x less guest progress than vanilla"


def test_a_real_run_shows_its_progress(make_window, qtbot):
    window = make_window(small_config(migration__postcopy_preempt="true"))
    window.start_migration()
    qtbot.waitUntil(lambda: window.session.phase == COMPLETED, timeout=WAIT_MS)
    window.refresh()
    got = window.session.report["progress"]
    assert got["touches"]["total"] > 0
    assert window.counters.value("guest progress").startswith(f"{got['total']:,.0f} touches/s")
