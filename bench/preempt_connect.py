"""How long postcopy_start() waits for a late preempt channel, by design (issue 13 item 5).

    PYTHONPATH=. python bench/preempt_connect.py

A 32 MiB guest, 100 ms of precopy at 1 Gbit/s, the fault `delay preempt-connect D` for D = 0,
50 and 300 ms, designs 7.1 and 8.0: when the destination began loading (its `active`), the
source's wait in postcopy_start() (trace pce_postcopy_preempt_wait_channel) and when the
switchover began, in emulated time.
"""

from __future__ import annotations

from emu import faults
from emu.config import load_config
from emu.controller import migrate

SETS = ["guest.ram=32MiB", "link.bandwidth=1Gbit", "link.socket-buffer=1MiB",
        "migration.switchover-after=100ms", "emulator.time-scale=0.25",
        "migration.postcopy-preempt=true", "workload.pattern=ab"]
WAIT = "pce_postcopy_preempt_wait_channel"


def cell(design: str, delay: str) -> str:
    cfg = load_config(None, [*SETS, f"migration.design={design}"])
    result = migrate(cfg, faults=[faults.parse(f"delay preempt-connect {delay}")],
                     trace=(WAIT,))
    waited = next(e["fields"]["ms"] for e in result["events"] if e.get("trace") == WAIT)
    device = next(s["time"] for s in result["states"]["source"] if s["status"] == "device")
    loading = next(s["time"] for s in result["states"]["destination"] if s["status"] == "active")
    return (f"| {design} | {delay} | {loading * 1e3:.1f} | {waited:.1f} | {device * 1e3:.1f} | "
            f"{result['requests']['urgent-main']} | {result['status']} |")


def main() -> None:
    print("| design | delay | destination loads (ms) | source waits (ms) | switchover (ms) | "
          "urgent-main | status |")
    print("|---|---|---|---|---|---|---|")
    for design in ("7.1", "8.0"):
        for delay in ("0ms", "50ms", "300ms"):
            print(cell(design, delay))


if __name__ == "__main__":
    main()
