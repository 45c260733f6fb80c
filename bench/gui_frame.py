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

from emu import destination, link, metrics, source  # noqa: E402
from emu import ram as R  # noqa: E402
from emu.config import load_config  # noqa: E402
from gui.app import WINDOW_SIZE, application  # noqa: E402
from gui.session import RUNNING, FaultLog, Snapshot, Urgent  # noqa: E402
from gui.window import TICK_MS, QtMainWindow  # noqa: E402

PAGE = 4096
BACKGROUND_PER_FRAME = 1200  # 10 Gbit/s at time-scale 0.1, 25 frames a second
FAULTS_PER_FRAME = 40
FRAME_S = 0.004  # emulated seconds per frame


class SyntheticSession:
    """The part of gui.session.Session the window reads, fed with made-up progress."""

    def __init__(self, npages: int, seed: int = 1) -> None:
        self.cfg = load_config(None, [f"guest.ram={npages * PAGE}",
                                      "migration.postcopy-preempt=true"])
        self.rng = np.random.default_rng(seed)
        self.dst = np.full(npages, R.MISSING, np.uint8)
        self.src = np.zeros(npages, np.uint8)
        self.arrival = np.zeros(npages)
        self.dst[: npages // 4] = R.PRECOPY  # a quarter came in precopy ...
        self.src[: npages // 4] = R.SENT_MAIN
        stale = self.rng.integers(0, npages // 4, npages // 20)
        self.dst[stale] = R.DISCARDED  # ... and some of it was re-dirtied
        self.pos = npages // 4
        self.now = 0.5
        self.faults = FaultLog()
        self.report = None
        self.paused = False
        self.scale = 0.1
        self.phase = RUNNING
        self.switchover = 0.5
        self.can_start_postcopy = False
        self.boards = {
            "source": dict.fromkeys(source.FIELDS, 0.0),
            "destination": dict.fromkeys(destination.FIELDS, 0.0),
            "network": dict.fromkeys(link.FIELDS, 0.0),
        }
        self.boards["network"].update({"queued-main": 4 << 20, "frames": 1})

    def tick(self) -> Snapshot:
        self.now += FRAME_S
        new = self._advance()
        self.faults.extend(new)
        waiting = self.rng.integers(0, len(self.dst), 3)
        self.dst[waiting] = R.REQUESTED
        urgent = Urgent(queued=[(int(p), 0.0005) for p in waiting[:1]],
                        preempt=[(int(p), 0.0002) for p in waiting[1:]])
        return Snapshot(RUNNING, self.now, {"source": "postcopy-active",
                                            "destination": "postcopy-active"},
                        self.dst, self.src, self.arrival, new, np.sort(waiting), urgent,
                        self.boards, [])

    def _advance(self) -> np.ndarray:
        n = len(self.dst)
        lo, hi = self.pos % n, min(self.pos % n + BACKGROUND_PER_FRAME, n)
        self.dst[lo:hi] = np.where(self.dst[lo:hi] < R.PRESENT, R.BACKGROUND, self.dst[lo:hi])
        self.src[hi:hi + 1024] = R.SENT_MAIN  # what the link holds
        self.arrival[lo:hi] = self.now
        self.pos += BACKGROUND_PER_FRAME
        pages = self.rng.integers(0, n, FAULTS_PER_FRAME)
        channel = self.rng.random(FAULTS_PER_FRAME) < 0.9
        self.dst[pages] = np.where(channel, R.URGENT_PREEMPT, R.URGENT_MAIN)
        new = np.zeros(FAULTS_PER_FRAME, metrics.FAULT_DTYPE)
        new["time"] = self.now - self.rng.random(FAULTS_PER_FRAME) * FRAME_S
        new["page"] = pages
        new["channel"] = channel
        new["latency"] = np.where(channel, 4e-4, 8e-3) * self.rng.lognormal(0, 0.4,
                                                                               FAULTS_PER_FRAME)
        return new

    def describe(self, *args) -> str:
        return ""

    def stop(self) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=300)
    parser.add_argument("--pages", type=int, default=1 << 20)
    args = parser.parse_args()

    app = application()
    fake = SyntheticSession(args.pages)
    window = QtMainWindow(fake.cfg)
    window._timer.stop()  # the benchmark drives the frames itself
    window.session = fake
    window._reset_views(fake.cfg)
    window.resize(*WINDOW_SIZE)
    window.show()
    for _ in range(10):  # warm up: first paints build caches
        _frame(window, app)
    ticks, totals, cpu = [], [], []
    next_frame = time.perf_counter()
    for _ in range(args.frames):
        next_frame += TICK_MS / 1e3
        started = time.thread_time()
        tick, total = _frame(window, app)
        cpu.append((time.thread_time() - started) * 1e3)
        ticks.append(tick)
        totals.append(total)
        time.sleep(max(0.0, next_frame - time.perf_counter()))
    window.close()
    _report(args, fake, ticks, totals, cpu)


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
