"""emulator.time-scale = auto (emu/figures/timescale.py): the rule, its calibration, what
`run` says about it, and that the default scenario at the scale it gets keeps up."""

import json

import pytest

from emu import cli
from emu.config import load_config
from emu.figures import timescale
from emu.figures.timescale import Cost, choose

COST = Cost(per_fault=400e-6, per_frame=100e-6)  # a fixed machine: no calibration run
FRAMES = 1000.0  # link frames per emulated second: far from the frame limit


def test_a_smaller_predicted_latency_gets_a_smaller_scale():
    slow, why_slow = choose(1e-3, FRAMES, COST)
    fast, why_fast = choose(30e-3, FRAMES, COST)
    assert slow < fast and why_slow == why_fast == "cost"
    # the largest scale that keeps the cost under AIM of the latency, rounded down
    assert slow == 0.025 and slow * COST.largest <= timescale.AIM * 1e-3
    assert choose(30e-3, FRAMES, Cost(800e-6, 200e-6))[0] < fast  # a slower machine, too


def test_the_rule_never_runs_faster_than_the_relay_or_real_time_or_slower_than_the_slowest():
    assert choose(10.0, FRAMES, COST) == (timescale.MAX_SCALE, "real-time")
    assert choose(10.0, 20_000.0, COST) == (0.4, "frames")  # 8000 frames a real second
    assert choose(1e-6, FRAMES, COST) == (timescale.MIN_SCALE, "slowest")
    assert choose(None, FRAMES, COST) == (timescale.MAX_SCALE, "real-time")  # no faults


def test_pick_takes_the_model_s_latency_without_the_emulator_s_own_cost():
    vanilla = load_config("default")
    preempt = vanilla.with_overrides(["migration.postcopy-preempt=true"])
    a, b = timescale.pick(vanilla, COST), timescale.pick(preempt, COST)
    assert b.latency < a.latency and b.scale < a.scale
    assert a.share <= timescale.AIM


def test_a_calibration_is_measured_cached_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert timescale.cached_cost() is None
    cost = timescale.machine_cost()
    assert cost.per_fault > 0 and cost.per_frame > 0 and cost.measured > 0
    assert timescale.cached_cost() == cost == timescale.known_cost()
    stale = json.loads(timescale.cache_path().read_text())
    stale["measured"] -= timescale.CACHE_S + 1
    timescale.cache_path().write_text(json.dumps(stale))
    assert timescale.cached_cost() is None and timescale.known_cost() == timescale.REFERENCE


def _fixed_machine(monkeypatch, tmp_path, cost: Cost = COST) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(timescale, "machine_cost", lambda: cost)


SMALL = ["--set", "guest.ram=16MiB", "--set", "link.socket-buffer=1MiB",
         "--set", "migration.switchover-after=50ms"]


def test_run_with_auto_says_the_scale_it_chose_and_the_real_time_it_takes(
        capsys, monkeypatch, tmp_path):
    _fixed_machine(monkeypatch, tmp_path)
    assert cli.main(["run", "--json", *SMALL]) == 0
    out, err = capsys.readouterr()
    chosen = json.loads(out)["emulator"]
    auto = chosen["time-scale-auto"]
    assert chosen["time-scale"] == auto["scale"] and auto["limit"] == "cost"
    assert auto["own-share"] <= timescale.AIM
    assert f"emulator.time-scale auto: {auto['scale']:g}, so that the emulator's own cost" in err
    assert "this run takes about" in err and "of real time" in err


@pytest.mark.parametrize("value", ["fast", "0", "101", "-1", "nan"])
def test_a_bad_time_scale_is_one_line_naming_what_is_allowed(capsys, value):
    assert cli.main(["run", "--set", f"emulator.time-scale={value}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("postcopy-emu: emulator.time-scale: must be a number in "
                             "(0, 100] or auto (got ")


def test_a_run_that_falls_behind_names_the_scale_to_use(capsys):
    from emu.figures.report import emulator_health

    cfg = load_config(None, ["emulator.time-scale=1"])
    dst = {"rx-frames": 100, "rx-lag-sum": 100 * 4e-3, "rx-lag-max": 9e-3}
    health = emulator_health(cfg, dst, {"p50-us": 30_000.0}, 3.0)
    assert not health["keeping-up"]
    faithful = health["faithful-time-scale"]
    assert faithful < 0.15  # 4 ms of lag against 0.6 ms allowed: 1/7 at most
    assert f"--set emulator.time-scale={faithful:g}" in health["warning"]


def test_the_default_scenario_at_its_auto_scale_keeps_its_lag_small(capsys, monkeypatch,
                                                                     tmp_path):
    """The default scenario with a smaller guest and precopy (the same link and buffers, so
    the same latencies), at the scale auto picks on this machine now (a calibration of its
    own), side by side with the same run at ten times that scale: lag against latency as the
    runs report them, in emulated time. A busy machine distorts both; auto's must stay the
    smaller, and within the bound the run itself checks."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    sets = ["guest.ram=32MiB", "migration.switchover-after=100ms"]

    def run(*more: str) -> dict:
        args = sum((["--set", s] for s in (*sets, *more)), [])
        assert cli.main(["run", "default", "--json", *args]) == 0
        return json.loads(capsys.readouterr().out)

    auto = run()
    health, latency = auto["emulator"], auto["latency"]
    assert "time-scale-auto" in health and latency["count"] > 0
    fast = run(f"emulator.time-scale={min(10 * health['time-scale'], 100):g}")

    def distortion(result: dict) -> float:
        return result["emulator"]["lag-avg-us"] / result["latency"]["p50-us"]

    assert distortion(auto) < distortion(fast)
    assert distortion(auto) <= 2 * timescale.FIDELITY, health


def test_the_model_takes_an_auto_scenario_at_the_scale_auto_would_pick(monkeypatch):
    from emu.figures import model

    monkeypatch.setattr(timescale, "known_cost", lambda: COST)
    cfg = load_config("default")
    assert cfg["emulator.time-scale"] == "auto"
    assert model.predict(cfg)["inputs"]["time-scale"] == timescale.pick(cfg, COST).scale
