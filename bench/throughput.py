"""Throughput: an unthrottled 1 GiB migration with real payload, next to a raw pipe copy of
1 GiB between two processes measured in the same run.

    python bench/throughput.py [--size 1GiB] [--chunk SIZE] [--repeat 5]

The migration is precopy only, stop-and-copy at once (switchover-after 0), with an idle guest,
over a link far faster than this machine (100 Gbit/s at time-scale 1): what is measured is how
fast the emulator's processes move pages (source -> network -> destination, checksummed, placed
in guest RAM), in real time, without the CPU time of QEMU's threads that the emulator charges
(cpu.* = 0). The ratio is pipe time / migration time (target: at least 0.5).
The machine is shared and both figures swing from run to run, so the summary compares the best
of each, and gives the median of the per-run ratios too.
"""

from __future__ import annotations

import argparse
import fcntl
import multiprocessing as mp
import os
import statistics
import time

from emu.config import KEYS, load_config
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


def settings(size: int, chunk: str | None):
    # the CPU time of QEMU's threads (cpu.*) is emulated time the run waits out: with it the
    # destination's listen thread alone (cpu.place-page + cpu.place-byte, 2.1 us a page) would
    # take 0.56 s for 1 GiB, whatever the emulator's own speed, which is what this measures
    no_qemu_cpu = [f"{key}=0" for key in KEYS if key.startswith("cpu.")]
    return load_config(None, [
        f"guest.ram={size}", "link.bandwidth=100Gbit", "migration.max-bandwidth=1TB",
        "migration.postcopy-ram=false", "migration.switchover-after=0",
        "workload.touch-cost=1s", "emulator.time-scale=1", "link.socket-buffer=16MiB",
        *no_qemu_cpu, *([f"emulator.chunk={chunk}"] if chunk else [])])


def migration(cfg) -> float:
    """Real seconds from migrate to completed (process start-up excluded)."""
    result = migrate(cfg)
    assert result["status"] == "completed", result["errors"]
    return result["query-migrate"]["total-time"] / 1e3  # emulated = real at time-scale 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1GiB")
    parser.add_argument("--chunk", help="emulator.chunk (default: the configuration's)")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    size = parse_size(args.size)
    cfg = settings(size, args.chunk)
    chunk = format_size(cfg["emulator.chunk"])
    pipes, migs = [], []
    for i in range(args.repeat):
        pipes.append(pipe_copy(size))
        migs.append(migration(cfg))
        print(f"run {i}: pipe copy {format_size(size)} in {pipes[-1]:.3f} s "
              f"({size / pipes[-1] / 1e9:.2f} GB/s); migration in {migs[-1]:.3f} s "
              f"({size / migs[-1] / 1e9:.2f} GB/s, chunk {chunk}); "
              f"ratio {pipes[-1] / migs[-1]:.2f}", flush=True)
    ratios = [p / m for p, m in zip(pipes, migs, strict=True)]
    print(f"best: pipe {min(pipes):.3f} s, migration {min(migs):.3f} s "
          f"({size / min(migs) / 1e9:.2f} GB/s), ratio {min(pipes) / min(migs):.2f}; "
          f"median ratio {statistics.median(ratios):.2f} (target: at least 0.5)")


if __name__ == "__main__":
    main()
