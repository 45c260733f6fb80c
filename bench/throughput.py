"""Throughput: an unthrottled 1 GiB migration with real payload, next to a raw pipe copy of
1 GiB between two processes measured in the same run.

    python bench/throughput.py [--size 1GiB] [--chunk 32KiB] [--repeat 3]

The migration is precopy only, stop-and-copy at once (switchover-after 0), with an idle guest,
over a link far faster than this machine (100 Gbit/s at time-scale 1): what is measured is how
fast the emulator's processes move pages (source -> network -> destination, checksummed, placed
in guest RAM), in real time. The ratio is pipe time / migration time (target: at least 0.5).
"""

from __future__ import annotations

import argparse
import fcntl
import multiprocessing as mp
import os
import time

from emu.config import load_config
from emu.controller import migrate
from emu.units import format_size, parse_size

F_SETPIPE_SZ = 1031
BLOCK = 1 << 20


def _writer(fd: int, size: int) -> None:
    buf = memoryview(bytearray(os.urandom(BLOCK)))
    for _ in range(size // BLOCK):
        view = buf
        while view:
            view = view[os.write(fd, view):]
    os.close(fd)


def pipe_copy(size: int) -> float:
    """Seconds to move `size` bytes from one process to another through a 1 MiB pipe."""
    r, w = os.pipe()
    fcntl.fcntl(w, F_SETPIPE_SZ, BLOCK)
    proc = mp.get_context("fork").Process(target=_writer, args=(w, size))
    sink = bytearray(BLOCK)
    started = time.perf_counter()
    proc.start()
    os.close(w)
    got = 0
    with os.fdopen(r, "rb", buffering=0) as f:
        while n := f.readinto(sink):
            got += n
    elapsed = time.perf_counter() - started
    proc.join()
    assert got == size, got
    return elapsed


def migration(size: int, chunk: str) -> float:
    """Real seconds from migrate to completed (process start-up excluded)."""
    cfg = load_config(None, [
        f"guest.ram={size}", "link.bandwidth=100Gbit", "migration.max-bandwidth=1TB",
        "migration.postcopy-ram=false", "migration.switchover-after=0",
        "workload.touch-cost=1s", "emulator.time-scale=1", f"emulator.chunk={chunk}",
        "link.socket-buffer=16MiB"])
    result = migrate(cfg)
    assert result["status"] == "completed", result["errors"]
    return result["query-migrate"]["total-time"] / 1e3  # emulated = real at time-scale 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1GiB")
    parser.add_argument("--chunk", default="32KiB")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    size = parse_size(args.size)
    for i in range(args.repeat):
        pipe = pipe_copy(size)
        mig = migration(size, args.chunk)
        print(f"run {i}: pipe copy {format_size(size)} in {pipe:.3f} s "
              f"({size / pipe / 1e9:.2f} GB/s); migration in {mig:.3f} s "
              f"({size / mig / 1e9:.2f} GB/s, chunk {args.chunk}); ratio {pipe / mig:.2f}",
              flush=True)


if __name__ == "__main__":
    main()
