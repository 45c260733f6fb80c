"""The state machines as QEMU writes them: every change is migrate_set_state(OLD, NEW), a
compare-and-set, and a change from a state the side has already left is refused and traced."""

import time

from emu import controller, destination, wire
from emu.controller import Run, migrate
from emu.faults import Fault, parse
from tests.conftest import config
from tests.test_recovery import assert_recovered, statuses

HOLD_S = 10.0  # real seconds the held listen thread waits for the pause at most


class HeldDestination(destination.Destination):
    """A destination whose listen thread, the first time it decodes POSTCOPY_RESUME, says so
    and holds until the migration has paused: the preempt thread's pause then lands between
    decoding the command and acting on it, every time."""

    held = False

    def _main_message(self, msg) -> None:
        if not self.held and getattr(msg, "cmd", None) == wire.MIG_CMD_POSTCOPY_RESUME:
            self.held = True
            self.control.emit(("resume-decoded",))
            deadline = time.monotonic() + HOLD_S
            while self.state.status != "postcopy-paused" and time.monotonic() < deadline:
                time.sleep(0.002)
        super()._main_message(msg)


def held_destination_main(control, bufs, cfg) -> None:
    """The destination child's body (runs in the spawned process, which imports this module)."""
    destination.Destination = HeldDestination
    destination.main(control, bufs, cfg)


class CutPreemptOnResume(Run):
    """`cut preempt at postcopy-recover`, struck once the destination has decoded RESUME."""

    def _event(self, event: tuple) -> None:
        if event[0] == "resume-decoded":
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
