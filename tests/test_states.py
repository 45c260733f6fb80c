"""The state machines as QEMU writes them: every change is migrate_set_state(OLD, NEW), a
compare-and-set, and a change from a state the side has already left is refused and traced."""

import threading
import time
from dataclasses import dataclass

import pytest

from emu import controller, trace
from emu.controller import Run, migrate
from emu.events import StateChanged, StateRefused
from emu.faults import Fault, parse
from emu.migration import destination, incoming, loadvm, placement, source, wire
from emu.migration.states import StateLog, after_failure
from tests.conftest import config
from tests.test_recovery import assert_recovered, statuses

HOLD_S = 10.0  # real seconds the held listen thread waits for the pause at most


@dataclass(frozen=True)
class ResumeDecoded:
    """The held destination's own event: its listen thread has decoded POSTCOPY_RESUME."""


class HeldLoadVM(loadvm.LoadVM):
    """A listen thread that, the first time it decodes POSTCOPY_RESUME, says so and holds
    until the migration has paused: the preempt thread's pause then lands between decoding
    the command and acting on it, every time."""

    held = False

    def process_command(self, msg, main) -> None:
        if not self.held and msg.cmd == wire.MIG_CMD_POSTCOPY_RESUME:
            self.held = True
            self.dst.control.emit(ResumeDecoded())
            deadline = time.monotonic() + HOLD_S
            while self.dst.state.status != "postcopy-paused" and time.monotonic() < deadline:
                time.sleep(0.002)
        super().process_command(msg, main)


def held_destination_main(control, bufs, cfg) -> None:
    """The destination child's body (runs in the spawned process, which imports this module)."""
    loadvm.LoadVM = HeldLoadVM
    destination.main(control, bufs, cfg)


class CutPreemptOnResume(Run):
    """`cut preempt at postcopy-recover`, struck once the destination has decoded RESUME."""

    def _event(self, event) -> None:
        if isinstance(event, ResumeDecoded):
            self.inject(Fault("postcopy-recover", "cut", "preempt"))
        else:
            super()._event(event)


def test_pause_during_resume_handshake_is_not_overwritten(monkeypatch):
    """The preempt channel is cut during postcopy-recover, after the listen thread decoded
    POSTCOPY_RESUME: its postcopy-recover -> postcopy-active is refused (the destination is
    postcopy-paused by then), so the next migrate-recover is accepted and the run completes."""
    monkeypatch.setattr(destination, "main", held_destination_main)
    monkeypatch.setattr(controller, "Run", CutPreemptOnResume)
    cfg = config(workload__pattern="ab", migration__postcopy_preempt="true",
                 emulator__duration_limit="3s")
    result = migrate(cfg, None, [parse("cut main at 30ms")], 0.05)
    assert not [e for e in result["events"] if "migrate-recover refused" in e["event"]], \
        result["events"]
    assert_recovered(result, times=2)
    dst = statuses(result, "destination")
    assert dst[dst.index("postcopy-active"):] == [
        "postcopy-active", "postcopy-paused", "postcopy-recover", "postcopy-paused",
        "postcopy-recover", "postcopy-active", "completed"], dst
    refused = [e["event"] for e in result["events"] if "refused" in e["event"]]
    assert any("postcopy-recover -> postcopy-active" in e and "postcopy-paused" in e
               for e in refused), refused


def test_cut_preempt_at_postcopy_recover_as_it_comes():
    """The same fault at whatever moment the link strikes it: the run recovers."""
    result = migrate(config(workload__pattern="ab", migration__postcopy_preempt="true"), None,
                     [parse("cut main at 30ms"), parse("cut preempt at postcopy-recover")], 0.05)
    assert_recovered(result, times=2)


def test_a_change_is_a_compare_and_set():
    events = []
    log = StateLog("destination", lambda: 1.5, events.append)
    assert log.set("none", "setup")
    assert not log.set("none", "active")  # no longer in none: refused, traced
    assert log.status == "setup" and log.changes == [("setup", 1.5)]
    assert events == [StateChanged("destination", "setup", 1.5),
                      StateRefused("destination", "none", "active", "setup", 1.5)]
    assert str(events[1]) == ("destination: migrate_set_state none -> active refused: "
                              "the state is setup")
    assert log.set("setup", "setup") and len(events) == 2  # no change, no second event


def test_a_change_fires_qemu_s_trace_point_when_it_is_on():
    fired = []
    trace.set_sink(lambda name, fields: fired.append((name, fields)))
    try:
        log = StateLog("source", lambda: 0.0)
        log.set("none", "setup")  # off: nothing
        trace.enable(["migrate_set_*"])
        log.set("setup", "active")
        log.set("setup", "failed")  # refused: no change, no trace
    finally:
        trace.enable([])
        trace.set_sink(lambda name, fields: None)
    assert fired == [("migrate_set_state", {"new_state": "active"})]


def test_of_threads_racing_from_one_state_exactly_one_wins():
    log = StateLog("source", lambda: 0.0)
    log.set("none", "postcopy-paused")
    start = threading.Barrier(8)
    wins = []

    def resume():
        start.wait()
        wins.append(log.set("postcopy-paused", "postcopy-recover-setup"))

    threads = [threading.Thread(target=resume) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(wins) == [False] * 7 + [True]
    assert log.changes == [("postcopy-paused", 0.0), ("postcopy-recover-setup", 0.0)]


def test_a_failure_that_loses_the_race_decides_again():
    """The preempt thread saw postcopy-recover and pauses; the listen thread's RESUME lands
    first: the pause is made from postcopy-active instead, never lost."""
    log = StateLog("destination", lambda: 0.0)
    log.set("none", "postcopy-recover")
    seen = []

    def decide(status):
        seen.append(status)
        if len(seen) == 1:
            log.set("postcopy-recover", "postcopy-active")  # the other thread, in between
        return after_failure(status, destination.PAUSES)

    assert log.settle(decide) == ("postcopy-active", "postcopy-paused")
    assert seen == ["postcopy-recover", "postcopy-active"]
    assert [s for s, _ in log.changes] == ["postcopy-recover", "postcopy-active",
                                           "postcopy-paused"]


@pytest.mark.parametrize("status, new", [
    ("setup", "failed"), ("active", "failed"), ("device", "failed"),
    ("postcopy-active", "postcopy-paused"), ("postcopy-recover-setup", "postcopy-paused"),
    ("postcopy-recover", "postcopy-paused"), ("postcopy-paused", None),
    ("cancelling", "cancelled"), ("completed", None), ("failed", None), ("cancelled", None)])
def test_what_a_broken_channel_leads_to_on_the_source(status, new):
    assert after_failure(status, source.PAUSES) == new



RECOVERING = ("postcopy-paused", "postcopy-recover")  # 7.1 waits in the first, 8.0 the second


def lost_preempt_destination_main(control, bufs, cfg) -> None:
    """A destination that closes the first preempt channel a recovery brings, as a link that
    breaks it before its hello arrives: main is in, and its preempt channel never comes."""
    hello = incoming.Connections._hello

    def _hello(self, sock, which, arrival):
        if which == placement.PREEMPT and self.dst.state.status in RECOVERING \
                and not getattr(self, "lost", False):
            self.lost = True
            sock.close()
            return
        hello(self, sock, which, arrival)
    incoming.Connections._hello = _hello
    destination.main(control, bufs, cfg)


@pytest.mark.parametrize("design", ["7.1", "8.0"])
def test_a_recovery_whose_preempt_channel_never_comes_pauses_again(monkeypatch, design):
    """The recovery's preempt channel breaks before it reaches the destination, whose main
    is in: the source pauses and closes main, and the destination, waiting for the preempt
    channel (7.1 recovers only once every channel is in, 8.0 waits at POSTCOPY_RESUME), must
    see main go and stay (or be again) postcopy-paused, not sit in postcopy-recover with no
    channel refusing every migrate-recover. The next recovery completes."""
    monkeypatch.setattr(destination, "main", lost_preempt_destination_main)
    cfg = config(workload__pattern="ab", migration__postcopy_preempt="true",
                 migration__design=design, emulator__duration_limit="3s")
    result = migrate(cfg, None, [parse("cut main at 30ms")], 0.05)
    assert_recovered(result, times=2)
