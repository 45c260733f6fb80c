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


def bucket_label(n: int) -> str:
    """Lower edge of bucket n: 2^n us, written 1us .. 512us, 1ms .. 512ms, 1s .."""
    for unit, shift in (("s", 20), ("ms", 10)):
        if n >= shift:
            return f"{1 << (n - shift)}{unit}"
    return f"{1 << n}us"
