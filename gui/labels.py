"""What the window writes, without Qt: the time-scale slider's positions and the histogram's
bucket labels (tested without a window)."""

from __future__ import annotations

import math

SCALE_STEPS = 100  # slider steps per factor of ten
SCALE_MIN_LOG = -2  # 0.01 emulated s per real s
SCALE_MAX_LOG = 1  # 10
SLIDER_END = (SCALE_MAX_LOG - SCALE_MIN_LOG) * SCALE_STEPS  # its last position


def scale_to_slider(scale: float) -> int:
    return round((math.log10(scale) - SCALE_MIN_LOG) * SCALE_STEPS)


def slider_to_scale(position: int) -> float:
    return float(f"{10 ** (position / SCALE_STEPS + SCALE_MIN_LOG):.2g}")


def _edge(n: int, space: str = "") -> str:
    """2^n us to three significant figures in the unit that keeps it under 1000: 8192 us is
    "8.19ms" (exact to the figures shown, never rounded to a made-up 8 ms)."""
    us = 1 << n
    for unit, scale in (("s", 1e6), ("ms", 1e3)):
        if us >= scale:
            return f"{us / scale:.3g}{space}{unit}"
    return f"{us}{space}us"


def bucket_label(n: int) -> str:
    """Lower edge of bucket n = [2^n us, 2^(n+1) us): 1us .. 512us, 1.02ms .. 524ms, 1.05s .."""
    return _edge(n)


def bucket_interval(n: int) -> str:
    """The whole bucket n, for a tooltip: "[8.19 ms, 16.4 ms) = [2^13, 2^14) us"."""
    return f"[{_edge(n, ' ')}, {_edge(n + 1, ' ')}) = [2^{n}, 2^{n + 1}) us"
