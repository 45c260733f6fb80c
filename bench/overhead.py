"""The emulator's own cost per page fault, next to the floor of its path, and how it shrinks
with emulator.time-scale.

    python bench/overhead.py [--scales 1,0.5,0.2,0.1,0.05] [--rounds 500] [--set KEY=VALUE]

4 KiB pages, postcopy-preempt as QEMU 8.0 does it (the return-path thread sends a requested
page at once: 7.1/7.2's migration thread would hold it for the next 100 ms window of the
cap), a background stream capped low enough that main never fills (so the model's floor is
only RTT + the page itself on the link), a hot set that makes the faults independent of each
other. Overhead = emulated mean latency - the model's floor
(model.predict with no software cost): what Python, the scheduler and the GIL add, in
emulated time; divided by the time scale, in real time.

The floor (emu/net/pingpong.py), measured after each row's run at time-scale 1: a 4 KiB
request/response ping-pong over the same link, processes and channels (destination -> link ->
source -> link -> destination), one thread per side; its real time per round trip less the
link's own (RTT and both frames). ratio = real overhead per fault / floor: what the fault
path's hand-offs between threads cost above the bare round trip.
"""

from __future__ import annotations

import argparse

from emu.config import load_config
from emu.controller import Run
from emu.figures import metrics, model
from emu.net import pingpong


def measure(cfg) -> dict:
    with Run(cfg) as run:
        while run.postcopy_start is None or run.clock.now() < run.postcopy_start + WINDOW:
            run.poll()
        faults, _ = run.faults(0)
    return metrics.summarize(faults["latency"][faults["channel"] == 1])

SETS = [
    "migration.postcopy-preempt=true", "migration.design=8.0",
    "migration.max-postcopy-bandwidth=1MB/s",
    "guest.ram=16MiB", "link.bandwidth=1Gbit", "link.rtt=100us",
    "workload.pattern=hotset", "workload.hot-fraction=0.002",
    "workload.hot-probability=0.99", "workload.touch-cost=5us",
    "emulator.payload=false", "migration.switchover-after=0",
]
WINDOW = 0.3  # emulated seconds of postcopy measured


def floor(sets: list[str], rounds: int) -> float:
    """The ping-pong's real us per round trip above the link's own time, at time-scale 1."""
    cfg = load_config(None, SETS + sets + ["emulator.time-scale=1"])  # never "auto"
    return pingpong.measure(cfg, rounds)["floor-us"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scales", default="1,0.5,0.2,0.1,0.05")
    parser.add_argument("--rounds", type=int, default=500, help="ping-pong round trips per row")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a setting on top of the scenario's (e.g. link.rtt=1ms)")
    args = parser.parse_args()
    print("time-scale  faults  mean us  model us  overhead us  real us  floor us  ratio")
    for scale in (float(x) for x in args.scales.split(",")):
        cfg = load_config(None, SETS + args.set + [f"emulator.time-scale={scale}"])
        link = model.predict(cfg, software_cost=0.0)["latency-us"]
        lat = measure(cfg)
        bare = floor(args.set, args.rounds)  # after: its processes must not disturb the run
        over = lat["avg-us"] - link
        print(f"{scale:10g}  {lat['count']:6d}  {lat['avg-us']:7.1f}  {link:8.1f}  "
              f"{over:11.1f}  {over / scale:7.1f}  {bare:8.1f}  {over / scale / bare:5.2f}",
              flush=True)


if __name__ == "__main__":
    main()
