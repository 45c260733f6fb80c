"""QEMU's MigrationStatus values, and each side's record of its changes in emulated time."""

from __future__ import annotations

import threading
from collections.abc import Callable

STATUSES = ("none", "setup", "cancelling", "cancelled", "active", "postcopy-active",
            "postcopy-paused", "postcopy-recover-setup", "postcopy-recover", "completed",
            "failed", "colo", "pre-switchover", "device", "wait-unplug")
FINAL = ("completed", "failed", "cancelled")


class StateLog:
    def __init__(self, side: str, now: Callable[[], float],
                 emit: Callable[[tuple], None] = lambda event: None) -> None:
        self.side = side
        self.status = "none"
        self.changes: list[tuple[str, float]] = []
        self._now = now
        self._emit = emit
        self._lock = threading.Lock()

    def set(self, status: str) -> None:
        assert status in STATUSES, status
        with self._lock:
            if status == self.status:
                return
            t = self._now()
            self.status = status
            self.changes.append((status, t))
        self._emit(("state", self.side, status, t))


PAUSABLE = ("postcopy-active", "postcopy-recover")


def pause_refusal(status: str) -> str | None:
    """QEMU's refusal of migrate-pause in `status`, or None when it may pause."""
    if status in PAUSABLE:
        return None
    return ("migrate-pause is currently only supported during postcopy-active or "
            "postcopy-recover state")
