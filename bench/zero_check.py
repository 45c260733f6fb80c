"""What the source's zero-page check costs per 4 KiB page (ram_save.zero_pages, QEMU's
buffer_is_zero()), in real time, next to what a record costs the source anyway.

The check runs on every record the source writes with emulator.payload, on emulator.chunk
bytes at once (32 pages by default). Populated pages are told apart by their first and last
words; a zero page is read in full. Prints microseconds per page for each kind of record.

    python bench/zero_check.py [--chunk-pages 32] [--repeat 2000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this tree's emu

from emu.board import Board  # noqa: E402
from emu.migration.ram import TARGET_PAGE, stamp  # noqa: E402
from emu.migration.ram_save import RecordWriter, zero_pages  # noqa: E402
from emu.migration.source import FIELDS  # noqa: E402

WORDS = TARGET_PAGE // 8


def per_page_us(fn, pages: int, repeat: int) -> float:
    best = float("inf")
    for _ in range(5):  # the best of five: the machine is shared
        t0 = time.perf_counter()
        for _ in range(repeat):
            fn()
        best = min(best, time.perf_counter() - t0)
    return best / repeat / pages * 1e6


class NullEndpoint:
    """A channel that takes records and does nothing: what is left is the source's own cost."""

    def send(self, parts, virt: int = 0, more: bool = False) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunk-pages", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=2000)
    args = parser.parse_args()
    n, repeat = args.chunk_pages, args.repeat
    ram = np.zeros((4 * n, TARGET_PAGE), np.uint8)
    stamp(ram[:n])  # populated
    ram[2 * n:3 * n:2, 0] = 1  # every other page written by a vCPU, the rest zero
    words = ram.view(np.uint64).reshape(-1, WORDS)
    writer = RecordWriter(memoryview(ram).cast("B"), Board(FIELDS))
    ep = NullEndpoint()
    print(f"a record of {n} pages, us per 4 KiB page (best of 5 x {repeat}):")
    print(f"  {'pages':10s} {'zero check':>10s} {'save_pages':>10s} {'as before':>10s}")
    for i, name in enumerate(("populated", "zero", "mixed")):
        offset = i * n * TARGET_PAGE
        check = per_page_us(lambda c=words[i * n:(i + 1) * n]: zero_pages(c), n, repeat)
        save = per_page_us(lambda o=offset: writer.save_pages(ep, o, n, "precopy-bytes", True),
                           n, repeat)
        normal = per_page_us(
            lambda o=offset: writer.save_normal_page(ep, o, n, "precopy-bytes", True), n, repeat)
        print(f"  {name:10s} {check:10.3f} {save:10.3f} {normal:10.3f}")
    print("zero check: ram_save.zero_pages; save_pages: the check, the split and the records "
          "(to a channel that does nothing); as before: one normal record, no check")


if __name__ == "__main__":
    main()
