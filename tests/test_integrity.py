import tracemalloc

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from emu.figures import integrity
from emu.figures.integrity import (
    check_increments,
    check_rest,
    check_step,
)
from emu.migration.ram import TARGET_PAGE


def _qemu_bad_count(values: list[int]) -> int:
    """Literal port of QEMU's check_guests_ram loop: the number of inconsistencies it reports."""
    bad, hit_edge = 0, False
    last = values[0] if values else 0
    for b in values[1:]:
        if b != last:
            if (b + 1) % 256 == last and not hit_edge:
                hit_edge = True
            else:
                bad += 1
        last = b
    return bad


def _run(high: int, n: int, split: int) -> np.ndarray:
    values = np.full(n, high, dtype=np.uint8)
    values[split:] = (high - 1) % 256
    return values


def _fewest_bad(values: list[int]) -> int:
    """Brute force: fewest pages that break the best `high`-then-`high - 1` run."""
    n = len(values)
    return min(
        sum(v != high for v in values[:k]) + sum(v != (high - 1) % 256 for v in values[k:])
        for high in range(256)
        for k in range(n + 1)
    )


# --- check_step ---------------------------------------------------------------------------

_runs = st.integers(0, 255).flatmap(
    lambda high: st.integers(0, 300).flatmap(
        lambda n: st.tuples(st.just(high), st.just(n), st.integers(0, n))
    )
)


@given(_runs)
def test_check_step_valid_run_is_clean(run):
    assert check_step(_run(*run)).size == 0


def test_check_step_wraps_mod_256():
    assert check_step(np.array([0, 0, 255, 255], dtype=np.uint8)).size == 0
    assert check_step(np.array([255, 0], dtype=np.uint8)).tolist() == [1]


def test_check_step_only_one_step_allowed():
    assert check_step(np.array([5, 5, 4, 4, 3, 3, 3], dtype=np.uint8)).tolist() == [0, 1]


def test_check_step_empty_and_single_page():
    assert check_step(np.array([], dtype=np.uint8)).size == 0
    assert check_step(np.array([17], dtype=np.uint8)).size == 0


@given(_runs, st.data())
def test_check_step_reports_single_corrupted_page(run, data):
    high, n, split = run
    assume(n >= 1)
    values = _run(high, n, split)
    page = data.draw(st.integers(0, n - 1))
    values[page] = data.draw(st.integers(0, 255).filter(lambda b: b != values[page]))
    bad = check_step(values).tolist()
    if _qemu_bad_count(values.tolist()) == 0:
        assert bad == []  # the corruption happens to form another valid run
    elif bad != [page]:
        # A value next to the run's can be ambiguous ([5, 4, 5]: page 1 or page 2), but only
        # between equally small explanations.
        assert len(bad) == 1
        assert _qemu_bad_count(np.delete(values, bad).tolist()) == 0


@given(_runs, st.data())
def test_check_step_names_page_corrupted_to_a_far_value(run, data):
    # A value not within 1 of high or high - 1 can only be explained by its own page (given two
    # other pages to compare with).
    high, n, split = run
    assume(n >= 3)
    values = _run(high, n, split)
    page = data.draw(st.integers(0, n - 1))
    near = {(high + d) % 256 for d in (-2, -1, 0, 1)}
    values[page] = data.draw(st.integers(0, 255).filter(lambda b: b not in near))
    assert check_step(values).tolist() == [page]


@given(st.lists(st.integers(0, 3), max_size=7))
def test_check_step_is_qemu_rule_and_minimal(small):
    # Values 0..3 and a wrap-around pair make every case of the rule likely.
    values = [(v - 1) % 256 for v in small]
    bad = check_step(np.array(values, dtype=np.uint8))
    assert (bad.size == 0) == (_qemu_bad_count(values) == 0)
    if values:
        assert bad.size == _fewest_bad(values)
        reported = set(bad.tolist())
        kept = [v for i, v in enumerate(values) if i not in reported]
        assert _qemu_bad_count(kept) == 0


def test_check_step_large_run_with_corruption():
    values = _run(7, 1 << 20, 1 << 18)
    values[[5, 500_000]] = [9, 200]
    assert check_step(values).tolist() == [5, 500_000]


# --- check_increments ---------------------------------------------------------------------


def test_check_increments_wraps():
    src = np.array([0, 250, 255, 3], dtype=np.uint8)
    inc = np.array([1, 10, 1, 0], dtype=np.uint8)
    dst = np.array([1, 4, 0, 4], dtype=np.uint8)
    assert check_increments(dst, src, inc).tolist() == [3]


@given(st.lists(st.tuples(st.integers(0, 255), st.integers(0, 1000), st.booleans()), max_size=40))
def test_check_increments_matches_python(rows):
    src = np.array([s for s, _, _ in rows], dtype=np.uint8)
    inc = np.array([i for _, i, _ in rows], dtype=np.int64)  # counters wider than a byte
    dst = np.array([(s + i + bad) % 256 for s, i, bad in rows], dtype=np.uint8)
    expected = [k for k, (_, _, bad) in enumerate(rows) if bad]
    assert check_increments(dst, src, inc).tolist() == expected


# --- check_rest ---------------------------------------------------------------------------


def _ram(npages: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, npages * TARGET_PAGE, np.uint8)


@pytest.mark.parametrize("skip", [0, 1, 5, 8, 64, 100, TARGET_PAGE])
def test_check_rest_ignores_only_skipped_bytes(skip):
    src = _ram(16)
    dst = src.copy()
    pages = dst.reshape(-1, TARGET_PAGE)
    pages[:, :skip] ^= 0xFF  # vCPU-written bytes may differ anywhere
    corrupt = {3: skip, 7: TARGET_PAGE - 1, 9: (skip + 7) | 7, 12: skip + 1}
    for page, offset in corrupt.items():
        if offset < TARGET_PAGE:
            pages[page, offset] ^= 1
    expected = sorted(p for p, off in corrupt.items() if skip <= off < TARGET_PAGE)
    assert check_rest(dst, src, skip).tolist() == expected


@given(st.sets(st.integers(0, 20 * TARGET_PAGE - 1), max_size=10), st.integers(0, 70))
def test_check_rest_across_chunks(offsets, skip):
    src = _ram(20, seed=1)
    dst = src.copy()
    for off in offsets:
        dst[off] ^= 0x80
    expected = sorted(
        {off // TARGET_PAGE for off in offsets if off % TARGET_PAGE >= skip}
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(integrity, "_CHUNK_PAGES", 3)  # chunk edges fall inside the test RAM
        assert check_rest(dst, src, skip).tolist() == expected


def test_check_rest_memory_stays_chunk_sized():
    src = _ram(1 << 15)  # 128 MiB
    dst = src.copy()
    dst[-1] ^= 1
    tracemalloc.start()
    try:
        bad = check_rest(dst, src, 1)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert bad.tolist() == [(1 << 15) - 1]
    assert peak < src.nbytes // 8


def test_check_rest_rejects_mismatched_rams():
    with pytest.raises(ValueError):
        check_rest(_ram(2), _ram(3), 1)
    with pytest.raises(ValueError):
        check_rest(np.zeros(100, np.uint8), np.zeros(100, np.uint8), 1)

