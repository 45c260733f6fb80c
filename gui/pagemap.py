"""Guest RAM as a picture: host pages laid out on a grid, coloured by display state.

The grid does not hold display codes but page keys, (destination state << 2) | source state:
two byte-wide numpy passes over the published arrays, and the image's 256-entry lookup table
turns each key into the colour of its display code. The key -> code table is computed once
with the engine's own emu.migration.ram.display_states, so the engine stays the one definition.

Plain numpy, no Qt: the bitmap widget draws what this module computes.
"""

from __future__ import annotations

import math

import numpy as np

from emu.migration import ram as R

SRC_BITS = 2  # source states UNSENT .. SENT_PREEMPT fit in two bits
NDST = len(R.DEST_STATE_NAMES)
OUTSIDE = len(R.DISPLAY_NAMES)  # display code of grid cells past the end of guest RAM
OUTSIDE_KEY = 255
REQUESTED_KEY = R.REQUESTED << SRC_BITS | R.UNSENT

# What each display code means to someone who has never read QEMU's source: the legend text.
LEGEND = {
    R.MISSING: "not here yet",
    R.DISCARDED: "discarded (re-dirtied)",
    R.REQUESTED: "requested, not sent yet",
    R.PRECOPY: "arrived in precopy",
    R.BACKGROUND: "arrived in background",
    R.URGENT_MAIN: "asked for, came on main",
    R.URGENT_PREEMPT: "asked for, came on preempt",
    R.INFLIGHT_MAIN: "in flight on main",
    R.INFLIGHT_PREEMPT: "in flight on preempt",
}
# With postcopy-preempt every page the source sends urgently goes on preempt: a page a vCPU
# asked for that still came on main was already in the background stream (the source dropped
# the request, "dropped-requests"), so the legend says so instead of "on main".
LEGEND_PREEMPT = {**LEGEND, R.URGENT_MAIN: "asked for, came in the background"}


def legend(preempt: bool) -> dict[int, str]:
    """The legend's words for a run with or without postcopy-preempt."""
    return LEGEND_PREEMPT if preempt else LEGEND
# Legend order: the story of a page, from absent to delivered on demand.
LEGEND_ORDER = (R.MISSING, R.DISCARDED, R.REQUESTED, R.INFLIGHT_MAIN, R.INFLIGHT_PREEMPT,
                R.PRECOPY, R.BACKGROUND, R.URGENT_MAIN, R.URGENT_PREEMPT)

# Colours that separate the roles at a glance, for every student: greys for "not here",
# muted lavenders for the bulk streams, and for what a vCPU waited for the blue-orange pair
# of Okabe and Ito's colour-blind-safe palette (orange: on demand via main, blue: via
# preempt), crimson for what it waits for now. Orange against green, the old pair, is one
# colour to a protanope; tools/colourblind.py shows a screenshot as one sees it, and
# tests/gui/test_palette.py keeps every pair apart under both red-green deficiencies.
COLOURS = {
    R.MISSING: (238, 238, 238),
    R.DISCARDED: (150, 150, 150),
    R.REQUESTED: (204, 0, 60),
    R.PRECOPY: (200, 195, 230),
    R.BACKGROUND: (150, 140, 190),
    R.URGENT_MAIN: (230, 159, 0),
    R.URGENT_PREEMPT: (0, 90, 181),
    R.INFLIGHT_MAIN: (245, 215, 110),
    R.INFLIGHT_PREEMPT: (120, 200, 255),
    OUTSIDE: (255, 255, 255),
}


def _key_codes() -> np.ndarray:
    """Display code of every page key (unused keys show as outside)."""
    dst = np.repeat(np.arange(NDST, dtype=np.uint8), 1 << SRC_BITS)
    src = np.tile(np.arange(1 << SRC_BITS, dtype=np.uint8), NDST)
    codes = np.full(256, OUTSIDE, np.uint8)
    codes[dst << SRC_BITS | src] = R.display_states(dst, src)
    return codes


KEY_CODES = _key_codes()


# When one screen pixel covers several pages, it shows the most telling of their states: what
# a vCPU waits for, then what came on demand, what is in flight, what was thrown away. At a
# million pages the urgent ones would otherwise vanish between the background pages.
PRIORITY = (OUTSIDE, R.MISSING, R.PRECOPY, R.BACKGROUND, R.DISCARDED, R.INFLIGHT_MAIN,
            R.INFLIGHT_PREEMPT, R.URGENT_MAIN, R.URGENT_PREEMPT, R.REQUESTED)


def _ranks() -> tuple[np.ndarray, np.ndarray]:
    """key -> rank in PRIORITY, and rank -> a key showing that state."""
    rank_of_code = np.zeros(OUTSIDE + 1, np.uint8)
    rank_of_code[list(PRIORITY)] = np.arange(len(PRIORITY))
    key_rank = rank_of_code[KEY_CODES]
    rank_key = np.array([np.flatnonzero(KEY_CODES == code)[0] for code in PRIORITY], np.uint8)
    return key_rank, rank_key


KEY_RANK, RANK_KEY = _ranks()


def pool(keys: np.ndarray, factor: int) -> np.ndarray:
    """Shrink a grid of page keys by *factor* (a power of two) in each direction, each cell
    keeping the most telling key of the block it covers (never an average: that would be a
    colour no state has)."""
    ranks = np.take(KEY_RANK, keys)
    while factor > 1:
        if len(ranks) % 2:  # an odd last row: pad with "outside", the lowest rank
            ranks = np.vstack([ranks, np.zeros((1, ranks.shape[1]), np.uint8)])
        ranks = np.maximum(np.maximum(ranks[0::2, 0::2], ranks[0::2, 1::2]),
                           np.maximum(ranks[1::2, 0::2], ranks[1::2, 1::2]))
        factor //= 2
    return np.take(RANK_KEY, ranks)


def pool_factor(rows: int, cols: int, width_px: float, height_px: float) -> int:
    """The largest power of two that still leaves at least one cell per screen pixel."""
    fit = min(cols / max(width_px, 1), rows / max(height_px, 1))
    return 1 << max(0, math.floor(math.log2(fit))) if fit >= 2 else 1


def lookup_table() -> np.ndarray:
    """The fixed 256-entry RGB table: page key -> colour of its display code."""
    palette = np.zeros((256, 3), np.uint8)
    for code, rgb in COLOURS.items():
        palette[code] = rgb
    return palette[KEY_CODES]


def grid_shape(npages: int) -> tuple[int, int]:
    """(rows, columns) for npages cells: a power-of-two row length, so every row starts at
    a round page number, and a grid at most twice as wide as it is tall."""
    cols = 1 << math.ceil(math.log2(max(npages, 1)) / 2)
    return math.ceil(npages / cols), cols


def page_keys(dst: np.ndarray, src: np.ndarray, out: np.ndarray,
              queued: np.ndarray | None = None) -> np.ndarray:
    """Write every page's key into *out*. A page still in the source's request queue
    (*queued*: page numbers) shows as requested: the source has not sent it, whatever a stale
    source state says."""
    np.left_shift(dst, SRC_BITS, out=out)
    np.bitwise_or(out, src, out=out)
    if queued is not None and len(queued):
        out[queued[dst[queued] == R.REQUESTED]] = REQUESTED_KEY
    return out


def counts(keys: np.ndarray) -> np.ndarray:
    """Pages per display code, from page keys."""
    per_key = np.bincount(keys, minlength=256)
    return np.bincount(KEY_CODES, weights=per_key, minlength=OUTSIDE + 1).astype(np.int64)
