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
# "[PATCH RFC 00/13] migration: Postcopy Preempt-Full" (Peter Xu, 29 Aug 2022), average page
# request latency in us. Its sequential tables are titled vanilla, preempt-full, preempt-full:
# the second is the 7.1 preempt run, by the order of the random ones and the text.
PUBLISHED_US = {
    ("random", "vanilla"): 12093, ("random", "preempt"): 496, ("random", "preempt-full"): 229,
    ("sequential", "vanilla"): 1487, ("sequential", "preempt"): 1582,
    ("sequential", "preempt-full"): 439,
}
WINDOW = {"quick": 6, "full": 30}  # real seconds of postcopy measured per cell


def cell_config(pattern: str, mode: str, cost: timescale.Cost | None = None,
                sets: tuple[str, ...] = ()) -> Config:
    """The preset with the cell's pattern and mode (then `sets`), at the one rule's scale."""
    cfg = load_config(PRESET, [f"workload.pattern={pattern}", *MODES[mode], *sets])
    return seedtable.scaled(cfg, cost)


def run_cell(pattern: str, mode: str, window: float, cost: timescale.Cost | None = None,
             sets: tuple[str, ...] = ()) -> dict:
    got = seedtable.measured(cell_config(pattern, mode, cost, sets), window)
    return {"pattern": pattern, "mode": mode, "published-us": PUBLISHED_US[(pattern, mode)],
            **got}


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


def table(cells: list[dict]) -> str:
    lines = ["pattern     mode           published us  emulated us (n)        model us  scale",
             "----------  -------------  ------------  ---------------------  --------  -----"]
    for c in cells:
        emu = f"{c['emulated-us']:11.1f}" if c["emulated-us"] is not None else "          -"
        lines.append(f"{c['pattern']:<10}  {c['mode']:<13}  {c['published-us']:12}  {emu} "
                     f"({c['samples']:>6})  {c['model-us']:8.1f}  {c['time-scale']:g}")
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
