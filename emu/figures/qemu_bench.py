"""postcopy-emu bench qemu: the same migration on real QEMU and on the emulator, side by side.

Each scenario (guest pattern, RAM, postcopy cap) runs in each mode once on two local
qemu-system-x86_64 (emu.qemu.harness) and once on the emulator (emu.controller.migrate), one
migration at a time. The emulator is given what the QEMU run has: the same guest RAM, the
guest's walk mapped onto a workload pattern, the same precopy time before
migrate-start-postcopy, the same caps, and as its link the rate QEMU itself reached over
loopback on the development machine (docs/qemu.md, "Throughput").

The 2 MiB scenarios back both QEMUs' guest RAM with hugetlbfs 2 MiB pages (a hugetlbfs mount
and pages added to the pool for them, undone afterwards: emu.qemu.hugepages) and give the
emulator guest.page-size=2MiB; they run in a third mode, preempt-no-break-huge. Where the
machine cannot give them their pages (not root, memory fragmented) the bench says so in one
line and runs the others.

The emulator's side runs at a faithful time scale, chosen per scenario and mode by the rule
of `emulator.time-scale = auto` (emu/figures/timescale.py, with this machine's calibration):
the emulator's own cost per fault x the scale at most 1% of the latency it is compared with,
QEMU's faster requests in the same scenario and mode (their 10th percentile: under a cap the
distribution is bimodal), measured just before. Precopy measures nothing (all of RAM is dirty
again at the switch: the guests write every page many times a second), so it runs at
PRECOPY_SCALE and the clock slows to the chosen scale just before migrate-start-postcopy. A
run's postcopy gets at most a real-time budget (BUDGET_S: --quick 30 s, else 120 s); where
that, not the rule, decided, the scale says so ("budget"), and own-share says how large the
emulator's own cost per fault then is next to those requests.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np

from emu.config import KEYS
from emu.figures import timescale
from emu.qemu import available, hugepages
from emu.units import format_size, parse_rate

MODES = ("vanilla", "preempt")
# x-postcopy-preempt-break-huge=false only differs where a host page is more than one
# target page: QEMU 7.1/7.2 then finish the huge page on main before a request preempts it
HUGE_MODES = (*MODES, "preempt-no-break-huge")
# bytes/s: 64 MiB take 0.34 s, past QEMU's first 100 ms window. Unlimited, QEMU's first pass
# over a 64 MiB guest can end within that window and the migration then completes in
# precopy (docs/qemu.md, "Limits and quirks"): half of the 4 KiB runs of one day did.
QUICK_PRECOPY_CAP = 200_000_000
FIELDS = ("count", "median-ms", "mean-ms", "p99-ms", "blocktime-ms", "progress")
# QEMU's own postcopy rate over loopback here (median of 18 unlimited runs, docs/qemu.md):
# QEMU is CPU-bound, so this, not the loopback TCP figure, is the emulator's link.
LINK = "824MB/s"
# The round trip of a request between QEMU's threads here, from QEMU's own traces of the
# --quick matrix (docs/qemu.md, "After the faithful time scale"): fault thread to the
# source's return-path thread 60 us (median of the runs' medians), migration thread's pick
# to the vCPU's wake-up 37 us with nothing ahead (preempt), less the 12 us the emulator
# charges on that path itself (cpu.* and the page's own time on the link).
LINK_RTT = "80us"
# Precopy measures nothing here: it runs at this scale (4 s of real time for 1 s; its frames
# come late at it, 0.4 ms emulated on average, which only means that precopy sends less, and
# all of RAM moves again in postcopy anyway), and the clock slows to the scenario's own
# scale SWITCH_LEAD (emulated) before migrate-start-postcopy, so that the switch itself
# runs at that scale too.
PRECOPY_SCALE = 0.25
SWITCH_LEAD = 0.02
BUDGET_S = {"quick": 30.0, "full": 120.0}  # real seconds of postcopy per emulator run, at most
FASTER = 10  # percentile of QEMU's latencies the scale is chosen for (faster_requests)
# The QEMU guest's touch rate under TCG here (1.2 million touches/s, docs/qemu.md).
TOUCH_COST = "833ns"
# The QEMU guest's walk -> the emulator's workload pattern.
PATTERNS = {"stride": "stride", "ascending": "sequential", "random": "random"}
STRIDE_SHARE = 0.382  # the QEMU guest's stride: about 0.382 of its region (emu/qemu/guest.S)
PAGE = 4096
SIDES = ("qemu", "emulator")


@dataclass(frozen=True)
class Case:
    """One scenario: a guest, its RAM, its precopy time and caps (bytes/s, 0 = unlimited)."""
    pattern: str
    ram: int
    postcopy_cap: int
    precopy: float = 1.0
    precopy_cap: int = 0
    page_size: int = PAGE  # the host page backing guest RAM: PAGE, or hugepages.SIZE

    @property
    def huge(self) -> bool:
        return self.page_size != PAGE

    @property
    def name(self) -> str:
        cap = f"{self.postcopy_cap // 1_000_000}MB/s" if self.postcopy_cap else "unlimited"
        page = f" {self.page_size >> 20}M" if self.huge else ""
        return f"{self.pattern} {self.ram >> 20}MiB{page} {cap}"

    @property
    def modes(self) -> tuple[str, ...]:
        return HUGE_MODES if self.huge else MODES


def matrix(quick: bool = False) -> list[Case]:
    """Far-stride and ascending guests, unlimited and two postcopy caps (issue 12 item 5),
    and the far stride on 2 MiB pages, unlimited and under the first cap.
    --quick: a 64 MiB guest and one cap, so the capped emulator runs stay short, and one
    2 MiB scenario, unlimited."""
    if quick:
        # a precopy cap: QEMU's first pass over 64 MiB can end within its first 100 ms
        # window, and then the migration completes in precopy (QUICK_PRECOPY_CAP)
        return [*(Case(p, 64 << 20, cap, precopy_cap=QUICK_PRECOPY_CAP)
                  for p in ("stride", "ascending") for cap in (0, 50_000_000)),
                Case("stride", 64 << 20, 0, precopy_cap=QUICK_PRECOPY_CAP,
                     page_size=hugepages.SIZE)]
    return [*(Case(p, 256 << 20, cap) for p in ("stride", "ascending")
              for cap in (0, 50_000_000, 10_000_000)),
            *(Case("stride", 256 << 20, cap, page_size=hugepages.SIZE)
              for cap in (0, 50_000_000))]


def qemu_scenario(case: Case, mode: str, timeout: float = 300.0, hugetlbfs: str | None = None):
    """The harness's scenario; `hugetlbfs`, the mount of a 2 MiB case."""
    from emu.qemu import harness

    if case.huge != (hugetlbfs is not None):
        raise ValueError(f"{case.name}: a hugetlbfs mount goes with, and only with, a "
                         "huge-page case")
    return harness.Scenario(pattern=case.pattern, mode=mode, ram=case.ram,
                            max_bandwidth=case.precopy_cap,
                            max_postcopy_bandwidth=case.postcopy_cap, precopy=case.precopy,
                            hugetlbfs=hugetlbfs, timeout=timeout)


def emulator_sets(case: Case, mode: str, time_scale: float = PRECOPY_SCALE) -> list[str]:
    """The --set list of the emulator's matching scenario."""
    stride = max(PAGE, round(case.ram * STRIDE_SHARE / PAGE) * PAGE)
    return [
        f"guest.ram={case.ram}",
        f"guest.page-size={format_size(case.page_size)}",  # emulated: no hugetlbfs needed
        f"workload.pattern={PATTERNS[case.pattern]}",
        f"workload.stride={stride}",
        f"workload.touch-cost={TOUCH_COST}",
        f"link.bandwidth={LINK}",
        f"link.rtt={LINK_RTT}",
        # QEMU's unlimited precopy is the link's speed (the emulator wants a positive cap)
        f"migration.max-bandwidth={case.precopy_cap or LINK}",
        f"migration.max-postcopy-bandwidth={case.postcopy_cap}",
        f"migration.switchover-after={case.precopy}s",
        "migration.downtime-limit=1ms",  # as the harness: precopy never completes alone
        f"migration.postcopy-preempt={'false' if mode == 'vanilla' else 'true'}",
        f"migration.x-postcopy-preempt-break-huge={'false' if mode.endswith('huge') else 'true'}",
        f"emulator.time-scale={time_scale}",
        # the figures above were measured on the emulated backend; whatever the default is
        "emulator.backend=emulated",
    ]


def emulator_summary(report: dict) -> dict:
    """The emulator's report in the bench's fields. progress as the harness measures QEMU's
    (Result.progress): the guest's touches per second from its resume on the destination to
    its last fault, the report's progress["until-last-fault"] (emu/figures/progress.py)."""
    lat = report["latency"]
    return {"count": lat["count"], "median-ms": round(lat["p50-us"] / 1e3, 3),
            "mean-ms": round(lat["avg-us"] / 1e3, 3), "p99-ms": round(lat["p99-us"] / 1e3, 3),
            "blocktime-ms": round(report["blocktime-ms"]["total"]),
            "progress": _qemu_window_progress(report.get("progress"))}


def _qemu_window_progress(progress: dict | None) -> int | None:
    """Rounded as Result.summary() rounds QEMU's; None where QEMU's would be (no fault)."""
    measured = (progress or {}).get("until-last-fault")
    return None if measured is None else round(measured["total"])


def postcopy_seconds(case: Case) -> float:
    """Emulated seconds postcopy takes at least: all of RAM at the postcopy cap, or the link
    (the guests dirty every page between the passes, so all of it moves in postcopy)."""
    return case.ram / (case.postcopy_cap or parse_rate(LINK))


def choose_scale(case: Case, latency: float | None, cost: timescale.Cost,
                 budget: float) -> dict:
    """The time scale of the emulator's postcopy: the auto rule (timescale.choose) for
    `latency`, the figure the run will be compared with (QEMU's faster requests for the
    scenario and mode, seconds; None: no faults), on a machine of `cost`; but never so slow
    that its postcopy takes more than `budget` real seconds (limit "budget" then).
    own-share: the emulator's own cost per fault at that scale, as a share of `latency`."""
    frames = parse_rate(LINK) / KEYS["emulator.chunk"].default  # the sets keep the default
    scale, limit = timescale.choose(latency, frames, cost)
    if latency is None:
        limit = "no-faults"
    fastest = postcopy_seconds(case) / budget
    if scale < fastest:
        scale, limit = _round_up(fastest), "budget"
    return {"scale": scale, "limit": limit,
            "own-share": round(cost.largest * scale / latency, 4) if latency else None}


def _round_up(scale: float) -> float:
    """Two significant figures, never down (a rounded scale still keeps the budget)."""
    step = 10.0 ** (math.floor(math.log10(scale)) - 1)
    return float(f"{math.ceil(scale / step - 1e-9) * step:.3g}")


def run_emulator(case: Case, mode: str, scale: float = PRECOPY_SCALE) -> tuple[dict, dict]:
    """The emulator's run of the scenario: precopy at PRECOPY_SCALE (or `scale` if faster),
    postcopy at `scale`. Its summary, and the frames' average lag in postcopy (emulated us:
    what the relay and the destination fell behind the link's schedule by) with the run's
    real time."""
    from emu.config import load_config
    from emu.controller import Run
    from emu.figures import report as reports

    cfg = load_config(None, emulator_sets(case, mode, scale))
    started = time.monotonic()
    with Run(cfg) as run:
        run.set_scale(max(PRECOPY_SCALE, scale))
        switch = cfg["migration.switchover-after"] - SWITCH_LEAD
        while not run.finished and (wait := run.clock.real_wait(switch)) > 0:
            run.poll(timeout=min(0.05, wait))
        run.set_scale(scale)
        before = run.board("destination")
        run.wait()
        report = reports.build(run, run.check_memory(), time.monotonic() - started)
        after = run.board("destination")
    if report["status"] != "completed":
        raise RuntimeError(f"the emulator's {case.name} {mode} run failed: {report['errors']}")
    frames = max(after["rx-frames"] - before["rx-frames"], 1)
    lag = (after["rx-lag-sum"] - before["rx-lag-sum"]) / frames
    return emulator_summary(report), {"postcopy-lag-us": round(lag * 1e6, 1),
                                      "real-time-s": round(time.monotonic() - started, 1)}


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a and b else None


def ratios(scenarios: list[dict]) -> list[dict]:
    """vanilla / preempt of medians and means, and preempt / vanilla of guest progress (how
    much further preempt gets the guest), per scenario name and side."""
    by = {(s["name"], s["mode"]): s for s in scenarios}
    out = []
    for name in dict.fromkeys(s["name"] for s in scenarios):
        van, pre = by.get((name, "vanilla")), by.get((name, "preempt"))
        if van and pre:
            out.append({"name": name, **{
                f"{side}-{key}": ratio(van[side][key], pre[side][key])
                for side in SIDES for key in ("median-ms", "mean-ms")}, **{
                f"{side}-progress": ratio(pre[side]["progress"], van[side]["progress"])
                for side in SIDES}})
    return out


def _cell(value) -> str:
    return "-" if value is None else f"{value:g}"


def table(scenarios: list[dict]) -> str:
    head = ["scenario", "mode", "side", *FIELDS, "time-scale"]
    rows = [[s["name"], s["mode"], side, *(_cell(s[side][k]) for k in FIELDS),
             _scale_cell(s.get("time-scale")) if side == "emulator" else "-"]
            for s in scenarios for side in SIDES]
    rat = ratios(scenarios)
    rhead = ["scenario", "qemu median", "emulator median", "qemu mean", "emulator mean",
             "qemu progress", "emulator progress"]
    rrows = [[r["name"], *(_cell(r[k]) for k in ("qemu-median-ms", "emulator-median-ms",
                                                  "qemu-mean-ms", "emulator-mean-ms",
                                                  "qemu-progress", "emulator-progress"))]
             for r in rat]
    return (_columns(head, rows) + "\n\nprogress: guest touches/s from resume to the last "
            "fault; time-scale: the emulator's in postcopy (why: the auto rule's bound, or the "
            "real-time budget), with its own cost per fault as a share of QEMU's faster "
            "requests (10th percentile)\nvanilla / preempt (progress: preempt / vanilla):\n"
            + _columns(rhead, rrows))


def _scale_cell(chosen: dict | None) -> str:
    """"0.01 slowest 3.1%": the scale, the bound that decided, the own cost's share."""
    if chosen is None:
        return "-"
    share = chosen.get("own-share")
    return " ".join([f"{chosen['scale']:g}", chosen["limit"],
                     *([f"{share:.1%}"] if share is not None else [])])


def _columns(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=True)]
    lines = [head, ["-" * w for w in widths], *rows]
    return "\n".join("  ".join(str(x).ljust(w) for x, w in zip(line, widths, strict=True)).rstrip()
                     for line in lines)


def result(version: str, scenarios: list[dict], quick: bool, real_time: float,
           skipped: str | None = None) -> dict:
    return {"qemu-version": version, "quick": quick, "link": LINK, "link-rtt": LINK_RTT,
            "precopy-time-scale": PRECOPY_SCALE,
            "scenarios": scenarios, "ratios": ratios(scenarios),
            "real-time-s": round(real_time, 1), "skipped": skipped}


def faster_requests(latencies: list[float]) -> float | None:
    """The latency the emulator's own cost must stay small next to: the FASTER percentile of
    QEMU's requests in the scenario (seconds; None without requests). Not the median: under
    a cap the distribution is bimodal (served at once, or after the next 100 ms window), and
    a median in the slow mode would leave the quick requests, and how many of them fit in a
    window's burst, to the emulator's own cost."""
    return float(np.percentile(latencies, FASTER)) if latencies else None


def run_one(case: Case, mode: str, hugetlbfs: str | None = None,
            cost: timescale.Cost | None = None, budget: float = BUDGET_S["quick"],
            ) -> tuple[dict, str]:
    """QEMU's run, then the emulator's at the scale chosen for QEMU's faster requests
    (choose_scale, faster_requests) on a machine of `cost` (default: measured now)."""
    from emu.qemu import harness

    got = harness.run(qemu_scenario(case, mode, hugetlbfs=hugetlbfs))
    chosen = choose_scale(case, faster_requests(got.latencies),
                          cost or timescale.machine_cost(), budget)
    emulator, health = run_emulator(case, mode, chosen["scale"])
    entry = {"name": case.name, "mode": mode, "qemu": got.summary(), "emulator": emulator,
             "time-scale": {**chosen, **health}}
    return entry, got.version


def run_cases(cases: list[Case], hugetlbfs: str | None = None,
              cost: timescale.Cost | None = None, budget: float = BUDGET_S["quick"],
              ) -> Iterator[tuple[dict, str]]:
    """Each case in each of its modes, one migration at a time (the machine has few cores):
    (entry, QEMU version) as each is done. A 2 MiB case's pages are added to the pool for
    its own two QEMUs just before they start (they reserve them as they map guest RAM) and
    taken away after, so that a page that is free for a while is not ours meanwhile."""
    for case in cases:
        for mode in case.modes:
            pages = 2 * -(-case.ram // case.page_size)
            with hugepages.reserved(pages, case.page_size) if case.huge else nullcontext():
                entry, version = run_one(case, mode, hugetlbfs, cost, budget)
            print(f"  {case.name} {mode}: qemu {entry['qemu']['median-ms']} ms, emulator "
                  f"{entry['emulator']['median-ms']} ms (median) at time-scale "
                  f"{_scale_cell(entry['time-scale'])}, {entry['time-scale']['real-time-s']} s",
                  file=sys.stderr, flush=True)
            yield entry, version


def run_huge(cases: list[Case], cost: timescale.Cost | None = None,
             budget: float = BUDGET_S["quick"]) -> tuple[list[dict], str | None, str | None]:
    """The 2 MiB cases on one hugetlbfs mount, undone afterwards: (scenarios, version, why
    the rest were skipped). The runs done before the machine refused its pages are kept."""
    scenarios, version = [], None
    if not cases:
        return scenarios, version, None
    try:
        with hugepages.mounted() as mount:
            for entry, seen in run_cases(cases, mount, cost, budget):
                scenarios.append(entry)
                version = seen
    except hugepages.HugepagesError as e:  # from mounted() or reserved(), never the runs
        return scenarios, version, f"2 MiB huge pages: {e}; their scenarios skipped"
    return scenarios, version, None


def main(quick: bool, as_json: bool) -> int:
    if (why := available()) is not None:
        print(why)  # one line, with the install command; not a failure
        return 0
    started = time.monotonic()
    cases = matrix(quick)
    # once, before any QEMU runs: every scale from the same measurement of this machine
    cost = timescale.machine_cost()
    budget = BUDGET_S["quick" if quick else "full"]
    scenarios, version = [], None
    for entry, seen in run_cases([c for c in cases if not c.huge], None, cost, budget):
        scenarios.append(entry)
        version = seen
    huge, huge_version, skipped = run_huge([c for c in cases if c.huge], cost, budget)
    if skipped:
        print(skipped, file=sys.stderr, flush=True)  # one line; the rest still runs
    scenarios += huge
    version = version or huge_version
    out = result(version, scenarios, quick, time.monotonic() - started, skipped)
    if as_json:
        print(json.dumps(out, indent=1))
    else:
        print(f"QEMU {version}\n" + table(scenarios) + (f"\n\n{skipped}" if skipped else ""))
    return 0
