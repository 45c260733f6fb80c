"""The memory check after migration: does the destination's guest RAM match the source's?

Guest RAM is a flat uint8 array of 4096-byte target pages. The workload's vCPUs write only the
first bytes of each page; every other byte (including the page's own index, stamped in its last
8 bytes at setup) must arrive unchanged.
"""

import numpy as np

TARGET_PAGE_SIZE = 4096
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
    """Rows (pages) of two (pages, TARGET_PAGE_SIZE) uint8 chunks that differ past byte skip."""
    # Bytes up to the next 8-byte boundary one by one, the rest as uint64 words (8x fewer
    # elements to compare).
    word0 = -(-skip // _WORD.itemsize)
    head = dst[:, skip : word0 * _WORD.itemsize] != src[:, skip : word0 * _WORD.itemsize]
    words = dst.view(_WORD)[:, word0:] != src.view(_WORD)[:, word0:]
    return np.flatnonzero(head.any(axis=1) | words.any(axis=1))


def check_rest(dst_ram: np.ndarray, src_ram: np.ndarray, skip: int) -> np.ndarray:
    """Target pages whose bytes [skip, TARGET_PAGE_SIZE) differ between the two RAMs.

    Works chunk by chunk: temporaries stay a fraction of one chunk whatever the RAM size.
    """
    if dst_ram.shape != src_ram.shape or dst_ram.size % TARGET_PAGE_SIZE:
        raise ValueError("RAMs must have the same size, a multiple of the target page size")
    if not 0 <= skip <= TARGET_PAGE_SIZE:
        raise ValueError(f"skip must be in [0, {TARGET_PAGE_SIZE}]")
    npages = dst_ram.size // TARGET_PAGE_SIZE
    bad = []
    for first in range(0, npages, _CHUNK_PAGES):
        span = slice(first * TARGET_PAGE_SIZE, (first + _CHUNK_PAGES) * TARGET_PAGE_SIZE)
        dst = dst_ram[span].reshape(-1, TARGET_PAGE_SIZE)
        src = src_ram[span].reshape(-1, TARGET_PAGE_SIZE)
        bad.append(_differing_pages(dst, src, skip) + first)
    return np.concatenate(bad) if bad else np.empty(0, dtype=np.intp)

