"""What the guest does: vCPUs touching 4 KiB pages in a pattern, paced in emulated time.

Patterns (workload.pattern):
- sequential: mig_mon's mm_dirty. vCPU v walks its own slice of RAM in order, writing the pass
  number into byte 0 of each page after checking the previous pass's value.
- ab: QEMU's qtest guest. vCPU v walks its own slice in order, incrementing byte 0.
- random: uniform over all of RAM; stride: jumps of workload.stride, shifted one page per lap;
  hotset: workload.hot-probability of the touches go to the first workload.hot-fraction of RAM.
  These increment byte v of the pages vCPU v touches (no two vCPUs write the same byte, so the
  memory check knows exactly what each page must hold).
The pages are those of the vCPUs' buffer, all of guest RAM, laid out in guest-physical memory
as workload.prefault-threads prefaulting it left it (emu/migration/layout.py).
A touch costs workload.touch-cost of emulated time. A vCPU does its touches in batches as the
clock allows, so it never spins the host CPU, and stops at the first page that is not present.
Each vCPU keeps count of its touches by emulated time (Touches), for the guest's progress
(emu/figures/progress.py).
"""

from __future__ import annotations

import threading

import numpy as np

from emu.clock import Clock
from emu.config import Config
from emu.migration.layout import layout
from emu.migration.ram import TARGET_PAGE

PATTERNS = ("sequential", "random", "stride", "hotset", "ab")
SLICED = ("sequential", "ab")  # patterns where each vCPU owns a slice and writes byte 0
TOUCH_BATCH = 1 << 16  # touches generated at once by the random-like patterns
MAX_BATCH = 4096
MAX_POS = 1 << 62  # a vCPU's position (touches done) indexes int64 arrays: far beyond any run


class Workload:
    """One vCPU's deterministic stream of touches; `pos` counts the touches done so far."""

    def __init__(self, cfg: Config, vcpu: int, pos: int = 0) -> None:
        self.pattern = cfg["workload.pattern"]
        self.vcpu = vcpu
        self.pos = pos
        self.seed = cfg["emulator.seed"]
        self.n = cfg["guest.ram"] // TARGET_PAGE
        nvcpus = cfg["guest.vcpus"]
        self.lo = vcpu * self.n // nvcpus
        self.size = (vcpu + 1) * self.n // nvcpus - self.lo
        self.stride = max(1, cfg["workload.stride"] // TARGET_PAGE)
        self.hot = max(1, int(self.n * cfg["workload.hot-fraction"]))
        self.hot_probability = cfg["workload.hot-probability"]
        self._blocks: dict[int, np.ndarray] = {}
        # the vCPUs touch pages of their buffer, all of guest RAM, wherever the guest kernel
        # put them when it was prefaulted (emu/migration/layout.py)
        self.layout = layout(self.n, cfg["workload.prefault-threads"], self.seed)

    @property
    def max_batch(self) -> int:
        # a sliced batch must not wrap onto itself, or one batch would touch a page twice
        return min(MAX_BATCH, self.size) if self.pattern in SLICED else MAX_BATCH

    def peek(self, n: int) -> np.ndarray:
        """The target pages of the next n touches (not done yet)."""
        return self.layout.frames(self._buffer_pages(self.pos + np.arange(n, dtype=np.int64)))

    def slice_pages(self) -> np.ndarray:
        """A sliced pattern's pages in the order it walks them."""
        return self.layout.frames(self.lo + np.arange(self.size, dtype=np.int64))

    def _buffer_pages(self, k: np.ndarray) -> np.ndarray:
        if self.pattern in SLICED:
            return self.lo + k % self.size
        if self.pattern == "stride":
            k = k + self.lo
            return ((k * self.stride) % self.n + (k * self.stride) // self.n % self.stride) % self.n
        return self._random(k)

    def commit(self, ram: np.ndarray | None, pages: np.ndarray) -> int:
        """Do the touches `pages` (the first ones peek() returned): write guest RAM (None: no
        payload, nothing to write) and advance. Returns how many touches found a wrong value
        (sequential checks what its previous pass wrote)."""
        bad = 0
        if ram is not None and len(pages):
            bad = self._write(ram, pages)
        self.pos += len(pages)
        return bad

    def _write(self, ram: np.ndarray, pages: np.ndarray) -> int:
        if self.pattern == "ab":
            ram[pages, 0] += 1
            return 0
        if self.pattern == "sequential":
            passes = (self.pos + np.arange(len(pages))) // self.size + 1
            bad = int(np.count_nonzero(ram[pages, 0] != ((passes - 1) & 0xFF)))
            ram[pages, 0] = passes & 0xFF
            return bad
        np.add.at(ram[:, self.vcpu], pages, 1)
        return 0

    def _random(self, k: np.ndarray) -> np.ndarray:
        first, last = int(k[0]) // TOUCH_BATCH, int(k[-1]) // TOUCH_BATCH
        blocks = np.concatenate([self._block(b) for b in range(first, last + 1)])
        return blocks[k - first * TOUCH_BATCH]

    def _block(self, b: int) -> np.ndarray:
        if b not in self._blocks:
            rng = np.random.default_rng([self.seed, self.vcpu, b])
            pages = rng.integers(0, self.n, TOUCH_BATCH)
            if self.pattern == "hotset":
                hot = rng.random(TOUCH_BATCH) < self.hot_probability
                pages = np.where(hot, rng.integers(0, self.hot, TOUCH_BATCH), pages)
            self._blocks = {k: v for k, v in self._blocks.items() if k >= b - 1}
            self._blocks[b] = pages
        return self._blocks[b]


class Memory:
    """What a vCPU sees of guest RAM; the source and the destination each provide one."""

    ram: np.ndarray | None  # (target pages, 4096) uint8, or None without payload

    def first_missing(self, pages: np.ndarray) -> int:
        """Index of the first touch whose page is not present (len(pages) if all are)."""
        raise NotImplementedError

    def fault(self, vcpu: int, page: int) -> bool:
        """Block until the target page `page` is present; False if it was already (it came
        while the vCPU was on its way to it: no fault)."""
        raise NotImplementedError

    def touched(self, vcpu: int, pages: np.ndarray) -> None:
        """After a batch of writes (the source marks them dirty)."""


class Touches:
    """One vCPU's touches by emulated time since it started (on the destination: since the
    guest resumed there), as its own cursor counts them: what it has done by any time up to
    the end of its run, and where its last fault stopped it. `publish(n)`, if given, gets the
    touches done so far after every batch (the destination's board)."""

    def __init__(self, t: float, pos: int, cost: float, publish=None) -> None:
        self.t0, self.pos0, self.cost = t, pos, cost
        self.publish = publish
        self.batch = (t, pos, 0)  # the batch under way: its first touch's time and position, size
        # the last fault: the time the vCPU reached the touch that faulted, the touches done
        # before it, and when the vCPU went on (None while it waits: it never did)
        self.fault = (t, pos)
        self.woken: float | None = t
        self.faults = 0

    def at(self, t: float) -> int:
        """Touches done by emulated time t (not before the last batch began): a batch's
        touches are done one per `cost`, whether or not its thread has caught up with them."""
        start, pos, size = self.batch
        done = min(size, max(0, int((t - start) / self.cost))) if t > start else 0
        return pos + done - self.pos0

    def faulted(self, t: float, pos: int, woken: float | None) -> None:
        """The vCPU waited for a missing page at touch `pos`, reached at time t."""
        self.fault, self.woken = (t, pos), woken
        self.faults += 1


class VCpu(threading.Thread):
    def __init__(self, index: int, workload: Workload, memory: Memory, clock: Clock,
                 touch_cost: float, stop: threading.Event, publish=None) -> None:
        super().__init__(name=f"vcpu{index}", daemon=True)
        self.index = index
        self.workload = workload
        self.memory = memory
        self.clock = clock
        self.cost = touch_cost
        self.stop = stop
        self.bad = 0  # touches that found a value their previous pass did not write
        self.publish = publish
        self.touches: Touches | None = None  # from the moment it runs

    def run(self) -> None:
        vt = self.clock.now()  # how far this vCPU has got, in emulated time
        touches = self.touches = Touches(vt, self.workload.pos, self.cost, self.publish)
        while not self.stop.is_set():
            pages = self.workload.peek(self.workload.max_batch)
            k = self.memory.first_missing(pages)
            touches.batch = (vt, self.workload.pos, k)
            # the guest reaches touch k at vt + k x cost: do the touches before it then, so a
            # fault is raised at its own time, not at the end of a batch
            vt += k * self.cost
            while not self.clock.sleep_until(vt, max_real=0.01):
                if self.stop.is_set():
                    return
            self.bad += self.workload.commit(self.memory.ram, pages[:k])
            self.memory.touched(self.index, pages[:k])
            if touches.publish is not None:
                touches.publish(self.workload.pos - touches.pos0)
            if k < len(pages):
                waited = self.memory.fault(self.index, int(pages[k]))
                woke = self.clock.now()
                if waited:  # not woken but stopped if the run ended while it waited
                    touches.faulted(vt, self.workload.pos, None if self.stop.is_set() else woke)
                vt = max(vt, woke)  # the time spent blocked is lost to the guest
                touches.batch = (vt, self.workload.pos, 0)
