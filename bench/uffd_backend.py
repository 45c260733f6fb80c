"""The same small scenario with both emulator.backend values, side by side (issue 15, item 4).

    python bench/uffd_backend.py [--runs 3] [--ram 64MiB] [--time-scale 0.1]
                                 [--page-size 2MiB [--reserve-huge]]

A 4 KiB guest of random touches, 2 MiB socket buffers (an urgent page in vanilla waits behind
the background stream, on preempt it does not), vanilla then preempt, each with the emulated
backend (a vCPU looks a page's state up and waits on a condition) and with userfaultfd (it
faults in the kernel, the fault thread reads the uffd_msg, UFFDIO_COPY wakes it). Prints, per
case, the mean over the runs of: faults, mean, median, p99 fault latency (emulated ms), the
blocktime (ms), the guest's progress (touches per emulated second from its resume to its last
fault, as bench qemu measures it), and the real seconds a run took.

--page-size 2MiB: huge pages (userfaultfd: the destination's RAM on a hugetlb memfd, which
needs --ram's worth of free 2 MiB pages; --reserve-huge, as root, reserves what is missing
for the benchmark and puts nr_hugepages back afterwards).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this tree's emu

from emu import uffd  # noqa: E402
from emu.config import load_config  # noqa: E402
from emu.controller import migrate  # noqa: E402
from emu.figures.qemu_bench import emulator_summary  # noqa: E402

BACKENDS = ("emulated", "userfaultfd")
MODES = {"vanilla": "false", "preempt": "true"}
HUGE = 2 << 20
COLUMNS = ("count", "mean-ms", "median-ms", "p99-ms", "blocktime-ms", "progress", "real-s")


def sets(args, backend: str, preempt: str) -> list[str]:
    return [f"guest.ram={args.ram}", "workload.pattern=random", "link.bandwidth=1Gbit",
            "link.socket-buffer=2MiB", "migration.switchover-after=100ms",
            f"emulator.time-scale={args.time_scale}", "emulator.duration-limit=30s",
            f"migration.postcopy-preempt={preempt}", f"emulator.backend={backend}",
            f"emulator.seed={args.seed}", f"guest.page-size={args.page_size}"]


def one(args, backend: str, preempt: str) -> dict:
    started = time.monotonic()
    report = migrate(load_config(None, sets(args, backend, preempt)))
    if report["status"] != "completed" or not report["integrity"]["ok"]:
        raise RuntimeError(f"{backend} run failed: {report['errors']}")
    return {**emulator_summary(report), "real-s": time.monotonic() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--ram", default="64MiB")
    parser.add_argument("--time-scale", default="0.1")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--page-size", default="4KiB", choices=("4KiB", "2MiB"))
    parser.add_argument("--reserve-huge", action="store_true",
                        help="as root, reserve the 2 MiB pages the guest needs meanwhile")
    args = parser.parse_args()
    if (why := uffd.probe()) is not None:
        sys.exit(f"uffd_backend: {why}")
    with contextlib.ExitStack() as stack:
        if args.page_size == "2MiB" and args.reserve_huge:
            need = load_config(None, [f"guest.ram={args.ram}"])["guest.ram"] // HUGE
            stack.enter_context(uffd.reserved_huge_pages(need, HUGE))
        table(args)


def table(args) -> None:
    print(f"{'case':24s}" + "".join(f"{c:>13s}" for c in COLUMNS))
    for mode, preempt in MODES.items():
        for backend in BACKENDS:
            runs = [one(args, backend, preempt) for _ in range(args.runs)]
            means = {c: float(np.mean([r[c] for r in runs])) for c in COLUMNS}
            print(f"{mode + ' ' + backend:24s}" + "".join(f"{means[c]:13.3f}" for c in COLUMNS),
                  flush=True)


if __name__ == "__main__":
    main()
