"""postcopy-emu bench seed-table: the postcopy-preempt series' latency table, emulated.

Nine cells: host page size (4K, 2M, 1G) x mode (vanilla, preempt with break-huge off,
preempt), all from ONE preset, assets/scenarios/seed-10g.toml. Only the page size and the mode
change from cell to cell; the time scale is the emulator's, not the scenario's, and is chosen
by one rule for every cell (emu/figures/timescale.py, as `time-scale = auto` is). Each cell
runs a migration and measures the faults of a window of postcopy (a 20 GiB guest at 10
Gbit/s takes 17 s of emulated time to migrate; the latency is the same all along), next to
the seed's figure and the model's.
"""

from __future__ import annotations

import json
import platform
import sys
import time

import numpy as np

from emu.config import Config, load_config
from emu.controller import Run
from emu.figures import metrics, model, timescale

PRESET = "seed-10g"
PAGES = {"4K": "4KiB", "2M": "2MiB", "1G": "1GiB"}
MODES = {
    "vanilla": ["migration.postcopy-preempt=false"],
    "preempt-no-break-huge": ["migration.postcopy-preempt=true",
                              "migration.x-postcopy-preempt-break-huge=false"],
    "preempt": ["migration.postcopy-preempt=true",
                "migration.x-postcopy-preempt-break-huge=true"],
}
# The cover letter of the series' v2, average page-request latency in ms.
SEED_MS = {
    ("4K", "vanilla"): 10.68, ("4K", "preempt-no-break-huge"): None, ("4K", "preempt"): 0.57,
    ("2M", "vanilla"): 10.58, ("2M", "preempt-no-break-huge"): 5.49, ("2M", "preempt"): 5.02,
    ("1G", "vanilla"): 2046.65, ("1G", "preempt-no-break-huge"): 933.185,
    ("1G", "preempt"): 649.445,
}
# Real seconds of postcopy measured per cell (1G pages take ~1 s of emulated time per fault).
WINDOW = {"quick": {"4K": 10, "2M": 10, "1G": 18}, "full": {"4K": 50, "2M": 50, "1G": 110}}


def cell_config(page: str, mode: str, cost: timescale.Cost | None = None) -> Config:
    """The preset with the cell's page size and mode, at the time scale the one rule
    (emu/figures/timescale.py) picks for it on a machine of *cost* (default: measured now)."""
    return scaled(load_config(PRESET, [f"guest.page-size={PAGES[page]}", *MODES[mode]]), cost)


def scaled(cfg: Config, cost: timescale.Cost | None = None) -> Config:
    """*cfg* at the time scale the one rule picks for it on a machine of *cost* (default:
    measured now): every cell of a table by the same rule."""
    choice = timescale.pick(cfg, cost or timescale.machine_cost())
    return cfg.with_overrides([f"emulator.time-scale={choice.scale}"])


def measure(cfg: Config, window_real: float) -> dict:
    """Run the migration for window_real real seconds of postcopy; the faults it saw."""
    started = time.monotonic()
    with Run(cfg) as run:
        while run.postcopy_start is None:
            run.poll()
            if run.finished:
                raise RuntimeError(f"the migration ended before postcopy: {run.errors}")
        until = run.postcopy_start + window_real * cfg["emulator.time-scale"]
        while run.clock.now() < until and not run.finished:
            run.poll()
        faults, _ = run.faults(0)
        dst = run.board("destination")
    lag_us = dst["rx-lag-sum"] / max(dst["rx-frames"], 1) * 1e6
    return {"faults": faults, "lag-avg-us": round(lag_us, 1),
            "real-time-s": round(time.monotonic() - started, 1)}


def run_cell(page: str, mode: str, quick: bool, cost: timescale.Cost | None = None) -> dict:
    cfg = cell_config(page, mode, cost)
    got = measured(cfg, WINDOW["quick" if quick else "full"][page])
    ms = {key: (None if got[key] is None else round(got[key] / 1e3, 3))
          for key in ("emulated-us", "model-us", "p50-us")}
    return {
        "page-size": page,
        "mode": mode,
        "seed-ms": SEED_MS[(page, mode)],
        "emulated-ms": ms["emulated-us"],
        "model-ms": ms["model-us"],
        "samples": got["samples"],
        "p50-ms": ms["p50-us"],
        **{key: got[key] for key in ("dist", "time-scale", "lag-avg-us", "real-time-s")},
    }


def measured(cfg: Config, window_real: float) -> dict:
    """One cell: the mean latency of the faults of window_real real seconds of postcopy and
    the model's for *cfg*, in us, with the samples, the median and the distribution."""
    got = measure(cfg, window_real)
    lat = got["faults"]["latency"]
    summary = metrics.summarize(lat)
    return {
        "emulated-us": round(float(lat.mean()) * 1e6, 1) if len(lat) else None,
        "model-us": round(model.predict(cfg)["latency-us"], 1),
        "samples": int(len(lat)),
        "p50-us": summary["p50-us"],
        "dist": summary["dist"],
        "time-scale": cfg["emulator.time-scale"],
        "lag-avg-us": got["lag-avg-us"],
        "real-time-s": got["real-time-s"],
    }


def ratios(cells: list[dict]) -> dict:
    """vanilla / preempt per page size: the emulator's, the model's and the seed's."""
    out = {}
    by = {(c["page-size"], c["mode"]): c for c in cells}
    for page in PAGES:
        van, pre = by.get((page, "vanilla")), by.get((page, "preempt"))
        if not van or not pre:
            continue
        out[page] = {
            key: (round(van[key] / pre[key], 2) if van[key] and pre[key] else None)
            for key in ("seed-ms", "emulated-ms", "model-ms")
        }
    return out


def table(cells: list[dict]) -> str:
    lines = ["page  mode                    seed ms   emulated ms (n)        model ms  scale",
             "----  ---------------------  --------  ----------------------  --------  -----"]
    for c in cells:
        seed = f"{c['seed-ms']:8.2f}" if c["seed-ms"] is not None else "     n/a"
        emu = f"{c['emulated-ms']:10.3f}" if c["emulated-ms"] is not None else "         -"
        lines.append(f"{c['page-size']:<4}  {c['mode']:<21}  {seed}  {emu} ({c['samples']:>5})"
                     f"        {c['model-ms']:8.3f}  {c['time-scale']:g}")
    lines.append("")
    for page, r in ratios(cells).items():
        lines.append(f"{page} vanilla/preempt: seed {r['seed-ms']}x, emulated "
                     f"{r['emulated-ms']}x, model {r['model-ms']}x")
    return "\n".join(lines)


def main(quick: bool, as_json: bool) -> int:
    cells = []
    started = time.monotonic()
    cost = timescale.machine_cost()  # once: every cell's scale from the same measurement
    if not as_json:
        print(f"  the emulator's own cost here: {timescale.short_duration(cost.per_fault)} a "
              f"fault, frames {timescale.short_duration(cost.per_frame)} late (real time)",
              file=sys.stderr, flush=True)
    for page in PAGES:
        for mode in MODES:
            cells.append(run_cell(page, mode, quick, cost))
            if not as_json:
                c = cells[-1]
                print(f"  {page} {mode}: {c['emulated-ms']} ms over {c['samples']} faults "
                      f"({c['real-time-s']} s)", file=sys.stderr, flush=True)
    result = {
        "preset": PRESET,
        "quick": quick,
        "cells": cells,
        "ratios": ratios(cells),
        "emulator-cost-us": {"per-fault": round(cost.per_fault * 1e6, 1),
                             "per-frame": round(cost.per_frame * 1e6, 1)},
        "real-time-s": round(time.monotonic() - started, 1),
        "machine": f"{platform.machine()}, {platform.python_implementation()} "
                   f"{platform.python_version()}, numpy {np.__version__}",
    }
    print(json.dumps(result, indent=1) if as_json else table(cells))
    return 0
