"""Guest RAM as a picture: host pages laid out on a grid, and what one page went through.

Plain numpy, no Qt: the bitmap widget draws what these functions compute.
"""

from __future__ import annotations

import math

import numpy as np

from emu import ram as R

# Grid cells past the end of guest RAM (the last row is rarely full).
OUTSIDE = len(R.DISPLAY_NAMES)

# What each display code means to someone who has never read QEMU's source: the legend text.
LEGEND = {
    R.MISSING: "not here yet",
    R.DISCARDED: "discarded at switchover (re-dirtied)",
    R.REQUESTED: "requested: a vCPU is waiting",
    R.PRECOPY: "arrived in precopy",
    R.BACKGROUND: "arrived in background (postcopy)",
    R.URGENT_MAIN: "on demand, via main channel",
    R.URGENT_PREEMPT: "on demand, via preempt channel",
    R.INFLIGHT_MAIN: "in flight on main channel",
    R.INFLIGHT_PREEMPT: "in flight on preempt channel",
}
# Legend order: the story of a page, from absent to delivered on demand.
LEGEND_ORDER = (R.MISSING, R.DISCARDED, R.REQUESTED, R.INFLIGHT_MAIN, R.INFLIGHT_PREEMPT,
                R.PRECOPY, R.BACKGROUND, R.URGENT_MAIN, R.URGENT_PREEMPT)

# Colours that separate the roles at a glance: greys for "not here", blues for the bulk
# streams, warm colours for what a vCPU waited for, red for what it waits for now.
COLOURS = {
    R.MISSING: (222, 222, 222),
    R.DISCARDED: (120, 120, 120),
    R.REQUESTED: (220, 20, 60),
    R.PRECOPY: (166, 199, 232),
    R.BACKGROUND: (52, 110, 190),
    R.URGENT_MAIN: (255, 140, 0),
    R.URGENT_PREEMPT: (20, 160, 60),
    R.INFLIGHT_MAIN: (250, 215, 70),
    R.INFLIGHT_PREEMPT: (150, 225, 140),
    OUTSIDE: (255, 255, 255),
}


def lookup_table() -> np.ndarray:
    """The fixed 256-entry RGB table: display code -> colour (unused codes are black)."""
    lut = np.zeros((256, 3), np.uint8)
    for code, rgb in COLOURS.items():
        lut[code] = rgb
    return lut


def grid_shape(npages: int) -> tuple[int, int]:
    """(rows, columns) for npages cells: a power-of-two row length, so every row starts at
    a round page number, and a grid at most twice as wide as it is tall."""
    cols = 1 << math.ceil(math.log2(max(npages, 1)) / 2)
    return math.ceil(npages / cols), cols


def display_codes(dst: np.ndarray, src: np.ndarray, out: np.ndarray,
                  queued: np.ndarray | None = None) -> np.ndarray:
    """emu.ram.display_states, except that a discarded page stays "discarded" and a page in
    the source's request queue (*queued*, page numbers) stays "requested".

    The source leaves a page's src state at "sent on main" (from precopy) when the page is
    discarded at switchover, so display_states shows every discarded page, and every request
    for one, in flight. Until the source resets those states, a discarded page that really is
    in flight again shows as discarded for the few ms it spends on the link: far less wrong
    than the reverse.
    """
    R.display_states(dst, src, out)
    out[dst == R.DISCARDED] = R.DISCARDED
    if queued is not None and len(queued):
        waiting = queued[dst[queued] == R.REQUESTED]
        out[waiting] = R.REQUESTED
    return out


def channel_name(code: int) -> str:
    return "preempt" if code == R.URGENT_PREEMPT else "main"
