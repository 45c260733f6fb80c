"""What one frame of the window costs with a 4 GiB guest of 4 KiB pages (1,048,576 pages).

Drives the real QtMainWindow with a synthetic session whose arrays have the engine's shapes
and codes: each frame the background stream places a run of pages, a few pages fault and
arrive on demand, faults land in the latency plots. A frame is the window's tick (read the
snapshot, update every panel) plus Qt painting what changed; frames come at the window's own
timer interval, so the panels that refresh a few times a second do so as often as in use.

    QT_QPA_PLATFORM=offscreen python bench/gui_frame.py [--frames 300] [--pages 1048576]

Target: at most 10 ms a frame on a 2-core machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from emu.config import load_config  # noqa: E402
from emu.migration import ram as R  # noqa: E402
from gui._qt.app import WINDOW_SIZE, application  # noqa: E402
from gui._qt.window import TICK_MS, QtMainWindow  # noqa: E402
from gui.synthetic import SyntheticSession  # noqa: E402

PAGE = 4096
BACKGROUND_PER_FRAME = 1200  # 10 Gbit/s at time-scale 0.1, 25 frames a second
FAULTS_PER_FRAME = 40
WAITING = 3  # pages a vCPU is blocked on at any time: one queued, two on preempt
FRAME_S = 0.004  # emulated seconds per frame


class BusyPostcopy:
    """A preempt postcopy made up frame by frame: each frame the background stream places a
    run of pages, FAULTS_PER_FRAME faults resolve (most on preempt), WAITING pages wait."""

    def __init__(self, npages: int, seed: int = 1) -> None:
        cfg = load_config(None, [f"guest.ram={npages * PAGE}", "migration.postcopy-preempt=true",
                                 "emulator.time-scale=0.1"])
        self.session = s = SyntheticSession(cfg)
        self.rng = np.random.default_rng(seed)
        quarter = np.arange(npages // 4)
        s.send(quarter, R.SENT_MAIN)  # a quarter came in precopy ...
        s.arrive(quarter, R.PRECOPY)
        stale = self.rng.integers(0, npages // 4, npages // 20)
        s.dst[stale] = R.DISCARDED  # ... and some of it was re-dirtied
        s.src[stale] = R.UNSENT
        s.now = s.switchover = 0.5
        s.status = {"source": "postcopy-active", "destination": "postcopy-active"}
        s.boards["network"].update({"queued-main": 4 << 20, "frames": 1})
        self.pos = npages // 4
        self.waiting = np.zeros(0, np.int64)

    def frame(self) -> None:
        s, n = self.session, len(self.session.dst)
        s.now += FRAME_S
        lo, hi = self.pos % n, min(self.pos % n + BACKGROUND_PER_FRAME, n)
        s.arrive(lo + np.flatnonzero(s.dst[lo:hi] < R.PRESENT), R.BACKGROUND)
        s.send(np.arange(hi, min(hi + 1024, n)), R.SENT_MAIN)  # what the link holds
        self.pos += BACKGROUND_PER_FRAME
        # last frame's waiting pages and other faults resolve, 90% of them on preempt
        pages = np.concatenate([self.waiting,
                                self.rng.integers(0, n, FAULTS_PER_FRAME - len(self.waiting))])
        preempt = self.rng.random(len(pages)) < 0.9
        latency = np.where(preempt, 4e-4, 8e-3) * self.rng.lognormal(0, 0.4, len(pages))
        s.block(pages[len(self.waiting):], s.now - latency[len(self.waiting):])
        for on_preempt, state, how in ((True, R.URGENT_PREEMPT, R.SENT_PREEMPT),
                                       (False, R.URGENT_MAIN, R.SENT_URGENT_MAIN)):
            mine = pages[preempt == on_preempt]
            s.send(mine, how)
            s.arrive(mine, state)
        self.waiting = self.rng.integers(0, n, WAITING)
        s.block(self.waiting)
        s.queue(self.waiting[0])
        s.send(self.waiting[1:], R.SENT_PREEMPT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=300)
    parser.add_argument("--pages", type=int, default=1 << 20)
    args = parser.parse_args()

    app = application()
    busy = BusyPostcopy(args.pages)
    window = QtMainWindow(busy.session.cfg)
    window.show_session(busy.session, follow=False)  # the benchmark drives the frames itself
    window.resize(*WINDOW_SIZE)
    window.show()
    for _ in range(10):  # warm up: first paints build caches
        busy.frame()
        _frame(window, app)
    ticks, totals, cpu = [], [], []
    next_frame = time.perf_counter()
    for _ in range(args.frames):
        next_frame += TICK_MS / 1e3
        busy.frame()  # made-up progress: not the window's cost
        started = time.thread_time()
        tick, total = _frame(window, app)
        cpu.append((time.thread_time() - started) * 1e3)
        ticks.append(tick)
        totals.append(total)
        time.sleep(max(0.0, next_frame - time.perf_counter()))
    window.close()
    _report(args, busy.session, ticks, totals, cpu)


def _frame(window, app) -> tuple[float, float]:
    start = time.perf_counter()
    window.tick()
    tick = time.perf_counter()
    app.processEvents()  # paint what the tick changed
    end = time.perf_counter()
    return (tick - start) * 1e3, (end - start) * 1e3


def _report(args, fake: SyntheticSession, ticks: list[float], totals: list[float],
            cpu: list[float]) -> None:
    print(f"{args.pages:,} pages ({args.pages * PAGE / (1 << 30):g} GiB of 4 KiB), "
          f"{args.frames} frames every {TICK_MS} ms, {fake.faults.count:,} faults plotted "
          f"at the end")
    print(f"  frame, wall clock (tick + paint): {_spread(totals)}")
    print(f"  frame, CPU time of the GUI thread: {_spread(cpu)}")
    print(f"  tick alone (wall): {_spread(ticks)}")
    # CPU time is what the window costs; wall time adds whatever else the machine runs.
    p95 = statistics.quantiles(cpu, n=20)[18]
    print(f"  target: <= 10 ms a frame -> {'ok' if p95 <= 10 else 'MISSED'} (p95 CPU time)")


def _spread(ms: list[float]) -> str:
    q = statistics.quantiles(ms, n=20)
    return f"median {statistics.median(ms):.2f} ms, p95 {q[18]:.2f} ms, max {max(ms):.2f} ms"


if __name__ == "__main__":
    main()
