"""Soak: N randomized migrations with faults; how many complete with memory intact?

    python bench/soak.py N [--seed S] [--json]

Each run draws a page size (4KiB or 2MiB), postcopy-preempt on or off, 1-4 vCPUs, a
workload, and one to three faults (cut main / preempt / return, corrupt, migrate-pause) at
random times in postcopy, some of them during the recovery handshake; recovery is automatic.
Prints one line per failure and a summary; exits 1 if any run did not complete intact.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time

from emu.config import load_config
from emu.controller import migrate
from emu.faults import Fault


def scenario(rng: random.Random) -> tuple[list[str], list[Fault]]:
    preempt = rng.random() < 0.5
    huge = rng.random() < 0.3
    sets = [
        f"guest.page-size={'2MiB' if huge else '4KiB'}",
        f"guest.ram={'64MiB' if huge else '32MiB'}",
        f"guest.vcpus={rng.randint(1, 4)}",
        f"workload.pattern={rng.choice(['sequential', 'random', 'stride', 'hotset', 'ab'])}",
        f"migration.postcopy-preempt={str(preempt).lower()}",
        f"link.socket-buffer={rng.choice(['256KiB', '1MiB', '4MiB'])}",
        "link.bandwidth=1Gbit",
        "migration.switchover-after=50ms",
        "emulator.time-scale=0.5",
        "emulator.duration-limit=30s",
        f"emulator.seed={rng.randrange(1 << 30)}",
    ]
    channels = ["main", "return"] + (["preempt"] if preempt else [])
    faults = []
    for _ in range(rng.randint(1, 3)):
        action = rng.choice(["cut", "cut", "corrupt", "pause"])
        at: float | str = round(rng.uniform(0.0, 0.25), 4)
        if rng.random() < 0.15:
            at = rng.choice(["postcopy-recover-setup", "postcopy-recover"])
            if at == "postcopy-recover-setup":  # a 9.1+ status: the 10.1 design has it
                sets.append("migration.design=10.1")
        faults.append(Fault(at, action, rng.choice(channels)))
    return sets, faults


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("n", type=int)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    started, ok, failures, recoveries = time.monotonic(), 0, [], 0
    for i in range(args.n):
        sets, faults = scenario(rng)
        result = migrate(load_config(None, sets), None, faults, 0.05)
        recoveries += result["recoveries"]
        if result["status"] == "completed" and result["integrity"]["ok"]:
            ok += 1
        else:
            failures.append({"run": i, "sets": sets, "faults": [f.describe() for f in faults],
                             "errors": result["errors"], "integrity": result["integrity"],
                             "last-events": [e["event"] for e in result["events"][-12:]]})
            print(f"run {i} FAILED: {failures[-1]}", file=sys.stderr)
    summary = {"runs": args.n, "completed-intact": ok, "recoveries": recoveries,
               "real-time-s": round(time.monotonic() - started, 1), "failures": failures}
    print(json.dumps(summary, indent=1) if args.json else
          f"soak: {ok}/{args.n} runs completed with memory intact, {recoveries} recoveries, "
          f"{summary['real-time-s']} s")
    return 0 if ok == args.n else 1


if __name__ == "__main__":
    sys.exit(main())
