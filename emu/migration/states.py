"""QEMU's MigrationStatus values, and each side's record of its changes in emulated time."""

from __future__ import annotations

import threading
from collections.abc import Callable

from emu import trace
from emu.events import Event, Refused, StateChanged, StateRefused

STATUSES = ("none", "setup", "cancelling", "cancelled", "active", "postcopy-device",
            "postcopy-active",
            "postcopy-paused", "postcopy-recover-setup", "postcopy-recover", "completed",
            "failed", "colo", "pre-switchover", "device", "wait-unplug")
FINAL = ("completed", "failed", "cancelled")

TRACE_SET_STATE = trace.point("migrate_set_state")  # QEMU's, with the new state's name


class StateLog:
    """One side's MigrationStatus and its changes. Every change is QEMU's
    migrate_set_state(&state, OLD, NEW), a compare-and-set: threads act on what they saw a
    moment ago, and a change from a state the side has left meanwhile (a pause that landed
    during the recovery handshake) is refused and traced, never written over it."""

    def __init__(self, side: str, now: Callable[[], float],
                 emit: Callable[[Event], None] = lambda event: None) -> None:
        self.side = side
        self.status = "none"
        self.changes: list[tuple[str, float]] = []
        self._now = now
        self._emit = emit
        self._lock = threading.Lock()

    def set(self, old: str, new: str) -> bool:
        """Change from `old` to `new`; False (and a StateRefused event) when the state is
        no longer `old`. Already in `new` is no change, as QEMU's cmpxchg of a state with
        itself sends no second event."""
        assert old in STATUSES and new in STATUSES, (old, new)
        with self._lock:
            actual, t = self.status, self._now()
            if actual == old and new != old:
                self.status = new
                self.changes.append((new, t))
        if actual != old:
            self._emit(StateRefused(self.side, old, new, actual, t))
        elif new != old:
            if TRACE_SET_STATE.enabled:
                TRACE_SET_STATE(new_state=new)
            self._emit(StateChanged(self.side, new, t))
        return actual == old

    def pause_allowed(self) -> bool:
        """migrate-pause may break the channels now; if not, QEMU's refusal is told."""
        refusal = pause_refusal(self.status)
        if refusal:
            self._emit(Refused("migrate-pause", refusal))
        return refusal is None

    def settle(self, decide: Callable[[str], str | None]) -> tuple[str, str | None]:
        """Change to decide(current state), again from the new state if another thread changed
        it in between (QEMU's loop in migrate_fd_cancel). Returns (old, new); new is None when
        decide wants no change."""
        while True:
            old = self.status
            new = decide(old)
            if new is None or self.set(old, new):
                return old, new


def after_failure(status: str, pausable: tuple[str, ...]) -> str | None:
    """The state a broken channel leads to from `status` (None: it stays). In postcopy the
    guest's memory is split between the hosts: from `pausable` the migration pauses."""
    if status in pausable:
        return "postcopy-paused"
    if status == "cancelling":
        return "cancelled"  # migrate_cancel closed the channels
    if status in FINAL or status == "postcopy-paused":
        return None
    return "failed"


PAUSABLE = ("postcopy-active", "postcopy-recover")


def pause_refusal(status: str) -> str | None:
    """QEMU's refusal of migrate-pause in `status`, or None when it may pause."""
    if status in PAUSABLE:
        return None
    return ("migrate-pause is currently only supported during postcopy-active or "
            "postcopy-recover state")
