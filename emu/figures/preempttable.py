"""postcopy-emu bench preempt-full-table: the preempt-full series' latency figures, emulated.

Six cells: write pattern (random, sequential) x mode (vanilla; preempt, as QEMU 7.1 sends urgent
pages from the migration thread; preempt-full, QEMU 8.0's return-path thread sending them), all
from ONE preset, assets/scenarios/preempt-full-10g.toml, the series' setup. Only the pattern,
the capability and migration.design change from cell to cell; the time scale is picked by the
one rule for every cell, and each cell is measured as `bench seed-table` measures its cells
(emu/figures/seedtable.py), next to the published figure and the model's.
"""

from __future__ import annotations

import json
import sys
import time

from emu.config import Config, load_config
from emu.figures import seedtable, timescale

PRESET = "preempt-full-10g"
PATTERNS = ("random", "sequential")
MODES = {
    "vanilla": ["migration.postcopy-preempt=false", "migration.design=7.1"],
    "preempt": ["migration.postcopy-preempt=true", "migration.design=7.1"],
    "preempt-full": ["migration.postcopy-preempt=true", "migration.design=8.0"],
}
# "[PATCH RFC 00/13] migration: Postcopy Preempt-Full" (Peter Xu, qemu-devel, 29 Aug 2022),
# average page request latency in us. Its three sequential tables are titled vanilla,
# preempt-full, preempt-full: the middle one (1582 us) is the 7.1 preempt run, by the order of
# the random tables and the text ("such workload may not benefit much from preempt mode ...
# surprisingly ... the preempt-full mode can also benefit sequential access patterns": 439 us).
PUBLISHED_US = {
    ("random", "vanilla"): 12093, ("random", "preempt"): 496, ("random", "preempt-full"): 229,
    ("sequential", "vanilla"): 1487, ("sequential", "preempt"): 1582,
    ("sequential", "preempt-full"): 439,
}
# The same letter's bpftrace histograms (@delay_us), in latency_dist's layout: bucket N counts
# [2^N, 2^(N+1)) us, bucket 0 everything below 2 us (the letter's [0] and [1] rows).
PUBLISHED_DIST = {
    ("random", "vanilla"): [1, 0, 0, 0, 1, 8, 11, 14, 19, 14, 35, 18, 87, 2397, 7, 2, 20, 6],
    ("random", "preempt"): [0, 0, 0, 0, 0, 2, 2306, 25422, 8238, 1066, 2167, 3329, 109, 48],
    ("random", "preempt-full"): [0, 0, 0, 1, 3, 2, 11956, 60403, 15047, 846, 25, 41, 131, 72,
                                 2, 8, 6],
    ("sequential", "vanilla"): [2013, 504, 2234, 4199, 3782, 1016, 81, 14, 26, 69, 208, 429,
                                2779, 792, 9],
    ("sequential", "preempt"): [1831, 423, 1903, 2933, 3132, 518, 30, 218, 214, 211, 131, 336,
                                3023, 479],
    ("sequential", "preempt-full"): [1061, 179, 1079, 2251, 2345, 713, 5386, 30252, 10789, 367,
                                     26, 256, 1840, 300],
}
# Two modes the histograms show, as shares of the faults: under 64 us, a page already on its
# way when the vCPU touched it (less than any round trip of the 10 Gbit/s NIC: no request
# served it); 4 ms and more, a page behind (most of) main's backlog of socket buffers.
ON_ITS_WAY_BUCKETS = 6  # buckets 0-5: [0, 64) us
BEHIND_MAIN_BUCKET = 12  # buckets 12 and up: [4096 us, ...)


def shares(dist: list[int]) -> dict:
    """The share of a log2 histogram's faults on their way (< 64 us) and behind main
    (>= 4 ms), rounded to 0.001; None for an empty one."""
    total = sum(dist)
    if not total:
        return {"on-its-way": None, "behind-main": None}
    return {"on-its-way": round(sum(dist[:ON_ITS_WAY_BUCKETS]) / total, 3),
            "behind-main": round(sum(dist[BEHIND_MAIN_BUCKET:]) / total, 3)}


def published(pattern: str, mode: str) -> dict:
    """What the letter gives of a cell: its mean, its samples, their shares, and how long its
    one writer (mig_mon's mm_dirty is single-threaded) was blocked in all: samples x mean, a
    lower bound on how long that postcopy lasted."""
    dist = PUBLISHED_DIST[(pattern, mode)]
    us = PUBLISHED_US[(pattern, mode)]
    return {"published-us": us, "published-samples": sum(dist),
            "published-blocked-s": round(sum(dist) * us / 1e6, 1),
            "published-shares": shares(dist)}


WINDOW = {"quick": 6, "full": 30}  # real seconds of postcopy measured per cell


def cell_config(pattern: str, mode: str, cost: timescale.Cost | None = None,
                sets: tuple[str, ...] = ()) -> Config:
    """The preset with the cell's pattern and mode (then `sets`), at the one rule's scale."""
    cfg = load_config(PRESET, [f"workload.pattern={pattern}", *MODES[mode], *sets])
    return seedtable.scaled(cfg, cost)


def run_cell(pattern: str, mode: str, window: float, cost: timescale.Cost | None = None,
             sets: tuple[str, ...] = ()) -> dict:
    got = seedtable.measured(cell_config(pattern, mode, cost, sets), window)
    return {"pattern": pattern, "mode": mode, **published(pattern, mode), **got,
            "shares": shares(got["dist"])}


def checks(cells: list[dict]) -> dict:
    """Per pattern: each cell's emulated / published ratio, and whether the three modes come
    in the published order."""
    out = {}
    for pattern in PATTERNS:
        row = [c for c in cells if c["pattern"] == pattern]
        if not row:
            continue
        ratio = {c["mode"]: round(c["emulated-us"] / c["published-us"], 2)
                 if c["emulated-us"] else None for c in row}
        published = sorted(row, key=lambda c: c["published-us"])
        emulated = sorted(row, key=lambda c: c["emulated-us"] or float("inf"))
        out[pattern] = {"ratio": ratio,
                        "order-as-published": [c["mode"] for c in published]
                        == [c["mode"] for c in emulated]}
    return out


def _pct(share: float | None) -> str:
    return "   -" if share is None else f"{share * 100:3.0f}%"


def table(cells: list[dict]) -> str:
    """One line a cell; the shares are published / emulated (< 64 us: on its way, >= 4 ms:
    behind main's backlog)."""
    lines = ["pattern     mode           published us (n)  emulated us (n)      model us  scale"
             "  <64us pub/emu  >=4ms pub/emu",
             "----------  -------------  -----------------  -------------------  --------  -----"
             "  -------------  -------------"]
    for c in cells:
        emu = f"{c['emulated-us']:9.1f}" if c["emulated-us"] is not None else "        -"
        pub, got = c["published-shares"], c["shares"]
        lines.append(f"{c['pattern']:<10}  {c['mode']:<13}  {c['published-us']:6} "
                     f"({c['published-samples']:>7})  {emu} ({c['samples']:>6})  "
                     f"{c['model-us']:8.1f}  {c['time-scale']:<5g}  "
                     f"{_pct(pub['on-its-way'])} / {_pct(got['on-its-way'])}    "
                     f"{_pct(pub['behind-main'])} / {_pct(got['behind-main'])}")
    lines.append("")
    for pattern, check in checks(cells).items():
        ratios = ", ".join(f"{m} {r}x" for m, r in check["ratio"].items())
        order = "as published" if check["order-as-published"] else "NOT as published"
        lines.append(f"{pattern}: emulated/published {ratios}; order {order}")
    return "\n".join(lines)


def main(quick: bool, as_json: bool, window: float | None = None,
         sets: tuple[str, ...] = (), patterns: tuple[str, ...] = PATTERNS) -> int:
    """The table; `window`, `sets` and `patterns` make a smaller one (tests)."""
    started = time.monotonic()
    window = window or WINDOW["quick" if quick else "full"]
    cost = timescale.machine_cost()  # once: every cell's scale from the same measurement
    cells = []
    for pattern in patterns:
        for mode in MODES:
            cells.append(run_cell(pattern, mode, window, cost, sets))
            if not as_json:
                c = cells[-1]
                print(f"  {pattern} {mode}: {c['emulated-us']} us over {c['samples']} faults "
                      f"({c['real-time-s']} s)", file=sys.stderr, flush=True)
    result = {"preset": PRESET, "quick": quick, "cells": cells, "checks": checks(cells),
              "real-time-s": round(time.monotonic() - started, 1)}
    print(json.dumps(result, indent=1) if as_json else table(cells))
    return 0
