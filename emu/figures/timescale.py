"""emulator.time-scale = auto: the one rule that picks a time scale at which the figures are
faithful, and the measurements it rests on (docs/concepts.md, "Choosing the time scale").

The emulator's own work (Python, the scheduler, six threads in three processes) takes real
time, which counts x time-scale in emulated time: a fault's latency grows by its own cost x
the scale, and frames reach the destination late by their lag x the scale. The rule keeps
that under AIM (1%) of the latency the run will measure (the analytical model's prediction,
without the emulator's own cost), half of the FIDELITY (2%) above which a run says that its
figures are distorted:

    scale = min(AIM x latency / max(per_fault, per_frame), FRAMES_PER_S x frame / bandwidth)

clamped to [MIN_SCALE, MAX_SCALE] and rounded down to two significant figures; a frame is
one record of the background stream, emulator.chunk or the larger of 32 KiB and a host
page, whichever is smaller (emu/migration/wire.py). per_fault and
per_frame are real seconds measured on this machine, now, by a short calibration run
(calibrate(), cached for CACHE_S). The same rule judges a run afterwards: a run whose lag is
above FIDELITY of its median latency fell behind (lag_bound()), and suggest() names the
scale to use instead, from the lag that run saw.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from emu.config import AUTO, Config
from emu.migration import wire
from emu.trace import point

FIDELITY = 0.02  # the emulator's own cost may be at most this share of the latency measured
# What the rule aims at: half of FIDELITY, so that a run on a machine whose load doubles
# meanwhile (2 cores shared by many) still keeps under it.
AIM = FIDELITY / 2
LAG_FLOOR_S = 20e-6  # below this average lag the link's schedule is as good as exact
# Frames a second the relay and the destination keep up with (measured for the seed table,
# records without payload, whose cost is the frame's, not its size's; with payload
# bench/throughput.py moves twice that).
FRAMES_PER_S = 8000
MIN_SCALE = 0.01  # the slider's slowest; slower runs take hours
MAX_SCALE = 1.0  # FRAMES_PER_S was measured up to real time; faster is for watching only
CACHE_S = 600.0  # how long a calibration stands: the machine's load changes
CACHE_VERSION = 5  # 5: the calibration on design 8.0

# The calibration run, all at PROBE_SCALE: 4 KiB pages with payload, preempt, a vCPU faulting
# on the destination. First postcopy with the background capped low, so that the model's floor
# is only RTT + the page on the link (the faults' own cost); then the cap lifted, a full
# stream on main while the vCPU keeps faulting (the frames' lag, as a scenario's postcopy has
# it: the destination's vCPU thread shares the interpreter lock with the thread that reads
# the link). The real cost of a fault and of a frame grows at smaller scales (threads sleep
# deeper, and each hand-over is a wake-up: docs/benchmarks.md, "The emulator's own cost");
# measured at 0.1, in the middle of the scales the rule picks, it errs on the slow side above
# it. 4 Gbit/s at 0.1 is 50 MB a real second, what the default scenario moves at its scale.
PROBE_SCALE = 0.1
PROBE_WINDOW = 0.03  # emulated seconds of each phase
SETTLE = 0.003  # emulated seconds after the cap is lifted before frames count
CALIBRATION = [
    "guest.ram=64MiB", "emulator.payload=true", "link.bandwidth=4Gbit", "link.rtt=100us",
    "link.socket-buffer=1MiB", "migration.max-bandwidth=4Gbit",
    "migration.postcopy-preempt=true", "migration.max-postcopy-bandwidth=1MB/s",
    # 8.0's preempt: its requests go past the cap. Under 7.1's rate limiter (issue 12) each
    # would wait for the next 100 ms window: a handful of faults, and nothing measured
    "migration.design=8.0",
    "migration.switchover-after=10ms", "migration.downtime-limit=1ms",
    "workload.pattern=random", "workload.touch-cost=5us", f"emulator.time-scale={PROBE_SCALE}",
    "emulator.duration-limit=60s",
]

# No QEMU names here: QEMU runs in real time and has nothing like it.
TRACE_CALIBRATED = point("timescale_calibrated")
TRACE_CHOSEN = point("timescale_chosen")


@dataclass(frozen=True)
class Cost:
    """The emulator's own real time on this machine: per fault (beyond the link's delays),
    and the average lag of a frame under a full stream."""

    per_fault: float  # real seconds
    per_frame: float  # real seconds
    measured: float = 0.0  # time.time() of the calibration; 0 = not measured here

    @property
    def largest(self) -> float:
        """What the rule keeps small, each on its own: a fault's latency grows by per_fault x
        scale (which holds its own page's lag), the lag the run reports by per_frame x scale;
        a full stream's extra lag on a fault's page is at most the second again."""
        return max(self.per_fault, self.per_frame)


# calibrate() on the 2-core development VM, shared (load 5), 2026-12-01: 0.8 to 1.7 ms a
# fault, 0.2 to 0.7 ms a frame (docs/benchmarks.md). What the rule uses when it may not run a
# calibration (the window, `predict`) and no fresh one is cached.
REFERENCE = Cost(per_fault=1.0e-3, per_frame=0.5e-3)


@dataclass(frozen=True)
class Choice:
    """What auto chose, and why: `limit` is the bound that decided (cost, frames, slowest,
    real-time or no-faults)."""

    scale: float
    latency: float | None  # the model's mean latency without the emulator's cost, seconds
    cost: Cost
    limit: str

    @property
    def share(self) -> float | None:
        """The emulator's own cost at this scale, as a share of the latency."""
        return self.cost.largest * self.scale / self.latency if self.latency else None

    def to_json(self) -> dict:
        return {"scale": self.scale, "limit": self.limit,
                "latency-us": None if self.latency is None else round(self.latency * 1e6, 1),
                "cost-per-fault-us": round(self.cost.per_fault * 1e6, 1),
                "cost-per-frame-us": round(self.cost.per_frame * 1e6, 1),
                "own-share": None if self.share is None else round(self.share, 4)}


def round_down(scale: float) -> float:
    """Two significant figures, never up: a rounded scale still keeps the bound."""
    step = 10.0 ** (math.floor(math.log10(scale)) - 1)
    return float(f"{math.floor(scale / step + 1e-9) * step:.3g}")


def choose(latency: float | None, frames_per_s: float, cost: Cost) -> tuple[float, str]:
    """The rule: the largest scale at which cost.largest x scale stays under AIM of
    *latency* (seconds; None: no faults to measure), and the link's *frames_per_s* (emulated)
    come no faster than FRAMES_PER_S real. Returns (scale, the bound that decided)."""
    bounds = {"real-time": MAX_SCALE, "frames": FRAMES_PER_S / frames_per_s}
    if latency is not None:
        bounds["cost"] = AIM * latency / max(cost.largest, 1e-9)
    limit = min(bounds, key=bounds.get)
    if bounds[limit] < MIN_SCALE:
        return MIN_SCALE, "slowest"
    return round_down(bounds[limit]), limit


def predicted_latency(cfg: Config) -> float | None:
    """The model's mean fault latency for *cfg* without the emulator's own cost, seconds;
    None when the scenario has no page faults (precopy only)."""
    from emu.figures import model

    numeric = cfg.with_overrides(["emulator.time-scale=1"])  # software_cost=0: no scale in it
    try:
        return model.predict(numeric, software_cost=0.0)["latency-us"] * 1e-6
    except model.ModelError:
        return None


def pick(cfg: Config, cost: Cost) -> Choice:
    """The rule for scenario *cfg* (whatever its time-scale says) on a machine of *cost*."""
    latency = predicted_latency(cfg)
    frame = min(cfg["emulator.chunk"], wire.record_pages(cfg.page_size) * wire.TARGET_PAGE)
    scale, limit = choose(latency, cfg["link.bandwidth"] / frame, cost)
    if latency is None:
        limit = "no-faults"
    if TRACE_CHOSEN.enabled:
        TRACE_CHOSEN(scale=scale, latency_us=(latency or 0) * 1e6, cost_us=cost.largest * 1e6,
                     limit=limit)
    return Choice(scale, latency, cost, limit)


def describe(choice: Choice) -> str:
    """What auto chose and why, in a sentence for the person who started the run."""
    c, ms = choice.cost, short_duration
    where = ("measured on this machine now" if c.measured else
             "as measured on the 2-core development VM")
    cost = (f"the emulator's own cost ({ms(c.per_fault)} of real time a fault, frames "
            f"{ms(c.per_frame)} late, {where}; x the scale)")
    if choice.limit == "no-faults":
        return f"{choice.scale:g} (precopy only: no page faults to measure)"
    predicted = f"{choice.share:.2%} of the {ms(choice.latency)} the model predicts"
    if choice.limit == "frames":
        return (f"{choice.scale:g}, as fast as the relay keeps up with the link's frames "
                f"({FRAMES_PER_S} a real second); {cost} is then {predicted}")
    if choice.limit == "slowest":
        return (f"{choice.scale:g}, the slowest it takes: {cost} is still {predicted}, more "
                f"than the {AIM:.0%} it aims at: the figures are that much too high")
    limit = " (real time)" if choice.limit == "real-time" else ""
    return f"{choice.scale:g}{limit}, so that {cost} stays under {AIM:.0%}: {predicted}"


def short_duration(seconds: float) -> str:
    """Three significant figures: "1.72 s", "50 ms", "1.22 ms", "850 us"."""
    if seconds >= 1:
        return f"{seconds:.3g} s"
    return f"{seconds * 1e3:.3g} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.3g} us"


def is_auto(cfg: Config) -> bool:
    return cfg["emulator.time-scale"] == AUTO


def resolve(cfg: Config, measure: bool = True) -> tuple[Config, Choice | None]:
    """*cfg* with a number for emulator.time-scale: its own, or auto's choice (then the Choice
    too). measure=False never runs a calibration: a fresh cached one, else REFERENCE."""
    if not is_auto(cfg):
        return cfg, None
    choice = pick(cfg, machine_cost() if measure else known_cost())
    return cfg.with_overrides([f"emulator.time-scale={choice.scale}"]), choice


def numeric_scale(cfg: Config, default: float = 1.0) -> float:
    """The scale as a number, auto read as *default*: for programs that cannot calibrate in
    agreement with each other (the standalone source, destination and link run in real
    time, as two QEMUs do)."""
    return default if is_auto(cfg) else cfg["emulator.time-scale"]


# ---- judging a run afterwards ----

def lag_bound(latency: float) -> float:
    """The largest average lag (emulated s) that leaves latencies of *latency* faithful."""
    return max(LAG_FLOOR_S, FIDELITY * latency)


def suggest(scale: float, lag: float, latency: float | None, frames_per_s: float,
            cost: Cost | None = None) -> float:
    """The scale to use instead, for a run at *scale* whose frames came *lag* (emulated s) late
    on average with latencies of *latency*: the rule, with that run's own lag per frame in
    real time and the machine's per-fault cost; never above half of *scale*."""
    cost = cost or known_cost()
    seen = Cost(cost.per_fault, max(cost.per_frame, lag / scale))
    suggested, _ = choose(latency, frames_per_s, seen)
    return min(suggested, round_down(scale / 2)) if scale / 2 >= MIN_SCALE else MIN_SCALE


# ---- calibration ----

def cache_path() -> Path:
    from emu.qemu.guest import cache_dir

    return cache_dir() / "timescale.json"


def known_cost() -> Cost:
    """The last calibration if it is fresh, else REFERENCE; never runs one."""
    return cached_cost() or REFERENCE


def machine_cost() -> Cost:
    """This machine's cost now: the cached calibration if fresh, else a new one (about a
    second), cached."""
    cost = cached_cost()
    if cost is None:
        cost = calibrate()
        _store(cost)
    return cost


def cached_cost() -> Cost | None:
    """The last calibration, if it is younger than CACHE_S."""
    try:
        data = json.loads(cache_path().read_text())
        if data.pop("version") != CACHE_VERSION:
            return None
        cost = Cost(**data)
    except (OSError, ValueError, TypeError, KeyError):
        return None
    return cost if 0 <= time.time() - cost.measured < CACHE_S else None


def _store(cost: Cost) -> None:
    """Write the cache by rename, so a reader never sees half a file."""
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        part = path.with_name(f"{path.name}.{os.getpid()}")
        part.write_text(json.dumps({"version": CACHE_VERSION, **asdict(cost)}))
        part.replace(path)
    except OSError:
        pass  # a cache that can not be written: the next run calibrates again


def calibrate() -> Cost:
    """Run the CALIBRATION scenario for about two seconds: the faults' own cost with an idle
    main (latency minus the model's floor), then the frames' lag under a full stream, in
    real time."""
    from emu.config import load_config
    from emu.controller import Run

    cfg = load_config(None, CALIBRATION)
    with Run(cfg) as run:
        _lag_after(run, lambda: run.postcopy_start is not None)
        start = run.clock.now()
        _lag_after(run, lambda: run.clock.now() >= start + PROBE_WINDOW)
        faults, _ = run.faults(0)
        run.command("source", "migrate-set-parameters", {"max-postcopy-bandwidth": 0})
        full = run.clock.now() + SETTLE
        before = _lag_after(run, lambda: run.clock.now() >= full)
        after = _lag_after(run, lambda: run.clock.now() >= full + PROBE_WINDOW)
    frames, lag_sum = after[0] - before[0], after[1] - before[1]
    idle = faults[(faults["time"] >= start) & (faults["time"] < full - SETTLE)]
    latency = np.sort(idle[idle["channel"] == 1]["latency"])
    if frames < 2 or not len(latency):
        raise RuntimeError(f"the time-scale calibration measured nothing: {run.errors}")
    # Without the worst frame and the slowest 5% of faults: one stall of this machine (another
    # program's burst) would otherwise set every run's scale for CACHE_S.
    worst = after[2] if after[2] > before[2] else 0.0  # the window's own worst frame, if any
    per_frame = max(0.0, lag_sum - worst) / (frames - 1) / PROBE_SCALE
    typical = latency[:max(1, math.ceil(0.95 * len(latency)))]
    per_fault = max(0.0, float(typical.mean()) - predicted_latency(cfg)) / PROBE_SCALE
    cost = Cost(per_fault, per_frame, time.time())
    if TRACE_CALIBRATED.enabled:
        TRACE_CALIBRATED(per_fault_us=per_fault * 1e6, per_frame_us=cost.per_frame * 1e6,
                         faults=len(latency), frames=int(frames))
    return cost


def _lag_after(run, condition) -> tuple[float, float, float]:
    """Poll *run* until *condition*; then the destination's frames, their summed lag and the
    largest lag of one."""
    while not condition() and not run.finished:
        run.poll(timeout=0.005)
    dst = run.board("destination")
    return dst["rx-frames"], dst["rx-lag-sum"], dst["rx-lag-max"]
