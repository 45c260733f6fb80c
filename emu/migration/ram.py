"""Guest RAM and the per-page states both sides publish.

Host pages (guest.page-size) are the unit of faults, requests and placement; target pages
(4 KiB) are the unit the workload touches and the wire carries. Each side owns one state array
(one byte per host page) and is its only writer, so no cross-process locking is needed; the
window combines the two (see display_states).
"""

from __future__ import annotations

import numpy as np

TARGET_PAGE = 4096

# Destination states: what happened to a host page on the destination.
MISSING = 0  # not received yet
DISCARDED = 1  # received in precopy, dropped at switchover because the source re-dirtied it
REQUESTED = 2  # a vCPU faulted on it and the fault thread asked the source for it
PRESENT = 3  # from here on, the page is in guest RAM
PRECOPY = 3  # received during precopy
BACKGROUND = 4  # placed in postcopy from the background stream, nobody waited for it
URGENT_MAIN = 5  # placed after a request, delivered on the main channel
URGENT_PREEMPT = 6  # placed after a request, delivered on the preempt channel

DEST_STATE_NAMES = ("missing", "discarded", "requested", "precopy", "background",
                    "urgent-main", "urgent-preempt")

# Source states: the channel a host page was last sent on.
UNSENT = 0
SENT_MAIN = 1  # background or precopy stream
SENT_URGENT_MAIN = 2  # an urgent page queued behind the background stream (vanilla)
SENT_PREEMPT = 3  # an urgent page on the preempt channel

# Display codes: destination states, plus "in flight" where the source has sent a page the
# destination has not placed yet.
INFLIGHT_MAIN = 7
INFLIGHT_PREEMPT = 8
DISPLAY_NAMES = DEST_STATE_NAMES + ("in flight on main", "in flight on preempt")


def display_states(dest: np.ndarray, src: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    if out is None:
        out = dest.copy()
    else:
        np.copyto(out, dest)
    pending = dest < PRESENT
    out[pending & ((src == SENT_MAIN) | (src == SENT_URGENT_MAIN))] = INFLIGHT_MAIN
    out[pending & (src == SENT_PREEMPT)] = INFLIGHT_PREEMPT
    return out


def populated_pages(ntarget: int, populated: float) -> int:
    """How many target pages, from page 0, hold data at setup (guest.populated)."""
    return round(ntarget * populated)


def stamps(first: int, count: int) -> np.ndarray:
    """The last 8 bytes of populated target pages [first, first + count): the page's own index
    plus one, never 0, so that a populated page is never a zero page."""
    return np.arange(first + 1, first + count + 1, dtype=np.uint64)


def stamp(ram: np.ndarray, populated: float = 1.0) -> None:
    """Stamp each populated target page (stamps()), so that a page landing at the wrong place,
    or not at all, shows in the memory check. The pages past guest.populated stay zero, as
    memory the guest never wrote."""
    pages = ram.view(np.uint64).reshape(-1, TARGET_PAGE // 8)
    n = populated_pages(pages.shape[0], populated)
    pages[:n, -1] = stamps(0, n)
