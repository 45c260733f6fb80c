"""A recorded run, played back: what gui.session.Session offers the window, from a file.

No processes: a ReplaySession rebuilds each frame's Snapshot from the recording (gui/record.py)
and moves through them as a player does: play at a speed, pause, step one frame, one event or
one emulated millisecond either way, or jump to any instant. Moving back rebuilds the page
arrays from the nearest keyframe and sets `restart`, for the window to clear its panels before
the next tick (they add what is new; going back, everything up to the instant is new). Plain
Python, no Qt, like gui.session.
"""

from __future__ import annotations

import bisect
import math
import time
from dataclasses import dataclass

import numpy as np

from emu.migration import ram as R
from gui.record import DISTORTION, KEYFRAME_BYTES, PHASES, URGENT_KINDS, Recording
from gui.session import FINAL, RUNNING, Distortion, FaultLog, Snapshot, Urgent, describe_page

SPEEDS = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 10.0)  # times the run's own time-scale
STEP_S = 1e-3  # one emulated millisecond


class Player:
    """A position in emulated time that plays at a speed, jumps and steps: what the transport
    drives, in a ReplaySession and in a gui.compare.ReplayGroup. Subclasses give start_time,
    end_time, the time-scale played against, and _show_position() to follow the position."""

    position = 0.0
    playing = False
    speed = 1.0  # times the recorded time-scale
    _real = 0.0

    def play(self, on: bool = True) -> None:
        if on and self.position >= self.end_time:
            self.seek(self.start_time)  # from the start again, as a player does
        self.playing = on
        self._real = time.monotonic()

    def seek(self, t: float) -> None:
        """Jump to emulated time *t*, clamped to the recording."""
        self.position = min(max(t, self.start_time), self.end_time)
        self._show_position()

    def step_ms(self, n: int) -> None:
        """One emulated millisecond forward (n=1) or back (n=-1), from the player's position."""
        self.seek(self.position + n * STEP_S)

    def _advance(self) -> None:
        """While playing: on by the real time since the last call, at the speed."""
        real = time.monotonic()
        if self.playing:
            self.position += (real - self._real) * self.speed * self.time_scale
            if self.position >= self.end_time:
                self.position, self.playing = self.end_time, False
            self._show_position()
        self._real = real


class ReplaySession(Player):
    def __init__(self, recording: Recording) -> None:
        self.recording = rec = recording
        self.cfg = rec.cfg
        self.can_start_postcopy = False
        self.time_scale = rec.cfg["emulator.time-scale"]
        self.restart = False  # the panels must be cleared before the next tick
        self.marks = rec.header.get("marks") or []
        self._times = rec.times.tolist()
        self._keyframes = self._build_keyframes()
        self._i = -1  # the frame the arrays hold
        self._shown = -1  # the frame the last tick showed
        self._dst = self._src = self._arrival = None
        self.faults = FaultLog()  # the faults up to the frame last shown
        self._goto(0)
        self.position = self._times[0]  # emulated s the player is at
        self._real = time.monotonic()

    # ---- what the window reads, as on a Session ----

    @property
    def frame(self) -> int:
        return self._i

    @property
    def start_time(self) -> float:
        return self._times[0]

    @property
    def end_time(self) -> float:
        return self._times[-1]

    @property
    def phase(self) -> str:
        return PHASES[int(self.recording.column("phase")[self._i])]

    @property
    def now(self) -> float:
        return self._times[self._i]

    @property
    def paused(self) -> bool:
        return bool(self.recording.column("paused")[self._i])

    @property
    def scale(self) -> float:
        return float(self.recording.column("scale")[self._i])

    @property
    def switchover(self) -> float | None:
        value = float(self.recording.column("switchover")[self._i])
        return None if math.isnan(value) else value

    @property
    def fidelity(self) -> RecordedFidelity:
        """The figures' fidelity as the live window judged it at this frame."""
        row = self.recording.arrays["fidelity"][self._i]
        return RecordedFidelity(_distortion(row[:DISTORTION]), _distortion(row[DISTORTION:]))

    @property
    def distorted(self) -> Distortion | None:
        return self.fidelity.worst

    @property
    def report(self) -> dict | None:
        return self.recording.header.get("report") if self.phase in FINAL else None

    @property
    def integrity(self) -> dict | None:
        at = self.recording.header.get("integrity-frame")
        ok = isinstance(at, int) and self._i >= at
        return self.recording.header.get("integrity") if ok else None

    def tick(self) -> Snapshot:
        """The frame at the player's position, with what is new since the last tick."""
        self._advance()
        return self._snapshot()

    def describe(self, page: int, code: int, arrival: np.ndarray) -> str:
        return describe_page(self.cfg, self.faults, page, code, arrival,
                             self._asked().get(page), self.now)

    def start_postcopy(self) -> bool:
        return False  # a recording is what happened: nothing to command

    def pause(self, paused: bool) -> None:
        self.play(not paused)

    def set_scale(self, scale: float) -> None:
        pass  # the recorded time-scale stays what it was; the player has its own speed

    def stop(self) -> None:
        self.playing = False

    def where(self) -> str:
        """Where the player is, in words, for the transport's label."""
        return (f"{self.position:.4f} s of {self.end_time:.3f} s emulated · frame "
                f"{self._i + 1}/{self.recording.frames} (taken at {self.now:.4f} s)")

    # ---- the player ----

    def _show_position(self) -> None:
        """The frame shown is the last one taken at or before the position, as the live
        window showed it then."""
        self._goto(self._frame_at(self.position))

    def step_frame(self, n: int) -> None:
        self._to_frame(self._i + n)

    def step_event(self, n: int) -> None:
        """To the next (n=1) or the previous (n=-1) frame where something happened: a line in
        the event log, or a mark on the timeline."""
        frames = self.event_frames()
        at = bisect.bisect_right(frames, self._i) if n > 0 else bisect.bisect_left(frames,
                                                                                  self._i) - 1
        if 0 <= at < len(frames):
            self._to_frame(frames[at])

    def _to_frame(self, i: int) -> None:
        i = min(max(i, 0), self.recording.frames - 1)
        self.position = self._times[i]
        self._goto(i)

    def _frame_at(self, t: float) -> int:
        return max(bisect.bisect_right(self._times, t) - 1, 0)

    def event_frames(self) -> list[int]:
        events = self.recording.column("events")
        new_lines = np.flatnonzero(np.diff(events, prepend=0) > 0)
        at_marks = [self._frame_at_or_after(m["t"]) for m in self.marks]
        return sorted({*new_lines.tolist(), *at_marks})

    def _frame_at_or_after(self, t: float) -> int:
        return min(bisect.bisect_left(self._times, t), self.recording.frames - 1)

    # ---- the page arrays ----

    def _build_keyframes(self) -> dict[int, tuple[np.ndarray, ...]]:
        """Full page arrays every `every` frames, within KEYFRAME_BYTES: going back costs at
        most `every` frames of changes."""
        rec, n = self.recording, self.cfg.npages
        every = max(16, math.ceil(rec.frames * n * 10 / KEYFRAME_BYTES))
        dst, src, arrival = _blank(n)
        keys = {}
        for i in range(rec.frames):
            rec.apply(i, dst, src, arrival)
            if i % every == 0:
                keys[i] = (dst.copy(), src.copy(), arrival.copy())
        return keys

    def _goto(self, i: int) -> None:
        if i == self._i:
            return
        if i < self._i or self._dst is None:
            start = max(k for k in self._keyframes if k <= i)
            self._dst, self._src, self._arrival = (a.copy() for a in self._keyframes[start])
            self._i = start
            if self._shown >= 0:
                self.restart = True
        for j in range(self._i + 1, i + 1):
            self.recording.apply(j, self._dst, self._src, self._arrival)
        self._i = i

    # ---- snapshots ----

    def _snapshot(self) -> Snapshot:
        rec, i = self.recording, self._i
        col = rec.column
        first = self.restart or self._shown < 0
        if first:
            self.faults = FaultLog()
            self.restart = False
        shown = -1 if first else self._shown
        faults_from = int(col("faults")[shown]) if shown >= 0 else 0
        events_from = int(col("events")[shown]) if shown >= 0 else 0
        new = rec.arrays["faults"][faults_from:int(col("faults")[i])]
        self.faults.extend(np.array(new))
        self._shown = i
        statuses = rec.header["statuses"]
        status = {side: statuses[int(col(side)[i])] for side in ("source", "destination")}
        phase = self.phase
        waiting = (np.flatnonzero(self._dst == R.REQUESTED) if phase == RUNNING
                   else np.zeros(0, np.int64))
        boards = {role: dict(zip(fields, rec.arrays[f"board-{role}"][i].tolist(), strict=True))
                  for role, fields in rec.header["boards"].items()}
        events = rec.events[events_from:int(col("events")[i])]
        return Snapshot(phase, self.now, status, self._dst, self._src, self._arrival,
                        np.array(new), waiting, self._urgent(), boards, list(events))

    def _urgent(self) -> Urgent:
        a = self.recording.arrays
        span = self.recording.span("urgent", self._i)
        urgent = Urgent()
        for kind, page, age in zip(a["urgent-kind"][span].tolist(), a["urgent-page"][span]
                                   .tolist(), a["urgent-age"][span].tolist(), strict=True):
            getattr(urgent, URGENT_KINDS[kind]).append((page, age))
        return urgent

    def _asked(self) -> dict[int, float]:
        """When each page a vCPU waits for was asked for, as the live session knew it."""
        urgent = self._urgent()
        return {page: self.now - age for name in URGENT_KINDS
                for page, age in getattr(urgent, name)}


@dataclass(frozen=True)
class RecordedFidelity:
    """gui.session.Fidelity's verdicts, read back: `now` and `worst`."""

    now: Distortion | None
    worst: Distortion | None


def _distortion(row: np.ndarray) -> Distortion | None:
    if np.isnan(row[0]):
        return None
    return Distortion(*(float(v) for v in row))


def _blank(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The page arrays before the first frame, as the Recorder starts from."""
    return np.full(n, R.MISSING, np.uint8), np.full(n, R.UNSENT, np.uint8), np.zeros(n)
