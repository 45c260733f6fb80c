"""postcopy-emu sweep: one scenario, one or two keys over lists of values, a run per point.

Every point is a whole migration (emu.controller.migrate) of the base scenario with the
point's values on top, at its own time scale: emulator.time-scale=auto picks one per point by
the one rule (emu/figures/timescale.py) from a single calibration, as `bench seed-table` does.
Each finished point is appended to a state file (JSON lines) in the output directory at once,
so that an interrupted sweep keeps what it measured and the same command resumes it: a point
already in the state file, for the same base scenario, is not run again.

Everything here is Qt-free; the plot is gui/_qt/sweep_plot.py, imported by the command.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from emu import signals
from emu.config import KEYS, Config, ConfigError, load_config, parse_value
from emu.figures import model, timescale

MAX_KEYS = 2  # a table and a plot: the first key along x, one line per value of the second
STATE_NAME = "sweep-state.jsonl"
CSV_NAME = "sweep.csv"
PNG_NAME = "sweep.png"
STATE_VERSION = 1
VARY_EXAMPLE = "e.g. --vary guest.vcpus=1,4,16"


@dataclass(frozen=True)
class Vary:
    """One swept key and its values, each as config.py writes it ("16MiB", "true")."""

    key: str
    values: tuple[str, ...]


def parse_vary(text: str) -> Vary:
    """--vary "section.key=V1,V2,...": each value parsed and checked by emu/config.py on its
    own (a bad one is a ConfigError naming it) and written back as config.py shows it, so that
    16777216 and 16MiB are the same point."""
    key, sep, values = text.partition("=")
    key = key.strip()
    raw = [v.strip() for v in values.split(",")] if sep else []
    if not sep or "." not in key or not all(raw):
        raise ConfigError(f"--vary {text!r}: expected section.key=VALUE,VALUE,..., "
                          f"{VARY_EXAMPLE}")
    shown = []
    for value in raw:
        try:
            # alone: a value that needs another key set (x-preempt-channels=2 needs preempt)
            # is checked with the scenario's own keys, point by point (points())
            parsed = parse_value(key, value)
        except ConfigError as err:
            raise ConfigError(f"--vary {key}: {err}") from None
        shown.append(KEYS[key].show(parsed))
    repeated = sorted({v for v in shown if shown.count(v) > 1})
    if repeated:
        raise ConfigError(f"--vary {key}: {', '.join(repeated)} given twice")
    return Vary(key, tuple(shown))


def parse_varies(texts: Sequence[str]) -> list[Vary]:
    if not texts:
        raise ConfigError(f"sweep: give one or two --vary, {VARY_EXAMPLE}")
    if len(texts) > MAX_KEYS:
        raise ConfigError(f"sweep: at most {MAX_KEYS} --vary (got {len(texts)})")
    varies = [parse_vary(text) for text in texts]
    if len({v.key for v in varies}) < len(varies):
        raise ConfigError(f"--vary {varies[0].key}: given twice; list its values in one --vary")
    return varies


@dataclass(frozen=True)
class Point:
    """One run of the sweep: the varied keys' values, and the scenario it runs (its time scale
    still as given: auto is resolved just before it runs)."""

    values: dict[str, str]
    cfg: Config

    @property
    def ident(self) -> tuple[tuple[str, str], ...]:
        return tuple(self.values.items())

    def label(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.values.items())


@dataclass
class Plan:
    varies: list[Vary]
    base: Config
    points: list[Point]

    @property
    def keys(self) -> list[str]:
        return [v.key for v in self.varies]

    @property
    def signature(self) -> str:
        """The base scenario, whatever the arguments that made it: a rerun resumes when this
        is the same (a scenario file edited meanwhile is another base)."""
        text = json.dumps(self.base.to_json(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def plan(scenario: str | None, sets: Sequence[str], vary_texts: Sequence[str]) -> Plan:
    """Every point, checked before anything runs: the cartesian product of the --vary values
    (the first key outermost), each on the base scenario; a combination config.py refuses
    (guest.vcpus above guest.ram / 4KiB, say) is a ConfigError naming the point."""
    varies = parse_varies(vary_texts)
    base = load_config(scenario, sets)
    points = []
    for combo in itertools.product(*(v.values for v in varies)):
        values = dict(zip((v.key for v in varies), combo, strict=True))
        try:
            cfg = base.with_overrides([f"{k}={v}" for k, v in values.items()])
        except ConfigError as err:
            where = ", ".join(f"{k}={v}" for k, v in values.items())
            raise ConfigError(f"--vary at {where}: {err}") from None
        points.append(Point(values, cfg))
    return Plan(varies, base, points)


def outputs(out: str, csv_path: str | None, png: str | None) -> dict[str, Path]:
    """Where the state, the CSV and the plot go, checked before anything runs: a sweep of
    many minutes must not end on a directory that is not there. Makes *out*."""
    files = {"state": Path(out) / STATE_NAME, "csv": Path(csv_path or Path(out) / CSV_NAME),
             "png": Path(png or Path(out) / PNG_NAME)}
    for option, given in (("--csv", csv_path), ("--png", png)):
        if given and not Path(given).resolve().parent.is_dir():
            raise ConfigError(f"{option} {given}: no such directory")
    try:
        Path(out).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"--out {out}: {err.strerror}") from None
    return files


# ---- the state file ----

@dataclass
class State:
    """The points already measured for this plan (by ident), from the state file."""

    path: Path
    done: dict[tuple, dict] = field(default_factory=dict)
    foreign: int = 0  # lines of another base scenario, kept in the file but not used
    broken: int = 0  # lines that do not parse (a line cut by a crash), skipped


def load_state(path: Path, signature: str) -> State:
    state = State(path)
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return state
    for line in lines:
        try:
            entry = json.loads(line)
            ident = tuple((k, v) for k, v in entry["point"].items())
            if entry["version"] != STATE_VERSION or entry["base"] != signature:
                state.foreign += 1
                continue
            state.done[ident] = entry["result"]
        except (ValueError, KeyError, TypeError, AttributeError):
            state.broken += bool(line.strip())
    return state


def append_state(state: State, signature: str, point: Point, result: dict) -> None:
    """One line per finished point, written whole: a stop signal meanwhile waits for it."""
    line = json.dumps({"version": STATE_VERSION, "base": signature, "point": point.values,
                       "result": result}) + "\n"
    with signals.held():
        with state.path.open("a") as out:
            out.write(line)
            out.flush()
    state.done[point.ident] = result


# ---- one point ----

def resolve(cfg: Config, cost: Callable[[], timescale.Cost]) -> tuple[Config, bool]:
    """The point's scenario at a numeric time scale, and whether auto chose it. *cost* gives
    the machine's cost (one calibration for the whole sweep, cached)."""
    if not timescale.is_auto(cfg):
        return cfg, False
    choice = timescale.pick(cfg, cost())
    return cfg.with_overrides([f"emulator.time-scale={choice.scale}"]), True


def predicted_us(cfg: Config) -> float | None:
    """The model's mean fault latency for the point as it runs (its time scale's own cost
    included, as `predict` gives it); None without page faults (precopy only)."""
    try:
        return round(model.predict(cfg)["latency-us"], 1)
    except model.ModelError:
        return None


def row(result: dict, cfg: Config, auto: bool) -> dict:
    """What the sweep keeps of a run's report (emu/figures/report.py)."""
    lat, emu, progress = result["latency"], result["emulator"], result["progress"]
    return {
        "status": result["status"],
        "faults": lat["count"],
        "mean-us": lat["avg-us"],
        "p50-us": lat["p50-us"],
        "p99-us": lat["p99-us"],
        "max-us": lat["max-us"],
        "blocktime-ms": result["blocktime-ms"]["total"],
        "progress-per-s": progress["total"] if progress else None,
        "model-us": predicted_us(cfg),
        "time-scale": cfg["emulator.time-scale"],
        "time-scale-auto": auto,
        "keeping-up": emu["keeping-up"],
        "lag-avg-us": emu["lag-avg-us"],
        "real-time-s": emu["real-time-s"],
        "errors": result["errors"],
    }


def measure(cfg: Config, auto: bool, progress=None) -> dict:
    from emu.controller import migrate

    return row(migrate(cfg, progress), cfg, auto)


# ---- the progress bar ----

BAR = 24  # characters


class ProgressBar:
    """The sweep's progress on *stream*: a bar over the points and the real time left. Each
    point's expected time is estimate(cfg, present) (the command's own rule for a run),
    corrected by how long the points measured so far took against their estimate. On a
    terminal one line redrawn; elsewhere (a log) a line per point."""

    def __init__(self, total: int, estimate: Callable[[Config, float], float],
                 stream=None) -> None:
        self.total, self.estimate = total, estimate
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty()
        self.index, self.started, self.reached = 0, 0.0, 0.0
        self.expected: list[float] = []  # the points still to run, this one first
        self.took = self.guessed = 0.0  # of the points measured in this sweep

    @property
    def factor(self) -> float:
        return self.took / self.guessed if self.guessed else 1.0

    def start(self, index: int, point: Point, cfg: Config, later: list[Config]) -> None:
        self.index, self.point, self.cfg = index, point, cfg
        self.expected = [self.estimate(c, 0.0) for c in (cfg, *later)]
        self.started, self.reached = time.monotonic(), 0.0
        self._show(0.0, final=not self.live)

    def update(self, run) -> None:
        """migrate()'s progress callback, every half second of the run."""
        if self.live:
            present = run.board("destination")["present"] / run.cfg.npages
            # postcopy's start discards the pages dirtied since they were sent: the bar
            # does not go back for that
            self.reached = max(self.reached, min(present, 1.0))
            self._show(present)

    def done(self) -> None:
        self.took += time.monotonic() - self.started
        self.guessed += self.expected[0]
        if self.live:
            self.stream.write("\n")
            self.stream.flush()

    def _show(self, present: float, final: bool = False) -> None:
        elapsed = time.monotonic() - self.started
        this = max(self.estimate(self.cfg, present) * self.factor, 0.0)
        left = this + sum(self.expected[1:]) * self.factor
        filled = round(BAR * (self.index - 1 + self.reached) / self.total)
        head = f"sweep [{'#' * filled}{'-' * (BAR - filled)}] {self.index}/{self.total} "
        if final:  # a line per point, in a log: what it is about to take
            line = f"{head}{self.point.label()}: ~{_minutes(this)}, ~{_minutes(left)} in all\n"
        else:
            line = (f"\r{head}{self.point.label()}: {elapsed:.0f} s, ~{_minutes(this)} to go, "
                    f"~{_minutes(left)} left in all ")
        self.stream.write(line)
        self.stream.flush()


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


# ---- the sweep ----

def run(sweep: Plan, state: State, estimate: Callable[[Config, float], float],
        say: Callable[[str], None]) -> list[dict]:
    """Run the points not in *state*, appending each to it when it finishes; the table's rows
    for every point, in the plan's order. A stop signal (KeyboardInterrupt) stops the running
    point (migrate() stops its processes) and goes on up: what finished is in the state."""
    signature = sweep.signature
    cost = _once(lambda: machine_cost(say))  # the first auto point calibrates, for them all
    todo = [p for p in sweep.points if p.ident not in state.done]
    resolved = [resolve(p.cfg, cost) for p in todo]  # every scale known: the time left
    bar = ProgressBar(len(todo), estimate)
    for n, (point, (cfg, auto)) in enumerate(zip(todo, resolved, strict=True), 1):
        bar.start(n, point, cfg, [c for c, _ in resolved[n:]])
        try:
            result = measure(cfg, auto, bar.update)
        except KeyboardInterrupt:
            if bar.live:
                print(file=bar.stream)
            say(f"sweep stopped during {point.label()}; {len(state.done)} of "
                f"{len(sweep.points)} points measured are kept in {state.path}: the same "
                f"command resumes")
            raise
        bar.done()
        append_state(state, signature, point, result)
    return rows(sweep, state)


def machine_cost(say: Callable[[str], None]) -> timescale.Cost:
    """The calibration (cached), or, when it fails, the reference cost, said: one failed
    calibration must not throw away a sweep of many points."""
    try:
        return timescale.machine_cost()
    except RuntimeError as err:
        say(f"emulator.time-scale auto: {err}; using the cost measured on the 2-core "
            f"development VM instead (timescale.REFERENCE)")
        return timescale.REFERENCE


def _once(get: Callable[[], timescale.Cost]) -> Callable[[], timescale.Cost]:
    """*get* called the first time only: one calibration for every point."""
    got: list[timescale.Cost] = []

    def cost() -> timescale.Cost:
        if not got:
            got.append(get())
        return got[0]
    return cost


def rows(sweep: Plan, state: State) -> list[dict]:
    """Every measured point of the plan, in its order: its values, then its result."""
    return [{"point": p.values, **state.done[p.ident]} for p in sweep.points
            if p.ident in state.done]


# ---- table and CSV ----

COLUMNS = (  # (table header, result field, format of the table's cell)
    ("faults", "faults", "{:d}"),
    ("mean ms", "mean-us", "ms"),
    ("p50 ms", "p50-us", "ms"),
    ("p99 ms", "p99-us", "ms"),
    ("blocktime ms", "blocktime-ms", "{:.1f}"),
    ("progress /s", "progress-per-s", "{:,.0f}"),
    ("model ms", "model-us", "ms"),
    ("scale", "time-scale", "{:g}"),
    ("kept up", "keeping-up", "yesno"),
)
CSV_FIELDS = ("status", "faults", "mean-us", "p50-us", "p99-us", "max-us", "blocktime-ms",
              "progress-per-s", "model-us", "time-scale", "time-scale-auto", "keeping-up",
              "lag-avg-us", "real-time-s")


def _cell(value, form: str) -> str:
    if value is None:
        return "-"
    if form == "ms":
        return f"{value / 1e3:.3f}"
    if form == "yesno":
        return "yes" if value else "NO"
    return form.format(value)


def table(keys: list[str], measured: list[dict]) -> str:
    """The sweep as text: a row per point, numbers right-aligned; a failed point's errors
    under the table."""
    heads = [*keys, *(c[0] for c in COLUMNS)]
    cells = [[*r["point"].values(), *(_cell(r[f], form) for _, f, form in COLUMNS)]
             for r in measured]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(heads)]

    def line(items: list[str]) -> str:
        return "  ".join(s.ljust(w) if i < len(keys) else s.rjust(w)
                         for i, (s, w) in enumerate(zip(items, widths, strict=True))).rstrip()
    out = [line(heads), line(["-" * w for w in widths]), *(line(c) for c in cells)]
    for r in measured:
        if r["status"] != "completed":
            why = "; ".join(r["errors"]) or "see `postcopy-emu run` with the same settings"
            out.append(f"failed: {' '.join(f'{k}={v}' for k, v in r['point'].items())}: {why}")
    return "\n".join(out)


def write_csv(path: Path, keys: list[str], measured: list[dict]) -> None:
    with path.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow([*keys, *CSV_FIELDS])
        for r in measured:
            writer.writerow([*r["point"].values(),
                             *("" if r[f] is None else _csv_value(r[f]) for f in CSV_FIELDS)])


def _csv_value(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


# ---- what the plot draws ----

def plot_series(keys: list[str], values: list[tuple[str, ...]], measured: list[dict]) -> dict:
    """The plot's data, Qt-free: x = the first key's values (in order, evenly spaced), a
    series per value of the second key (one series without it), each with its mean, p99,
    model (ms) and guest progress (touches/s) per x, NaN where a point is missing or failed."""
    xs = list(values[0])
    lines = list(values[1]) if len(keys) > 1 else [None]
    by = {tuple(r["point"].values()): r for r in measured}
    series = []
    for second in lines:
        got = [by.get((x,) if second is None else (x, second)) for x in xs]
        ok = [r if r and r["status"] == "completed" else None for r in got]
        series.append({
            "label": None if second is None else f"{keys[1].partition('.')[2]}={second}",
            "mean-ms": [_ms(r, "mean-us") for r in ok],
            "p99-ms": [_ms(r, "p99-us") for r in ok],
            "model-ms": [_ms(r, "model-us") for r in got],
            "progress": [r["progress-per-s"] if r and r["progress-per-s"] is not None
                         else math.nan for r in ok],
        })
    return {"x-key": keys[0], "x": xs, "series": series}


def _ms(r: dict | None, name: str) -> float:
    return r[name] / 1e3 if r and r[name] is not None else math.nan


def to_json(sweep: Plan, state: State, measured: list[dict], skipped: int,
            files: dict[str, str | None]) -> dict:
    return {"vary": [{"key": v.key, "values": list(v.values)} for v in sweep.varies],
            "base": sweep.signature, "points": measured, "skipped": skipped,
            "state": str(state.path), **files}
