"""What recording costs the window per frame: the Recorder's copy of the page arrays and its
diff against the last frame, with a 4 GiB guest of 4 KiB pages (1,048,576 pages), the
background stream placing a run of pages each frame. No processes, no Qt.

    python bench/record_tick.py [--frames 200] [--pages 1048576]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from emu.config import load_config  # noqa: E402
from emu.migration import ram as R  # noqa: E402
from gui.record import Recorder  # noqa: E402
from gui.session import RUNNING, FaultLog, Urgent  # noqa: E402

RUN = 2000  # pages the background stream places per frame


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=200)
    parser.add_argument("--pages", type=int, default=1 << 20)
    args = parser.parse_args()
    cfg = load_config(None, [f"guest.ram={args.pages * 4}KiB"])
    with tempfile.TemporaryDirectory() as tmp:
        recorder = Recorder(Path(tmp, "bench.pcr"), cfg)
        dst, src = np.zeros(cfg.npages, np.uint8), np.zeros(cfg.npages, np.uint8)
        arrival = np.zeros(cfg.npages)
        session = SimpleNamespace(switchover=None, paused=False, scale=1.0, faults=FaultLog(),
                                  integrity=None, report=None, run=None)
        costs = []
        for i in range(args.frames):
            lo = i * RUN % cfg.npages
            dst[lo:lo + RUN], src[lo:lo + RUN], arrival[lo:lo + RUN] = R.BACKGROUND, 1, i
            start = time.perf_counter()
            pages = recorder.copy_pages((dst, src, arrival))
            snap = SimpleNamespace(events=[], dst=pages[0], src=pages[1], arrival=pages[2],
                                   urgent=Urgent(), boards={}, now=i * 0.04, phase=RUNNING,
                                   status={"source": "postcopy-active",
                                           "destination": "postcopy-active"})
            recorder.add(snap, session)
            costs.append(time.perf_counter() - start)
        recorder.close(session)
        size = Path(tmp, "bench.pcr").stat().st_size
    print(f"{cfg.npages} pages, {args.frames} frames: median {statistics.median(costs) * 1e3:.2f}"
          f" ms a frame, max {max(costs) * 1e3:.2f} ms; file {size / 1e3:.0f} KB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
