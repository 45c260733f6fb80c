"""The emulator's own cost per page fault, and how it shrinks with emulator.time-scale.

    python bench/overhead.py [--scales 1,0.5,0.2,0.1,0.05]

4 KiB pages, postcopy-preempt, a background stream capped low enough that main never fills
(so the model's floor is only RTT + the page itself on the link), a hot set that makes the
faults independent of each other. Overhead = emulated mean latency - the model's floor
(model.predict with no software cost): what Python, the scheduler and the GIL add, in
emulated time. It should shrink in proportion to the time scale.
"""

from __future__ import annotations

import argparse

from emu.config import load_config
from emu.controller import Run
from emu.figures import metrics, model


def measure(cfg) -> dict:
    with Run(cfg) as run:
        while run.postcopy_start is None or run.clock.now() < run.postcopy_start + WINDOW:
            run.poll()
        faults, _ = run.faults(0)
    return metrics.summarize(faults["latency"][faults["channel"] == 1])

SETS = [
    "migration.postcopy-preempt=true", "migration.max-postcopy-bandwidth=1MB/s",
    "guest.ram=16MiB", "link.bandwidth=1Gbit", "link.rtt=100us",
    "workload.pattern=hotset", "workload.hot-fraction=0.002",
    "workload.hot-probability=0.99", "workload.touch-cost=5us",
    "emulator.payload=false", "migration.switchover-after=0",
]
WINDOW = 0.3  # emulated seconds of postcopy measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scales", default="1,0.5,0.2,0.1,0.05")
    args = parser.parse_args()
    print("time-scale  faults  mean us  floor us  overhead us  overhead x 1/scale (real us)")
    for scale in (float(x) for x in args.scales.split(",")):
        cfg = load_config(None, SETS + [f"emulator.time-scale={scale}"])
        floor = model.predict(cfg, software_cost=0.0)["latency-us"]
        lat = measure(cfg)
        over = lat["avg-us"] - floor
        print(f"{scale:10g}  {lat['count']:6d}  {lat['avg-us']:7.1f}  {floor:8.1f}  "
              f"{over:11.1f}  {over / scale:12.1f}", flush=True)


if __name__ == "__main__":
    main()
