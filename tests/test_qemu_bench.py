"""bench qemu: its matrix, its table and JSON (pure), one tiny real side-by-side scenario."""

import json

import pytest

from emu import cli
from emu.config import load_config
from emu.figures import qemu_bench, timescale
from emu.qemu import available, env

SUMMARY = {"count": 10, "median-ms": 4.0, "mean-ms": 5.0, "p99-ms": 9.0, "blocktime-ms": 50,
           "progress": None}


def _entry(name, mode, median, mean):
    side = {**SUMMARY, "median-ms": median, "mean-ms": mean}
    return {"name": name, "mode": mode, "qemu": dict(side), "emulator": dict(side)}


def test_the_matrix_is_stride_and_ascending_unlimited_and_two_caps():
    cases = qemu_bench.matrix()
    assert {c.pattern for c in cases} == {"stride", "ascending"}
    assert sorted({c.postcopy_cap for c in cases}) == [0, 10_000_000, 50_000_000]
    assert {c.ram for c in cases} == {256 << 20}
    quick = qemu_bench.matrix(quick=True)
    assert len(quick) < len(cases) and {c.pattern for c in quick} == {"stride", "ascending"}


def test_the_matrix_has_2mib_scenarios_in_three_modes_and_quick_has_one():
    huge = [c for c in qemu_bench.matrix() if c.huge]
    assert {c.page_size for c in huge} == {2 << 20} and {c.pattern for c in huge} == {"stride"}
    [quick] = [c for c in qemu_bench.matrix(quick=True) if c.huge]
    assert quick.name == "stride 64MiB 2M unlimited"
    assert quick.modes == ("vanilla", "preempt", "preempt-no-break-huge")
    assert qemu_bench.Case("stride", 64 << 20, 0).modes == ("vanilla", "preempt")


def test_a_2mib_scenario_is_2mib_on_both_sides():
    case = qemu_bench.Case("stride", 64 << 20, 0, page_size=2 << 20)
    for mode, break_huge in (("preempt", True), ("preempt-no-break-huge", False)):
        cfg = load_config(None, qemu_bench.emulator_sets(case, mode))
        assert cfg["guest.page-size"] == 2 << 20 and cfg["migration.postcopy-preempt"]
        assert cfg["migration.x-postcopy-preempt-break-huge"] is break_huge
        qemu = qemu_bench.qemu_scenario(case, mode, hugetlbfs="/mnt/huge")
        assert qemu.hugetlbfs == "/mnt/huge" and qemu.mode == mode
    with pytest.raises(ValueError, match="hugetlbfs mount"):
        qemu_bench.qemu_scenario(case, "preempt")  # a 2 MiB case with no mount
    assert load_config(None, qemu_bench.emulator_sets(
        qemu_bench.Case("stride", 64 << 20, 0), "preempt"))["guest.page-size"] == 4096


def test_the_emulator_scenario_matches_the_qemu_one():
    case = qemu_bench.Case("ascending", 64 << 20, 50_000_000, precopy=0.5)
    cfg = load_config(None, qemu_bench.emulator_sets(case, "preempt"))
    qemu = qemu_bench.qemu_scenario(case, "preempt")
    assert cfg["guest.ram"] == qemu.ram == 64 << 20
    assert cfg["workload.pattern"] == "sequential" and qemu.pattern == "ascending"
    assert cfg["migration.max-postcopy-bandwidth"] == qemu.max_postcopy_bandwidth == 50_000_000
    assert cfg["migration.switchover-after"] == qemu.precopy == 0.5
    assert cfg["migration.postcopy-preempt"] and qemu.mode == "preempt"
    assert not load_config(None, qemu_bench.emulator_sets(case, "vanilla"))[
        "migration.postcopy-preempt"]
    stride = load_config(None, qemu_bench.emulator_sets(
        qemu_bench.Case("stride", 256 << 20, 0), "vanilla"))
    assert stride["workload.stride"] == round(0.382 * (256 << 20) / 4096) * 4096


def test_json_names_the_fields_as_the_issue_does():
    scenarios = [_entry("s", "vanilla", 4.0, 6.0), _entry("s", "preempt", 0.5, 2.0)]
    out = json.loads(json.dumps(qemu_bench.result("7.2.22", scenarios, True, 1.0)))
    assert out["qemu-version"] == "7.2.22"
    for s in out["scenarios"]:
        assert {"name", "mode", "qemu", "emulator"} <= set(s)
        assert set(s["qemu"]) == set(s["emulator"]) == set(qemu_bench.FIELDS)
    assert out["ratios"] == [{"name": "s", "qemu-median-ms": 8.0, "emulator-median-ms": 8.0,
                              "qemu-mean-ms": 3.0, "emulator-mean-ms": 3.0,
                              "qemu-progress": None, "emulator-progress": None}]


def test_the_quick_matrix_caps_precopy_so_that_qemu_reaches_postcopy():
    # unlimited, QEMU's first pass over 64 MiB can end within its first 100 ms window and
    # the migration then completes in precopy, which the harness refuses
    assert {c.precopy_cap for c in qemu_bench.matrix(quick=True)} == {
        qemu_bench.QUICK_PRECOPY_CAP}
    case = qemu_bench.matrix(quick=True)[0]
    assert load_config(None, qemu_bench.emulator_sets(case, "vanilla"))[
        "migration.max-bandwidth"] == qemu_bench.QUICK_PRECOPY_CAP


def test_the_emulators_link_has_qemus_rtt_and_the_backend_is_pinned():
    cfg = load_config(None, qemu_bench.emulator_sets(qemu_bench.Case("stride", 64 << 20, 0),
                                                     "preempt"))
    assert cfg["link.rtt"] == 80e-6 and cfg["emulator.backend"] == "emulated"


COST = timescale.Cost(per_fault=500e-6, per_frame=50e-6)


def test_the_scale_is_the_auto_rule_for_qemus_median():
    case = qemu_bench.Case("stride", 64 << 20, 0)
    # 1% of 5 ms over 500 us of own cost a fault: 0.1, as timescale.choose says
    assert qemu_bench.choose_scale(case, 5e-3, COST, budget=30) == {
        "scale": 0.1, "limit": "cost", "own-share": 0.01}
    # 0.2 ms: the rule's slowest, and own-share says how far from 1% that is
    assert qemu_bench.choose_scale(case, 0.2e-3, COST, budget=30) == {
        "scale": 0.01, "limit": "slowest", "own-share": 0.025}
    # no faults on QEMU's side: nothing to keep small, the frames' bound
    assert qemu_bench.choose_scale(case, None, COST, budget=30)["limit"] == "no-faults"


def test_the_scale_is_for_qemus_faster_requests_not_a_bimodal_median():
    # under a cap: a few served at once, most after the next 100 ms window
    latencies = [0.2e-3] * 4 + [97e-3] * 11
    assert qemu_bench.faster_requests(latencies) == pytest.approx(0.2e-3)
    assert qemu_bench.faster_requests([]) is None


def test_a_long_postcopy_is_held_to_the_real_time_budget():
    capped = qemu_bench.Case("stride", 64 << 20, 50_000_000)  # 1.34 s of postcopy at least
    assert qemu_bench.postcopy_seconds(capped) == (64 << 20) / 50e6
    got = qemu_bench.choose_scale(capped, 0.2e-3, COST, budget=30)
    assert got["limit"] == "budget" and got["scale"] == 0.045  # 1.342 / 30, rounded up
    assert got["own-share"] == round(500e-6 * 0.045 / 0.2e-3, 4)
    # a median long enough that the rule is faster than the budget: the rule's own
    assert qemu_bench.choose_scale(capped, 10e-3, COST, budget=30) == {
        "scale": 0.2, "limit": "cost", "own-share": 0.01}


def test_the_table_says_each_emulator_runs_scale_and_why():
    entry = _entry("s", "preempt", 0.5, 2.0)
    entry["time-scale"] = {"scale": 0.045, "limit": "budget", "own-share": 0.1125}
    text = qemu_bench.table([entry])
    [emulator] = [line for line in text.splitlines()
                  if line.startswith("s ") and " emulator " in line]
    assert emulator.endswith("0.045 budget 11.2%")


def test_precopy_runs_fast_and_postcopy_at_the_chosen_scale(monkeypatch):
    from emu.controller import Run

    scales = []
    set_scale = Run.set_scale
    monkeypatch.setattr(Run, "set_scale", lambda run, s: (scales.append(s), set_scale(run, s)))
    case = qemu_bench.Case("stride", 16 << 20, 0, precopy=0.1, precopy_cap=50_000_000)
    summary, health = qemu_bench.run_emulator(case, "preempt", 0.05)
    assert scales == [qemu_bench.PRECOPY_SCALE, 0.05]
    assert summary["count"] > 0 and health["postcopy-lag-us"] >= 0


def test_the_emulators_progress_is_measured_over_qemus_window():
    report = {"latency": {"count": 3, "p50-us": 1000.0, "avg-us": 2000.0, "p99-us": 3000.0},
              "blocktime-ms": {"total": 12.4},
              "progress": {"total": 9000.0, "until-last-fault": {"total": 4321.6}}}
    assert qemu_bench.emulator_summary(report)["progress"] == 4322  # rounded as QEMU's
    report["progress"]["until-last-fault"] = None  # no fault in postcopy: none, as QEMU's
    assert qemu_bench.emulator_summary(report)["progress"] is None
    report["progress"] = None  # the guest never ran on the destination
    assert qemu_bench.emulator_summary(report)["progress"] is None


def test_the_table_shows_progress_and_how_much_further_preempt_gets():
    van, pre = _entry("s", "vanilla", 4.0, 6.0), _entry("s", "preempt", 0.5, 2.0)
    van["qemu"]["progress"], pre["qemu"]["progress"] = 1000, 2500
    van["emulator"]["progress"], pre["emulator"]["progress"] = 800, 1600
    [r] = qemu_bench.ratios([van, pre])
    assert (r["qemu-progress"], r["emulator-progress"]) == (2.5, 2.0)
    text = qemu_bench.table([van, pre])
    assert "2500" in text and "1600" in text
    assert text.splitlines()[-1].split()[-2:] == ["2.5", "2"]


def test_the_table_has_a_row_per_side_and_the_ratios():
    scenarios = [_entry("s", "vanilla", 4.0, 6.0), _entry("s", "preempt", 0.5, 2.0)]
    text = qemu_bench.table(scenarios)
    assert len([line for line in text.splitlines() if line.startswith("s ")]) == 5
    assert "vanilla / preempt" in text and " 8 " in text


def test_without_qemu_it_says_so_in_one_line_and_exits_0(monkeypatch, capsys):
    monkeypatch.setattr(env, "qemu_version", lambda: None)
    assert cli.main(["bench", "qemu", "--quick"]) == 0
    out = capsys.readouterr().out
    assert out.strip().splitlines() == [
        "qemu-system-x86_64 not found (install it: apt-get install qemu-system-x86)"]


@pytest.mark.skipif(available() is not None, reason=str(available()))
def test_one_tiny_scenario_side_by_side(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    # As the harness's own test: a precopy cap so a 32 MiB guest reaches postcopy.
    case = qemu_bench.Case("stride", 32 << 20, 0, precopy=0.4, precopy_cap=50_000_000)
    entry, version = qemu_bench.run_one(case, "preempt", cost=COST)
    assert version.startswith(".".join(map(str, env.qemu_version())))
    for side in ("qemu", "emulator"):
        assert set(entry[side]) == set(qemu_bench.FIELDS) and entry[side]["count"] > 0
    # the emulator ran at the scale chosen for QEMU's faster requests, and says so: no
    # faster than the rule's for QEMU's median
    chosen = entry["time-scale"]
    assert set(chosen) == {"scale", "limit", "own-share", "postcopy-lag-us", "real-time-s"}
    assert chosen["scale"] <= qemu_bench.choose_scale(
        case, entry["qemu"]["median-ms"] / 1e3, COST, qemu_bench.BUDGET_S["quick"])["scale"]
    assert entry["emulator"]["progress"] > 0  # it faulted: its window exists
