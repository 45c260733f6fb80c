"""The memory check after migration: does the destination's guest RAM match the source's?

Guest RAM is a flat uint8 array of 4096-byte target pages. The workload's vCPUs write only the
first bytes of each page; every other byte (including the page's own index plus one, stamped in
its last 8 bytes at setup) must arrive unchanged. The pages past guest.populated are not
stamped: they are zero until a vCPU writes them, the source sends them as zero pages, and zero is
what they must hold on the destination.

When the source's memory lives in another program (check_replayed): a standalone destination
(`postcopy-emu destination`) cannot read the source's RAM, so it recomputes what every page must
hold: the workload is deterministic (emulator.seed), the guest RAM starts as zeros with each
populated target page's index plus one stamped in its last 8 bytes, and each vCPU's final
position in its workload says exactly which touches happened, on the source before the
switchover and here after it. Replaying them gives the expected content of every byte of every
target page, which is checked in full. This needs the same guest and workload settings on both
sides, as two QEMUs need the same machine.
"""

from __future__ import annotations

import numpy as np

from emu.config import Config
from emu.migration.ram import PRESENT, TARGET_PAGE, populated_pages, stamps
from emu.migration.workload import SLICED, Workload

# Pages per comparison chunk in check_rest: 32 MiB of RAM, small temporaries.
_CHUNK_PAGES = 8192
_WORD = np.dtype(np.uint64)


def _best_split(values: np.ndarray, high: int) -> tuple[int, int]:
    """Best loop-stop point for pages holding `high` before it and `high - 1` from it on.

    Returns (pages that fit, split index); the earliest split wins ties, as in a walk.
    """
    low = (high - 1) % 256
    is_high = np.concatenate(([0], np.cumsum(values == high)))
    is_low = np.concatenate(([0], np.cumsum(values == low)))
    # Pages that fit with split k: high pages in [0, k) plus low pages in [k, n).
    fit = is_high + (is_low[-1] - is_low)
    split = int(np.argmax(fit))
    return int(fit[split]), split


def _best_pattern(values: np.ndarray) -> tuple[int, int]:
    """(high, split) of the valid pattern that keeps the most pages."""
    counts = np.bincount(values, minlength=256)
    # Upper bound for a candidate `high`: every page holding high or high - 1 fits.
    bound = counts + np.roll(counts, 1)
    best_fit, best = -1, (0, 0)
    for high in np.argsort(-bound, kind="stable"):
        if bound[high] <= best_fit:
            break  # candidates are in decreasing bound order: none can do better
        fit, split = _best_split(values, int(high))
        if fit > best_fit:
            best_fit, best = fit, (int(high), split)
    return best


def check_step(first_bytes: np.ndarray) -> np.ndarray:
    """Pages breaking QEMU's check_guests_ram rule (tests/qtest/migration).

    Walking pages in order, every page holds the same value as the previous one except for at
    most one step down by exactly 1 (mod 256), where the guest's loop stopped. A valid run is
    therefore `high` on pages [0, split) and `high - 1` on [split, n). Returns the indices of the
    fewest pages whose removal leaves such a run, so a corrupted page is named itself rather
    than through its neighbours (QEMU compares each page with the previous one and also flags
    the page after a corrupted one).
    """
    values = np.asarray(first_bytes, dtype=np.uint8)
    if values.size == 0:
        return np.empty(0, dtype=np.intp)
    high, split = _best_pattern(values)
    bad = np.empty(values.size, dtype=bool)
    np.not_equal(values[:split], high, out=bad[:split])
    np.not_equal(values[split:], (high - 1) % 256, out=bad[split:])
    return np.flatnonzero(bad)


def check_increments(dst: np.ndarray, src: np.ndarray, increments: np.ndarray) -> np.ndarray:
    """Indices where dst != (src + increments) mod 256 (increments may be any integer dtype)."""
    expected = np.add(src, increments, dtype=np.uint8, casting="unsafe")
    return np.flatnonzero(dst != expected)


def _differing_pages(dst: np.ndarray, src: np.ndarray, skip: int) -> np.ndarray:
    """Rows (pages) of two (pages, TARGET_PAGE) uint8 chunks that differ past byte skip."""
    # Bytes up to the next 8-byte boundary one by one, the rest as uint64 words (8x fewer
    # elements to compare).
    word0 = -(-skip // _WORD.itemsize)
    head = dst[:, skip : word0 * _WORD.itemsize] != src[:, skip : word0 * _WORD.itemsize]
    words = dst.view(_WORD)[:, word0:] != src.view(_WORD)[:, word0:]
    return np.flatnonzero(head.any(axis=1) | words.any(axis=1))


def check_rest(dst_ram: np.ndarray, src_ram: np.ndarray, skip: int) -> np.ndarray:
    """Target pages whose bytes [skip, TARGET_PAGE) differ between the two RAMs.

    Works chunk by chunk: temporaries stay a fraction of one chunk whatever the RAM size.
    """
    if dst_ram.shape != src_ram.shape or dst_ram.size % TARGET_PAGE:
        raise ValueError("RAMs must have the same size, a multiple of the target page size")
    if not 0 <= skip <= TARGET_PAGE:
        raise ValueError(f"skip must be in [0, {TARGET_PAGE}]")
    npages = dst_ram.size // TARGET_PAGE
    bad = []
    for first in range(0, npages, _CHUNK_PAGES):
        span = slice(first * TARGET_PAGE, (first + _CHUNK_PAGES) * TARGET_PAGE)
        dst = dst_ram[span].reshape(-1, TARGET_PAGE)
        src = src_ram[span].reshape(-1, TARGET_PAGE)
        bad.append(_differing_pages(dst, src, skip) + first)
    return np.concatenate(bad) if bad else np.empty(0, dtype=np.intp)


# ---- the source's memory in another program: replay the workload ----

_REPLAY_TOUCHES = 1 << 20  # touches replayed at once


def expected_head(cfg: Config, positions: list[int]) -> np.ndarray:
    """(target pages, k) uint8: the first k bytes of every page after each vCPU made
    positions[v] touches (k = 1 for sliced patterns, which write byte 0; else one byte per
    vCPU)."""
    n = cfg["guest.ram"] // TARGET_PAGE
    sliced = cfg["workload.pattern"] in SLICED
    head = np.zeros((n, 1 if sliced else len(positions)), np.uint8)
    for v, pos in enumerate(positions):
        workload = Workload(cfg, v)
        if sliced:
            # touch k goes to the slice's page k % size, and each touch leaves the page holding
            # the number of touches it has had (ab counts them; sequential writes the pass
            # number)
            full, rest = divmod(pos, workload.size)
            touches = full + (np.arange(workload.size) < rest)
            head[workload.slice_pages(), 0] = touches & 0xFF
        else:
            head[:, v] = _touch_counts(workload, pos, n) & 0xFF
    return head


def _touch_counts(workload: Workload, pos: int, n: int) -> np.ndarray:
    counts = np.zeros(n, np.int64)
    for start in range(0, pos, _REPLAY_TOUCHES):
        workload.pos = start
        counts += np.bincount(workload.peek(min(_REPLAY_TOUCHES, pos - start)), minlength=n)
    return counts


def check_replayed(cfg: Config, dst_ram: np.ndarray, dst_states: np.ndarray,
                   dst_report: dict) -> dict:
    """The destination's memory against the replayed workload; the same shape of result as
    report.check_memory."""
    missing = np.flatnonzero(dst_states < PRESENT)
    if not cfg["emulator.payload"]:
        return {"ok": not len(missing), "bad-pages": len(missing),
                "first-bad": missing[:20].tolist(), "checked": "page states only (no payload)"}
    head = expected_head(cfg, dst_report["positions"])
    pages = dst_ram.reshape(-1, TARGET_PAGE)
    populated = populated_pages(len(pages), cfg["guest.populated"])
    bad = np.unique(np.concatenate(
        [_differing_from(pages[first:first + _CHUNK_PAGES], head[first:first + _CHUNK_PAGES],
                         first, populated)
         for first in range(0, len(pages), _CHUNK_PAGES)]))
    touches = dst_report["bad-touches"]
    return {"ok": not len(bad) and not touches, "bad-pages": len(bad),
            "first-bad": bad[:20].tolist(), "bad-touches": touches,
            "checked": f"{len(pages)} target pages, every byte, against the workload replayed "
                       "to each vCPU's final position"}


def _differing_from(pages: np.ndarray, head: np.ndarray, first: int,
                    populated: int) -> np.ndarray:
    """Indices of the pages in this chunk that differ from what they must hold; the first
    `populated` pages of RAM are stamped, the others zero but for what the vCPUs wrote."""
    expected = np.zeros_like(pages)
    expected[:, :head.shape[1]] = head
    stamped = max(0, min(len(pages), populated - first))
    expected.view(np.uint64)[:stamped, -1] = stamps(first, stamped)
    return np.flatnonzero((pages != expected).any(axis=1)) + first
