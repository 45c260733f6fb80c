"""Where the guest kernel put the vCPUs' buffer: the guest-physical page behind each of its
pages (workload.prefault-threads).

A guest program walks its buffer in guest-virtual order; QEMU's background scan walks
guest-physical order (ram_addr, ram_find_and_save_block()). The two orders agree when one thread
faulted the buffer in. mig_mon's mm_dirty prefaults with one thread per online CPU at once,
thread i writing one byte to each page of slice i (each = pages / threads; the main thread then
does the leftover pages). Linux hands each CPU's faults frames from that CPU's per-CPU list
and refills the list `batch` frames at a time from the buddy allocator (mm/page_alloc.c:
rmqueue_pcplist(), rmqueue_bulk(), zone_batchsize()), which gives consecutive refills
consecutive frames. So the buffer is runs of `batch` pages in order, and one slice's runs lie
about `threads` runs apart in physical order: a writer walking the buffer in order jumps ahead
in the scan's order at the end of every run (docs/concepts.md, "The guest's layout").

Measured with Debian's 6.1 kernel in QEMU (docs/benchmarks.md, "The guest's layout"): 20
threads prefaulting 1.5 GiB left 82-86% of the runs exactly 63 pages long (the batch of a zone
of 1 GiB or more) and nearly all the rest multiples of it, taken from a front of frames that
climbs in physical order (python bench/guest_layout.py). On that 2-core host only a few of
the 20 vCPUs faulted at any moment, so fewer threads' runs came between two of one thread's.
Here the threads refill in rounds, each thread once a round, in an order drawn afresh each
round: they run at the same speed on CPUs of their own, as the series' 20-vCPU guest did, and
which of them runs dry first is chance. A slice's next run is then (threads - 1) x batch pages
further on, on average.
"""

from __future__ import annotations

import functools

import numpy as np

ONE_MIB_PAGES = 256  # SZ_1M / PAGE_SIZE
LAYOUT_STREAM = 0x6C61  # keeps the round orders' random stream apart from the workload's


def zone_batchsize(pages: int) -> int:
    """Linux's per-CPU list batch for a zone of `pages` 4 KiB pages (zone_batchsize(): about
    0.1% of the zone or 1 MiB, whichever is smaller, over 4, clamped to 2^n - 1): 63 for a
    zone of 1 GiB or more. The buffer's zone is the guest's RAM, less the kernel's own."""
    batch = max(1, min(pages >> 10, ONE_MIB_PAGES) // 4)
    return max(1, (1 << (batch + batch // 2).bit_length() - 1) - 1)  # pcp->batch is at least 1


class Layout:
    """The guest-physical page of each buffer page, for a buffer of `pages` 4 KiB pages (all of
    guest RAM) prefaulted by `threads` threads at once."""

    def __init__(self, pages: int, threads: int, seed: int) -> None:
        self.threads = threads
        self.batch = zone_batchsize(pages)
        self.each = pages // threads
        self.full, self.tail = divmod(self.each, self.batch)  # whole refills, the last one
        if threads == 1:
            return  # the buffer in order: no rounds to draw
        rounds = self.full + (self.tail > 0)
        rng = np.random.default_rng([seed, LAYOUT_STREAM])
        order = rng.random((rounds, threads)).argsort(axis=1)
        # rank[j, i]: thread i's turn in round j (uint8: at most 256 threads)
        self.rank = order.argsort(axis=1).astype(np.uint8)

    def frames(self, k: np.ndarray) -> np.ndarray:
        """The guest-physical pages of buffer pages k."""
        if self.threads == 1:
            return k
        thread, offset = np.divmod(k, self.each)
        prefaulted = thread < self.threads  # the rest is the main thread's, after all of them
        thread = np.minimum(thread, self.threads - 1)
        turn, within = np.divmod(offset, self.batch)
        turn = np.minimum(turn, len(self.rank) - 1)
        width = np.where(turn < self.full, self.batch, self.tail)  # the round's refill size
        frame = turn * self.threads * self.batch + self.rank[turn, thread] * width + within
        return np.where(prefaulted, frame, k)


@functools.lru_cache(maxsize=4)
def layout(pages: int, threads: int, seed: int) -> Layout:
    """One Layout per process for every vCPU's workload and the memory checks."""
    return Layout(pages, threads, seed)
