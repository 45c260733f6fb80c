"""Scale: how run time and the emulator's own memory grow with guest size and vCPU count.

    python bench/scale.py [--sizes 1GiB,4GiB,16GiB] [--vcpus 1,4,16] [--payload-size 4GiB]

Every run is an unthrottled postcopy migration (100 Gbit/s link, time-scale 1, a random
workload, switchover after 50 ms) that must complete with its memory check passing. Guest
size runs use emulator.payload=false (a 16 GiB guest with payload would need 32 GiB of
shared memory on a 24 GiB machine); one run with payload (--payload-size) shows real bytes at
scale. "Own memory" is the largest sum, over the controller and its children, of each
process's resident memory that is not shared memory (VmRSS - RssShmem): what the emulator
costs beyond the two guest RAM segments and the published arrays.
"""

from __future__ import annotations

import argparse
import os
import threading
import time

from emu.config import load_config
from emu.controller import migrate
from emu.units import format_size, parse_size


def private_rss(pid: int) -> int:
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssShmem"):
                fields[key] = int(value.split()[0]) * 1024
    return fields.get("VmRSS", 0) - fields.get("RssShmem", 0)


def family(pid: int) -> list[int]:
    kids = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                kids += [int(x) for x in f.read().split()]
        except FileNotFoundError:
            pass
    return [pid] + [k for kid in kids for k in family(kid)]


class MemoryWatch(threading.Thread):
    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.1):
            total = 0
            for pid in family(os.getpid()):
                try:
                    if "resource_tracker" not in open(f"/proc/{pid}/cmdline").read():
                        total += private_rss(pid)
                except (FileNotFoundError, ProcessLookupError):
                    pass
            self.peak = max(self.peak, total)


def one(ram: str, vcpus: int, payload: bool) -> str:
    cfg = load_config(None, [
        f"guest.ram={ram}", f"guest.vcpus={vcpus}", f"emulator.payload={str(payload).lower()}",
        "link.bandwidth=100Gbit", "migration.max-bandwidth=1TB", "link.socket-buffer=16MiB",
        "migration.switchover-after=50ms", "emulator.time-scale=1"])
    watch = MemoryWatch()
    watch.start()
    started = time.monotonic()
    result = migrate(cfg)
    real = time.monotonic() - started
    watch.done.set()
    watch.join()
    ok = result["status"] == "completed" and result["integrity"]["ok"]
    return (f"{format_size(cfg['guest.ram']):>6}  {vcpus:5d}  {str(payload):7}  "
            f"{'ok' if ok else 'FAILED':6}  {real:8.1f}  "
            f"{result['query-migrate']['total-time'] / 1e3:8.2f}  "
            f"{result['latency']['count']:7d}  {watch.peak / 2**20:8.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1GiB,4GiB,16GiB")
    parser.add_argument("--vcpus", default="1,4,16")
    parser.add_argument("--payload-size", default="4GiB")
    args = parser.parse_args()
    print("  guest  vCPUs  payload  status  real s  emulated s  faults  own MiB")
    for size in args.sizes.split(","):
        print(one(size, 1, False), flush=True)
    for vcpus in (int(v) for v in args.vcpus.split(",")):
        print(one("1GiB", vcpus, True), flush=True)
    parse_size(args.payload_size)
    print(one(args.payload_size, 1, True), flush=True)


if __name__ == "__main__":
    main()
