"""The grey comparison of a run's guest progress with the previous run's, without Qt.

A run's progress (emu/figures/progress.py) is counted from the guest's resume on the
destination. While a run goes on, its figure so far is compared with what the previous run
had done by the same point of its postcopy, not with the previous run's final figure: the end
of a postcopy phase, once the vCPUs no longer fault, runs at the guest's full speed and weighs
heavily in a final figure, which a run still under way has not reached yet. Once the run has
ended, the two final figures are compared.
"""

from __future__ import annotations

import numpy as np

from emu.figures import progress as guest_progress


class ProgressTrack:
    """One run's progress as the window saw it: (seconds since resume, touches) while it
    ran, and its final figure once it had one."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.touches: list[int] = []
        self.final: dict | None = None

    def add(self, progress: dict | None) -> None:
        if progress is None:
            return
        window = progress["window"]
        if window["until"] != "run ended":
            self.final = progress
        elif not self.seconds or window["seconds"] > self.seconds[-1]:
            self.seconds.append(window["seconds"])
            self.touches.append(progress["touches"]["total"])

    @property
    def now(self) -> tuple[float, int] | None:
        """The latest figure so far: (seconds since resume, touches)."""
        if self.final is not None:
            return self.final["window"]["seconds"], self.final["touches"]["total"]
        return (self.seconds[-1], self.touches[-1]) if self.seconds else None

    def touches_at(self, seconds: float) -> float | None:
        """Touches done by `seconds` after the resume, None past what is known."""
        xs, ys = [0.0, *self.seconds], [0, *self.touches]
        if self.final is not None:
            xs.append(self.final["window"]["seconds"])
            ys.append(self.final["touches"]["total"])
        if seconds > xs[-1]:
            return None
        return float(np.interp(seconds, xs, ys))


def compare(this: ProgressTrack, previous: ProgressTrack, label: str,
            previous_label: str) -> tuple[str, str] | None:
    """(line, tooltip): "preempt: 2.1x more guest progress than vanilla" once the run has
    ended, "... so far ... by then" while it goes on; None without two figures."""
    if this.final is not None and previous.final is not None:
        mine, theirs = this.final["total"], previous.final["total"]
        line = guest_progress.ratio_text(mine, theirs, label)
        tip = (f"guest progress, touches per emulated second on the destination: this run "
               f"({label}) {mine:,.0f}, previous run ({previous_label}) {theirs:,.0f}")
        suffix = ""
    else:
        now = this.now
        theirs = previous.touches_at(now[0]) if now else None
        if theirs is None:
            return None
        mine = now[1]
        line = guest_progress.ratio_text(mine, theirs, f"{label} so far")
        tip = (f"guest touches on the destination since the guest resumed there: this run "
               f"({label}) {mine:,} in {now[0] * 1e3:,.1f} ms, previous run "
               f"({previous_label}) {theirs:,.0f} by then")
        suffix = " by then"
    if line is None:
        return None
    return f"{line} than {previous_label}{suffix}", tip
