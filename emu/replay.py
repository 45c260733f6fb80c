"""The memory check when the source's memory lives in another program.

A standalone destination (`postcopy-emu destination`) cannot read the source's RAM, so it
recomputes what every page must hold: the workload is deterministic (emulator.seed), the guest
RAM starts as zeros with each target page's index stamped in its last 8 bytes, and each vCPU's
final position in its workload says exactly which touches happened, on the source before the
switchover and here after it. Replaying them gives the expected content of every byte of every
target page, which is checked in full. This needs the same guest and workload settings on both
sides, as two QEMUs need the same machine.
"""

from __future__ import annotations

import numpy as np

from emu.ram import PRESENT, TARGET_PAGE
from emu.workload import SLICED, Workload

CHUNK = 1 << 20  # touches replayed at once
PAGES = 8192  # target pages compared at once (32 MiB)


def expected_head(cfg, positions: list[int]) -> np.ndarray:
    """(target pages, k) uint8: the first k bytes of every page after each vCPU made
    positions[v] touches (k = 1 for sliced patterns, which write byte 0; else one byte per
    vCPU)."""
    n = cfg["guest.ram"] // TARGET_PAGE
    sliced = cfg["workload.pattern"] in SLICED
    head = np.zeros((n, 1 if sliced else len(positions)), np.uint8)
    for v, pos in enumerate(positions):
        workload = Workload(cfg, v)
        if sliced:
            # touch k goes to page lo + k % size, and each touch leaves the page holding the
            # number of touches it has had (ab counts them; sequential writes the pass number)
            full, rest = divmod(pos, workload.size)
            touches = full + (np.arange(workload.size) < rest)
            head[workload.lo:workload.lo + workload.size, 0] = touches & 0xFF
        else:
            head[:, v] = _touch_counts(workload, pos, n) & 0xFF
    return head


def _touch_counts(workload: Workload, pos: int, n: int) -> np.ndarray:
    counts = np.zeros(n, np.int64)
    for start in range(0, pos, CHUNK):
        workload.pos = start
        counts += np.bincount(workload.peek(min(CHUNK, pos - start)), minlength=n)
    return counts


def check(cfg, dst_ram: np.ndarray, dst_states: np.ndarray, dst_report: dict) -> dict:
    """The destination's memory against the replayed workload; the same shape of result as
    report.check_memory."""
    missing = np.flatnonzero(dst_states < PRESENT)
    if not cfg["emulator.payload"]:
        return {"ok": not len(missing), "bad-pages": len(missing),
                "first-bad": missing[:20].tolist(), "checked": "page states only (no payload)"}
    head = expected_head(cfg, dst_report["positions"])
    pages = dst_ram.reshape(-1, TARGET_PAGE)
    bad = np.unique(np.concatenate(
        [_differing(pages[first:first + PAGES], head[first:first + PAGES], first)
         for first in range(0, len(pages), PAGES)]))
    touches = dst_report["bad-touches"]
    return {"ok": not len(bad) and not touches, "bad-pages": len(bad),
            "first-bad": bad[:20].tolist(), "bad-touches": touches,
            "checked": f"{len(pages)} target pages, every byte, against the workload replayed "
                       "to each vCPU's final position"}


def _differing(pages: np.ndarray, head: np.ndarray, first: int) -> np.ndarray:
    """Indices of the pages in this chunk that differ from what they must hold."""
    expected = np.zeros_like(pages)
    expected[:, :head.shape[1]] = head
    expected.view(np.uint64)[:, -1] = np.arange(first, first + len(pages), dtype=np.uint64)
    return np.flatnonzero((pages != expected).any(axis=1)) + first
