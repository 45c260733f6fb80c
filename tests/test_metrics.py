import multiprocessing
from multiprocessing import shared_memory

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from emu.figures.metrics import (
    CHANNELS,
    FAULT_DTYPE,
    FaultRing,
    blocktime,
    histogram_text,
    latency_dist,
    summarize,
)


def _records(rows: list[tuple]) -> np.ndarray:
    return np.array(rows, dtype=FAULT_DTYPE)


# --- latency_dist / summarize -------------------------------------------------------------


def test_latency_dist_bucket_edges():
    us = 1e-6
    lat = np.array([0.0, 0.3 * us, 1 * us, 1.99 * us, 2 * us, 3.99 * us, 4 * us, 1024 * us])
    assert latency_dist(lat) == [4, 2, 1] + [0] * 7 + [1]


def test_latency_dist_empty():
    assert latency_dist(np.array([])) == []


@given(st.lists(st.integers(0, 10**10), max_size=50))
def test_latency_dist_matches_integer_log2(latency_ns):
    dist = latency_dist(np.array(latency_ns, dtype=np.float64) * 1e-9)
    expected = [max((ns // 1000).bit_length() - 1, 0) for ns in latency_ns]
    assert dist == (np.bincount(expected).tolist() if expected else [])
    assert not dist or dist[-1] > 0


def test_summarize():
    s = summarize(np.array([1e-6, 2e-6, 3e-6, 100e-6]))
    assert s == {
        "count": 4,
        "avg-us": 26.5,
        "p50-us": 2.5,
        "p99-us": pytest.approx(97.1),
        "max-us": 100.0,
        "dist": [1, 2, 0, 0, 0, 0, 1],
    }


def test_summarize_empty():
    assert summarize(np.array([])) == {
        "count": 0,
        "avg-us": 0.0,
        "p50-us": 0.0,
        "p99-us": 0.0,
        "max-us": 0.0,
        "dist": [],
    }


# --- blocktime ----------------------------------------------------------------------------


def test_blocktime_example():
    recs = _records(
        [
            (0.0, 0, 1, 1.0, 0),  # vCPU 0: [0, 1) and [0.5, 1.5) overlap -> 1.5 s
            (0.5, 0, 2, 1.0, 1),
            (3.0, 0, 3, 1.0, 0),  # vCPU 0: [3, 4) -> 2.5 s in all
            (1.0, 1, 4, 1.0, 0),  # vCPU 1: [1, 2) and [2.2, 4.2) -> 3 s
            (2.2, 1, 5, 2.0, 0),
        ]
    )
    total, per_vcpu = blocktime(recs, 2)
    # Both blocked: [1, 1.5) and [3, 4) -> 1.5 s.
    assert total == pytest.approx(1500.0)
    assert per_vcpu == pytest.approx([2500.0, 3000.0])


def test_blocktime_idle_vcpu_means_no_overall_blocktime():
    recs = _records([(0.0, 0, 1, 1.0, 0), (0.0, 1, 2, 1.0, 0)])
    total, per_vcpu = blocktime(recs, 3)
    assert total == 0.0
    assert per_vcpu == [1000.0, 1000.0, 0.0]


def test_blocktime_empty():
    assert blocktime(_records([]), 2) == (0.0, [0.0, 0.0])


def test_blocktime_rejects_unknown_vcpu():
    with pytest.raises(ValueError):
        blocktime(_records([(0.0, 2, 1, 1.0, 0)]), 2)


@given(st.lists(st.floats(0.0, 10.0), max_size=30), st.floats(0.0, 5.0))
def test_blocktime_one_vcpu_disjoint_is_sum_of_latencies(latencies, gap):
    starts = np.concatenate(([0.0], np.cumsum(np.array(latencies) + gap)))[:-1]
    recs = _records(
        [(t, 0, i, lat, 0) for i, (t, lat) in enumerate(zip(starts, latencies, strict=True))]
    )
    total, per_vcpu = blocktime(recs, 1)
    assert per_vcpu[0] == pytest.approx(sum(latencies) * 1e3)
    assert total == pytest.approx(per_vcpu[0])


_interval = st.tuples(st.integers(0, 2), st.integers(0, 40), st.integers(0, 20))


@given(st.lists(_interval, max_size=25), st.integers(1, 3))
def test_blocktime_matches_timeline(intervals, nvcpus):
    # Integer-second intervals on a 1 s grid: a boolean timeline per vCPU is an exact reference.
    intervals = [(v % nvcpus, t, lat) for v, t, lat in intervals]
    timeline = np.zeros((nvcpus, 60), dtype=bool)
    for v, t, lat in intervals:
        timeline[v, t : t + lat] = True
    recs = _records([(t, v, i, lat, 1) for i, (v, t, lat) in enumerate(intervals)])
    total, per_vcpu = blocktime(recs, nvcpus)
    assert per_vcpu == pytest.approx((timeline.sum(axis=1) * 1e3).tolist())
    assert total == pytest.approx(timeline.all(axis=0).sum() * 1e3)


# --- histogram_text -----------------------------------------------------------------------


def test_histogram_text_layout():
    dist = [0] * 6 + [48, 12, 0, 3]
    lines = histogram_text(dist).splitlines()
    assert lines == [
        "[64us, 128us)        48 |" + "@" * 40 + "|",
        "[128us, 256us)       12 |" + "@" * 10 + " " * 30 + "|",
        "[256us, 512us)        0 |" + " " * 40 + "|",
        "[512us, 1ms)          3 |" + "@" * 2 + " " * 38 + "|",
    ]


def test_histogram_text_units():
    dist = [1] + [0] * 12 + [1] + [0] * 6 + [2]
    lines = histogram_text(dist, width=4).splitlines()
    assert lines[0].startswith("[0us, 2us) ")
    assert lines[13].startswith("[8ms, 16ms) ")
    assert lines[20] == "[1s, 2s)              2 |@@@@|"
    assert len(lines) == 21


def test_histogram_text_empty():
    assert histogram_text([]) == ""
    assert histogram_text([0, 0]) == ""


# --- FaultRing ----------------------------------------------------------------------------


def _rec(i: int) -> tuple:
    # Every field derives from the record number, so a torn record can not look whole.
    return (i * 0.5, i % 7, i, i * 1e-6, i % len(CHANNELS))


def _assert_records(recs: np.ndarray, first: int) -> None:
    idx = np.arange(first, first + recs.size)
    assert recs["page"].tolist() == idx.tolist()
    assert np.array_equal(recs["time"], idx * 0.5)
    assert np.array_equal(recs["vcpu"], idx % 7)
    assert np.array_equal(recs["latency"], idx * 1e-6)
    assert np.array_equal(recs["channel"], idx % len(CHANNELS))


def _new_ring(capacity: int) -> FaultRing:
    return FaultRing(memoryview(bytearray(FaultRing.nbytes(capacity))), capacity)


def test_ring_read_returns_copies():
    ring = _new_ring(4)
    ring.append(_rec(0))
    recs, count = ring.read_since(0)
    recs["page"] = 99
    assert count == 1
    _assert_records(ring.read_since(0)[0], 0)


_ring_ops = st.lists(st.tuples(st.integers(0, 12), st.integers(-3, 3)), max_size=20)


@given(st.integers(1, 8), _ring_ops)
def test_ring_matches_model(capacity, ops):
    ring = _new_ring(capacity)
    written = 0
    for appends, lag in ops:
        for _ in range(appends):
            ring.append(_rec(written))
            written += 1
        seen = max(written - capacity + lag, 0)  # readers ahead, at and behind the window
        recs, count = ring.read_since(seen)
        assert count == written == ring.count
        first = max(seen, written - capacity)
        assert recs.size == max(written - first, 0)
        _assert_records(recs, first)


def _writer(name: str, capacity: int, total: int) -> None:
    shm = shared_memory.SharedMemory(name=name)
    ring = FaultRing(shm.buf, capacity)
    for i in range(total):
        ring.append(_rec(i))
    del ring  # drop the views before closing the mapping
    shm.close()


def _read_concurrently(capacity: int, total: int) -> list[tuple[int, np.ndarray, int]]:
    shm = shared_memory.SharedMemory(create=True, size=FaultRing.nbytes(capacity))
    try:
        ring = FaultRing(shm.buf, capacity)
        proc = multiprocessing.get_context("fork").Process(
            target=_writer, args=(shm.name, capacity, total)
        )
        proc.start()
        reads, seen = [], 0
        while seen < total:
            recs, count = ring.read_since(seen)
            reads.append((seen, recs, count))
            seen = count
        proc.join(timeout=60)
        assert proc.exitcode == 0
        del ring
    finally:
        shm.close()
        shm.unlink()
    return reads


def test_ring_concurrent_reader_sees_no_torn_records():
    # A tiny ring makes the writer lap the reader, also during its copies.
    for _seen, recs, count in _read_concurrently(capacity=4, total=100_000):
        assert recs.size <= 4
        _assert_records(recs, count - recs.size)


def test_ring_concurrent_reader_misses_nothing_when_not_lapped():
    total = 50_000
    reads = _read_concurrently(capacity=total, total=total)
    for seen, recs, count in reads:
        _assert_records(recs, seen)
        assert recs.size == count - seen
    assert reads[-1][2] == total
