"""multifd's precopy throughput where one thread's writing is the limit: a 256 MiB idle guest,
precopy only, over a 10 Gbit/s link with no rate cap, each writer paying cpu.write-byte=2ns
(500 MB/s a thread), without multifd and with 1, 2, 4 channels (docs/benchmarks.md, "multifd").

    python bench/multifd.py [--channels 1,2,4] [--time-scale 0.05]

Throughput is transferred / total-time, in emulated time: precopy for switchover-after, then
stop-and-copy of the rest (on multifd too). Target: 1 channel as fast as none (one thread
writes either way), N channels N times that, up to the link.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from emu.config import load_config  # noqa: E402
from emu.controller import migrate  # noqa: E402

SETS = {"guest.ram": "256MiB", "migration.postcopy-ram": "false",
        "link.bandwidth": "10Gbit", "migration.max-bandwidth": "10Tbit",
        "cpu.write-byte": "2ns", "workload.touch-cost": "100us",
        "migration.switchover-after": "100ms", "emulator.payload": "false",
        "emulator.duration-limit": "60s"}


def measure(channels: int, scale: str) -> tuple[int, float]:
    """(total-time in ms, MB/s) of one migration; channels 0: without multifd."""
    sets = {**SETS, "emulator.time-scale": scale, "migration.multifd": str(channels > 0).lower(),
            "migration.multifd-channels": str(max(channels, 1))}
    result = migrate(load_config(None, [f"{k}={v}" for k, v in sets.items()]))
    assert result["status"] == "completed", result["errors"]
    qm = result["query-migrate"]
    return qm["total-time"], qm["ram"]["transferred"] / qm["total-time"] / 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", default="1,2,4")
    parser.add_argument("--time-scale", default="0.05")
    args = parser.parse_args()
    print("| multifd | channels | total-time (ms) | MB/s |\n|---|---|---|---|")
    for channels in [0, *map(int, args.channels.split(","))]:
        total, rate = measure(channels, args.time_scale)
        on = ("on", str(channels)) if channels else ("off", "-")
        print(f"| {on[0]} | {on[1]} | {total} | {rate:.0f} |")


if __name__ == "__main__":
    main()
