"""Emulated time, shared by every process of one run.

emulated = emu_base + (real - real_base) * scale, with real = time.monotonic() (one clock for the
whole machine, so every process agrees). The controller owns the clock and may change the scale
while a run goes on (the window's slider; scale 0 pauses the emulation); the others only read it.
A sequence counter (a seqlock) lets readers in other processes see the three values consistently.
"""

from __future__ import annotations

import time

# A sleep ends up to this late (real seconds), so the last SPIN_S before a deadline are spun.
# Measured on the 2-core dev VM with the engines' 1 us timer slack (child.precise_timers): a
# sleep ends 18-22 us late (median), 24-29 us (90th percentile); with Linux's default 50 us
# slack it was 72-91 us, and this was 200 us.
SPIN_S = 60e-6


class Clock:
    NBYTES = 4 * 8

    def __init__(self, buf: memoryview | None = None) -> None:
        # doubles: real_base, emu_base, scale, sequence (a memoryview: read at every step
        # of every process, where numpy's scalar access would cost ten times as much)
        self._v = memoryview(buf if buf is not None else bytearray(self.NBYTES))[:self.NBYTES] \
            .cast("d")

    def start(self, scale: float, at: float = 0.0) -> None:
        """Set emulated time to `at` now, running at `scale` (controller only)."""
        self._write(time.monotonic(), at, scale)

    def set_scale(self, scale: float) -> None:
        self._write(time.monotonic(), self.now(), scale)

    @property
    def scale(self) -> float:
        return self._read()[2]

    @property
    def started(self) -> bool:
        return self._v[3] > 0

    def now(self) -> float:
        real_base, emu_base, scale = self._read()
        return emu_base + (time.monotonic() - real_base) * scale

    def real_wait(self, t_emu: float) -> float:
        """Real seconds until emulated time t_emu (inf while paused)."""
        real_base, emu_base, scale = self._read()
        if scale <= 0:
            return float("inf")
        return (t_emu - emu_base) / scale + real_base - time.monotonic()

    def real_at(self, t_emu: float) -> float:
        """The time.monotonic() at which emulated time t_emu is (or was) reached: a time every
        process on the machine reads alike, where each standalone program's emulated clock is
        its own (started when the program started). While paused, the moment the pause began."""
        real_base, emu_base, scale = self._read()
        if scale <= 0:
            return real_base
        return real_base + (t_emu - emu_base) / scale

    def at_real(self, real: float) -> float:
        """The emulated time on this clock at time.monotonic() `real` (real_at's inverse). A
        time before the clock's last change (a new scale, a pause) reads as that change's
        moment: the clock keeps no older mapping, and a wait across a pause is no emulated
        time at all."""
        real_base, emu_base, scale = self._read()
        return emu_base + max(0.0, real - real_base) * scale

    def sleep_until(self, t_emu: float, max_real: float = 0.05) -> bool:
        """Wait until emulated time t_emu, at most max_real real seconds (so callers stay
        responsive to stop requests and scale changes). True when t_emu has been reached."""
        wait = self.real_wait(t_emu)
        if wait <= 0:
            return True
        if wait > SPIN_S:
            time.sleep(min(wait - SPIN_S, max_real))
            return self.real_wait(t_emu) <= 0
        while self.real_wait(t_emu) > 0:
            pass
        return True

    def _write(self, real_base: float, emu_base: float, scale: float) -> None:
        seq = self._v[3]
        self._v[3] = seq + 1  # odd: a write is in progress
        self._v[0], self._v[1], self._v[2] = real_base, emu_base, scale
        self._v[3] = seq + 2

    def _read(self) -> tuple[float, float, float]:
        while True:
            v = self._v
            seq = v[3]
            real_base, emu_base, scale = v[0], v[1], v[2]
            if seq % 2 == 0 and v[3] == seq:
                return real_base, emu_base, scale
