"""Page-fault latency records and their summaries (QEMU's postcopy blocktime/latency counters).

A fault record is one vCPU blocked on one missing page; times are emulated seconds.
"""

import numpy as np

# Index = channel code of the channel that delivered the page.
CHANNELS = ("main", "preempt")

FAULT_DTYPE = np.dtype(
    [
        ("time", "f8"),  # emulated time the vCPU blocked (s)
        ("vcpu", "i4"),
        ("page", "i8"),  # host page index
        ("latency", "f8"),  # block -> wake, emulated seconds
        ("channel", "u1"),
    ]
)

_HEADER = np.dtype("<i8")
# Label column and count column widths of histogram_text (bpftrace layout).
_LABEL_WIDTH = 15
_COUNT_WIDTH = 8


def latency_dist(latency_s: np.ndarray) -> list[int]:
    """QEMU 10.1 postcopy-latency-dist: bucket N counts latencies in [2^N us, 2^(N+1) us).

    Everything below 2 us lands in bucket 0. The list ends at the highest non-empty bucket.
    """
    lat = np.asarray(latency_s, dtype=np.float64)
    if lat.size == 0:
        return []
    # Whole nanoseconds first: 4e-6 * 1e6 is not exactly 4.0, and a bucket edge must not
    # depend on float noise. Power-of-two us edges are integers, so flooring to whole us keeps
    # floor(log2(us)) unchanged.
    whole_us = np.rint(lat * 1e9).astype(np.int64) // 1000
    # frexp gives x = m * 2^e with m in [0.5, 1): floor(log2(x)) = e - 1, exact for integers.
    buckets = np.maximum(np.frexp(whole_us.astype(np.float64))[1] - 1, 0)
    return np.bincount(buckets).tolist()


def summarize(latency_s: np.ndarray) -> dict:
    """Count, average, median, p99 and max in us (rounded to 0.1 us) plus the log2 dist."""
    lat_us = np.asarray(latency_s, dtype=np.float64) * 1e6
    if lat_us.size == 0:
        return {"count": 0, "avg-us": 0.0, "p50-us": 0.0, "p99-us": 0.0, "max-us": 0.0, "dist": []}
    p50, p99 = np.percentile(lat_us, [50, 99])
    return {
        "count": int(lat_us.size),
        "avg-us": round(float(lat_us.mean()), 1),
        "p50-us": round(float(p50), 1),
        "p99-us": round(float(p99), 1),
        "max-us": round(float(lat_us.max()), 1),
        "dist": latency_dist(latency_s),
    }


def _vcpu_blocked_periods(records: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each vCPU's blocked periods: the union of its [time, time + latency) fault intervals.

    Returns (vcpu, start, end) of the disjoint periods, sorted by vCPU then time.
    """
    start = records["time"].astype(np.float64)
    vcpu = np.concatenate([records["vcpu"], records["vcpu"]])
    time = np.concatenate([start, start + records["latency"]])
    delta = np.concatenate([np.ones(start.size, np.int64), -np.ones(start.size, np.int64)])
    # Sweep by vCPU, then time, starts before ends at equal times so the depth never dips below
    # zero and touching intervals merge.
    order = np.lexsort((-delta, time, vcpu))
    time, vcpu, delta = time[order], vcpu[order], delta[order]
    # Each vCPU's deltas sum to zero, so one global cumsum restarts at 0 for every vCPU.
    depth = np.cumsum(delta)
    # Depth leaving 0 opens a period, reaching 0 closes it: edges alternate open, close.
    edges = np.flatnonzero((depth == delta) | (depth == 0))
    opens, closes = edges[0::2], edges[1::2]
    return vcpu[opens], time[opens], time[closes]


def blocktime(records: np.ndarray, nvcpus: int) -> tuple[float, list[float]]:
    """QEMU postcopy-blocktime and postcopy-vcpu-blocktime, in ms.

    Per vCPU: total time it was blocked (union of its [time, time + latency) intervals).
    Overall: total time during which all nvcpus vCPUs were blocked at once.
    """
    if records.size and (records["vcpu"].min() < 0 or records["vcpu"].max() >= nvcpus):
        raise ValueError(f"fault record vcpu outside [0, {nvcpus})")
    vcpu, start, end = _vcpu_blocked_periods(records)
    per_vcpu_s = np.bincount(vcpu, weights=end - start, minlength=nvcpus)
    # Second sweep over the periods: count of blocked vCPUs between consecutive edges.
    time = np.concatenate([start, end])
    delta = np.concatenate([np.ones(start.size, np.int64), -np.ones(end.size, np.int64)])
    order = np.argsort(time, kind="stable")
    nblocked = np.cumsum(delta[order])[:-1]
    total_s = float(np.diff(time[order])[nblocked == nvcpus].sum())
    return total_s * 1e3, (per_vcpu_s * 1e3).tolist()


def _bucket_edge_label(n: int) -> str:
    # Binary steps like bpftrace's K/M: 2^10 us prints as 1ms, 2^20 us as 1s.
    for unit, shift in (("s", 20), ("ms", 10)):
        if n >= shift:
            return f"{1 << (n - shift)}{unit}"
    return f"{1 << n}us"


def _bucket_label(n: int) -> str:
    # Bucket 0 also holds everything below 1 us.
    low = "0us" if n == 0 else _bucket_edge_label(n)
    return f"[{low}, {_bucket_edge_label(n + 1)})"


def histogram_text(dist: list[int], width: int = 40) -> str:
    """bpftrace-style text histogram of a latency_dist(), first to last non-empty bucket."""
    nonzero = np.flatnonzero(dist)
    if nonzero.size == 0:
        return ""
    peak = max(dist)
    lines = []
    for n in range(nonzero[0], nonzero[-1] + 1):
        bar = "@" * (dist[n] * width // peak)
        lines.append(
            f"{_bucket_label(n):<{_LABEL_WIDTH}}{dist[n]:>{_COUNT_WIDTH}} |{bar:<{width}}|"
        )
    return "\n".join(lines)


class FaultRing:
    """Shared-memory ring of fault records: one writer (destination), many readers.

    Layout: int64 header [written_count], then record slots; record i lives in slot i % slots.
    There is one spare slot beyond `capacity`: the slot the writer is filling is never one of the
    `capacity` newest published records, so readers need no lock and never see a torn record.
    """

    @staticmethod
    def nbytes(capacity: int) -> int:
        return _HEADER.itemsize + (capacity + 1) * FAULT_DTYPE.itemsize

    def __init__(self, buf: memoryview, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        self.capacity = capacity
        self._slots = capacity + 1
        self._count = np.frombuffer(buf, dtype=_HEADER, count=1)
        self._records = np.frombuffer(
            buf, dtype=FAULT_DTYPE, count=self._slots, offset=_HEADER.itemsize
        )

    @property
    def count(self) -> int:
        """Records written since the ring was created (not capped at capacity)."""
        return int(self._count[0])

    def append(self, rec: tuple) -> None:
        """Write one (time, vcpu, page, latency, channel) record, then publish it."""
        n = int(self._count[0])
        self._records[n % self._slots] = rec
        # Publish only after the record is in place, so a reader never sees the count ahead of
        # the data (the aligned 8-byte header store is a single store; x86 keeps store order).
        self._count[0] = n + 1

    def read_since(self, seen: int) -> tuple[np.ndarray, int]:
        """Copies of the records written after `seen` (at most the newest `capacity`), new count.

        A reader that fell behind by more than `capacity` gets the newest records only.
        """
        count = int(self._count[0])
        start = min(max(seen, count - self.capacity), count)
        out = self._records[np.arange(start, count) % self._slots]
        # The writer may have lapped us during the copy: record i's slot is reused by record
        # i + slots, and record `now` may be half-written, so only i > now - slots is intact.
        now = int(self._count[0])
        first_intact = max(start, now - self.capacity)
        return out[first_intact - start :], count
