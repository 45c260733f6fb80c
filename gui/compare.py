"""Runs side by side: recordings on one shared timeline, a baseline, and the difference in
words.

A ReplayGroup moves every ReplaySession to the same emulated instant and offers the player
(gui/_qt/transport.py) what a single ReplaySession offers it. One member may be a live
gui.session.Session: while it runs, the recordings follow its emulated time and the player
waits; once it has ended, the window replaces it by the replay of its own recording. The
baseline is the first run that kept up with its schedule unless one is pinned; a run that fell
behind its schedule (report "emulator": "keeping-up" false: its latencies include the
emulator's own lag) is never taken as the baseline without saying so. Plain Python, no Qt.
"""

from __future__ import annotations

import bisect

from gui.replay import Player, ReplaySession
from gui.session import FINAL, Snapshot

SAME = 1.05  # ratios closer to 1 than this are "about the same"


def fell_behind(session) -> bool:
    """Did the run fall behind its schedule (the report's emulator health)? A recording says
    it from its first frame, a live run once its report exists."""
    recording = getattr(session, "recording", None)
    report = (recording.header.get("report") if recording else session.report) or {}
    return report.get("emulator", {}).get("keeping-up") is False


class ReplayGroup(Player):
    """Several recordings on one timeline, from the earliest first frame to the latest last."""

    def __init__(self, sessions: list, names: list[str]) -> None:
        """sessions: ReplaySessions, and at most one live Session."""
        self.sessions = sessions
        self.names = names
        self.time_scale = sessions[0].cfg["emulator.time-scale"]  # what 1x plays at
        self.pinned: int | None = None
        self.position = self.start_time

    @property
    def replays(self) -> list[ReplaySession]:
        return [s for s in self.sessions if isinstance(s, ReplaySession)]

    @property
    def live(self):
        """The live Session while it runs, else None."""
        return next((s for s in self.sessions if not isinstance(s, ReplaySession)
                     and s.phase not in FINAL), None)

    def replace(self, i: int, replay: ReplaySession) -> None:
        """Member *i* from now on: the replay of the live run that has ended."""
        self.sessions[i] = replay
        replay.seek(self.position)

    @property
    def start_time(self) -> float:
        return min((r.start_time for r in self.replays), default=0.0)

    @property
    def end_time(self) -> float:
        live = self.live
        return max([r.end_time for r in self.replays] + ([self.position] if live else []))

    @property
    def marks(self) -> list[dict]:
        return sorted(({**m, "text": f"{name}: {m['text']}"}
                       for r, name in zip(self.sessions, self.names, strict=True)
                       for m in getattr(r, "marks", [])), key=lambda m: m["t"])

    # ---- the baseline ----

    @property
    def baseline(self) -> int:
        """The pinned run, else the first that kept up with its schedule, else the first."""
        if self.pinned is not None:
            return self.pinned
        return next((i for i, r in enumerate(self.sessions) if not fell_behind(r)), 0)

    def pin(self, i: int | None) -> None:
        self.pinned = i

    def differences(self) -> list[str]:
        """Each run against the baseline at the current instant, in words; first a line on
        the baseline itself if it fell behind its schedule."""
        b = self.baseline
        base = self.sessions[b]
        lines = []
        if fell_behind(base):
            why = "pinned" if self.pinned is not None else "no run kept up"
            lines.append(f"baseline {self.names[b]} fell behind its schedule ({why}): its "
                         "latencies include the emulator's own lag")
        for i, replay in enumerate(self.sessions):
            if i != b:
                lines.append(difference(self.names[i], replay, self.names[b], base))
        return lines

    # ---- the player, as ReplaySession's ----

    def tick(self) -> list[Snapshot]:
        """Every member's snapshot at the shared instant: the live run's time while it runs
        (it is ticked first), else the player's."""
        live = self.live
        if live is not None:
            snap = live.tick()
            self.position = snap.now
            self._show_position()
            return [snap if s is live else s.tick() for s in self.sessions]
        self._advance()
        return [r.tick() for r in self.sessions]

    def step_frame(self, n: int) -> None:
        """To the next (previous) instant at which any run took a frame."""
        self._step(sorted({t for r in self.replays for t in r.recording.times.tolist()}), n)

    def step_event(self, n: int) -> None:
        """To the next (previous) event of any run."""
        times = sorted({r.recording.times[i] for r in self.replays for i in r.event_frames()})
        self._step([float(t) for t in times], n)

    def _step(self, times: list[float], n: int) -> None:
        at = (bisect.bisect_right(times, self.position) if n > 0
              else bisect.bisect_left(times, self.position) - 1)
        if 0 <= at < len(times):
            self.seek(times[at])

    def _show_position(self) -> None:
        for replay in self.replays:
            replay.seek(self.position)

    def where(self) -> str:
        if self.live is not None:
            return f"{self.position:.4f} s emulated · following the live run"
        return (f"{self.position:.4f} s of {self.end_time:.3f} s emulated · "
                f"{len(self.sessions)} runs")


def ratio_words(ours: float, theirs: float, what: str, lower: str, higher: str) -> str:
    """"6.3x lower mean latency": ours against theirs, in the words for each way."""
    if not ours or not theirs:
        return ""
    r = theirs / ours if ours < theirs else ours / theirs
    if r < SAME:
        return f"about the same {what}"
    return f"{r:.1f}x {lower if ours < theirs else higher} {what}"


def difference(name: str, replay: ReplaySession, base_name: str, base: ReplaySession) -> str:
    """One run against the baseline, up to the instant both are at: "preempt: 6.3x lower
    mean latency (1.18 ms against 7.42 ms), 4.0x lower p99, 2.1x more faults resolved"."""
    ours, theirs = replay.faults.summary(), base.faults.summary()
    if not ours["count"] or not theirs["count"]:
        return f"{name}: no fault resolved yet in {'it' if not ours['count'] else base_name}"
    parts = [ratio_words(ours["avg-us"], theirs["avg-us"], "mean latency", "lower", "higher")
             + f" ({ours['avg-us'] / 1e3:.2f} ms against {theirs['avg-us'] / 1e3:.2f} ms)",
             ratio_words(ours["p99-us"], theirs["p99-us"], "p99", "lower", "higher"),
             ratio_words(theirs["count"], ours["count"], "faults resolved by then", "more",
                         "fewer")]
    behind = " (fell behind its schedule: latencies include the emulator's lag)" \
        if fell_behind(replay) else ""
    return f"{name} against {base_name}: " + ", ".join(p for p in parts if p) + behind
