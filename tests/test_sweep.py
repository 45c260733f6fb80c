"""postcopy-emu sweep: the points (the cartesian product of the --vary values, checked before
anything runs), a tiny sweep's table, CSV, JSON and PNG, resuming from the state file, and a
sweep stopped by SIGTERM that leaves nothing behind but the points it finished."""

import csv
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile

import pytest

from emu import cli
from emu.config import ConfigError
from emu.figures import sweep
from tests.test_cleanup import segments, wait_for
from tests.test_signals import Program

# Tiny, fast points: an explicit scale, so that no calibration runs.
TINY = ["--set", "guest.ram=16MiB", "--set", "migration.switchover-after=50ms",
        "--set", "emulator.time-scale=0.5", "--set", "emulator.duration-limit=20s"]
PNG_SIZE = (1200, 480)  # gui/_qt/sweep_plot.SIZE


def test_two_varies_give_every_combination_first_key_outermost():
    plan = sweep.plan(None, ["guest.ram=64MiB"],
                      ["guest.vcpus=1,4,16", "migration.postcopy-preempt=false,true"])
    assert plan.keys == ["guest.vcpus", "migration.postcopy-preempt"]
    assert [tuple(p.values.values()) for p in plan.points] == [
        ("1", "false"), ("1", "true"), ("4", "false"), ("4", "true"),
        ("16", "false"), ("16", "true")]
    last = plan.points[-1].cfg
    assert last["guest.vcpus"] == 16 and last["migration.postcopy-preempt"] is True
    assert last["guest.ram"] == 64 << 20  # the base's --set holds under the point's values


def test_values_are_written_as_config_writes_them():
    vary = sweep.parse_vary("guest.ram=16777216, 32MiB")
    assert vary.values == ("16MiB", "32MiB")  # the same point however it is spelled
    with pytest.raises(ConfigError, match="16MiB given twice"):
        sweep.parse_vary("guest.ram=16MiB,16777216")


def test_the_base_decides_whether_a_state_line_is_this_sweeps():
    one = sweep.plan(None, ["link.rtt=1ms"], ["guest.vcpus=1,2"])
    same = sweep.plan(None, ["link.rtt=1000us"], ["guest.vcpus=2,4"])
    other = sweep.plan(None, ["link.rtt=2ms"], ["guest.vcpus=1,2"])
    assert one.signature == same.signature != other.signature


def vary(*texts: str) -> list[str]:
    return [a for text in texts for a in ("--vary", text)]


@pytest.mark.parametrize("args, message", [
    (vary("guest.vcpu=1,2"), "unknown key 'guest.vcpu' (did you mean guest.vcpus?)"),
    (vary("guest.vcpus=1,lots"), "--vary guest.vcpus: guest.vcpus:"),
    (vary("guest.vcpus=1,299"), "--vary guest.vcpus: guest.vcpus: must be between 1 and 256"),
    # each value fits on its own; the point does not (32 vCPUs need 32 target pages)
    (vary("guest.vcpus=1,32", "guest.ram=4MiB,64KiB"),
     "--vary at guest.vcpus=32, guest.ram=64KiB: guest.vcpus: must be at most"),
    (vary("guest.vcpus"), "expected section.key=VALUE,VALUE,..."),
    (vary("guest.vcpus=1,,2"), "expected section.key=VALUE,VALUE,..."),
    (vary("guest.vcpus=1", "guest.vcpus=2"), "given twice"),
    (vary("guest.vcpus=1", "link.rtt=1ms", "link.bandwidth=1Gbit"), "at most 2 --vary"),
    ([], "give one or two --vary"),
    ([*vary("guest.vcpus=1,2"), "--csv", "/nonexistent-dir/s.csv"],
     "--csv /nonexistent-dir/s.csv: no such directory"),
    ([*vary("guest.vcpus=1,2"), "--out", "/dev/null/sweep"],
     "--out /dev/null/sweep: Not a directory"),
])
def test_a_bad_vary_is_one_line_and_exit_2_before_anything_runs(args, message):
    out = tempfile.mkdtemp(prefix="psweep")
    os.rmdir(out)  # the sweep must not even make its directory
    done = subprocess.run([sys.executable, "-m", "emu.cli", "sweep", "--set", "guest.ram=4MiB",
                           "--out", out, *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and message in done.stderr, done.stderr
    assert done.stderr.startswith("postcopy-emu: ")
    assert done.stdout == "" and not os.path.exists(out)


def png_size(path) -> tuple[int, int]:
    with open(path, "rb") as png:
        head = png.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def test_a_tiny_sweep_writes_table_csv_json_png_and_resumes(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("QT_QPA_PLATFORM", "offscreen")
    args = ["sweep", *TINY, "--vary", "migration.postcopy-preempt=false,true",
            "--out", str(tmp_path / "out")]
    assert cli.main([*args, "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["skipped"] == 0
    points = got["points"]
    assert [p["point"] for p in points] == [{"migration.postcopy-preempt": "false"},
                                            {"migration.postcopy-preempt": "true"}]
    for p in points:
        assert p["status"] == "completed" and p["faults"] > 0
        assert 0 < p["p50-us"] <= p["p99-us"] <= p["max-us"]
        assert p["progress-per-s"] > 0 and p["model-us"] > 0
        assert p["time-scale"] == 0.5 and p["time-scale-auto"] is False
    # preempt's urgent pages overtake the stream: the model says so, and so does the run
    assert points[1]["model-us"] < points[0]["model-us"]
    assert points[1]["mean-us"] < points[0]["mean-us"]

    with open(got["csv"], newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["migration.postcopy-preempt"] for r in table] == ["false", "true"]
    assert [float(r["mean-us"]) for r in table] == [p["mean-us"] for p in points]
    assert got["png"] == str(tmp_path / "out" / "sweep.png")
    assert png_size(got["png"]) == PNG_SIZE and os.path.getsize(got["png"]) > 10_000
    state = tmp_path / "out" / sweep.STATE_NAME
    lines = state.read_text().splitlines()
    assert len(lines) == 2

    def never(*a, **k):
        raise AssertionError("a point already measured ran again")
    monkeypatch.setattr(sweep, "measure", never)
    assert cli.main(args) == 0
    out, err = capsys.readouterr()
    assert "2 of 2 points already measured" in err and "skipped" in err
    head, rule, *rows = out.splitlines()
    assert head.split()[:3] == ["migration.postcopy-preempt", "faults", "mean"]
    assert [r.split()[0] for r in rows] == ["false", "true"]
    assert f"{points[0]['mean-us'] / 1e3:.3f}" in rows[0]
    assert state.read_text().splitlines() == lines  # nothing measured, nothing appended


def test_a_point_cut_short_in_the_state_file_is_measured_again(tmp_path):
    plan = sweep.plan(None, [], ["guest.vcpus=1,2"])
    path = tmp_path / sweep.STATE_NAME
    state = sweep.load_state(path, plan.signature)
    sweep.append_state(state, plan.signature, plan.points[0], {"status": "completed"})
    with path.open("a") as f:
        f.write('{"version": 1, "base": "')  # a crash in the middle of a line
    again = sweep.load_state(path, plan.signature)
    assert list(again.done) == [plan.points[0].ident] and again.broken == 1
    other = sweep.load_state(path, sweep.plan(None, ["link.rtt=3ms"], ["guest.vcpus=1"])
                             .signature)
    assert not other.done and other.foreign == 1


def test_sigterm_stops_the_running_point_and_keeps_the_finished_ones(tmp_path):
    out = tmp_path / "out"
    state = out / sweep.STATE_NAME
    # the first point fast, the second slow enough to be stopped while it runs
    tmp = tempfile.mkdtemp(prefix="psweep")  # the program's TMPDIR: its sockets
    program = Program(tmp, "sweep", *TINY, "--vary", "emulator.time-scale=0.5,0.01",
                      "--out", str(out))
    try:
        assert wait_for(lambda: state.exists() and state.read_text().count("\n") == 1), \
            "the first point did not finish"
        program.wait_started(3)  # the second point's processes and segments
        program.signal(signal.SIGTERM)
        assert program.finish() == 128 + signal.SIGTERM, program.err
        program.assert_nothing_left()
    finally:
        program.kill()
        shutil.rmtree(tmp)
    assert "sweep stopped during emulator.time-scale=0.01" in program.err
    assert "the same command resumes" in program.err
    lines = state.read_text().splitlines()
    assert [json.loads(line)["point"] for line in lines] == [{"emulator.time-scale": "0.5"}]
    assert not segments(program.proc.pid)
    assert sorted(os.listdir(out)) == [sweep.STATE_NAME]  # no CSV or PNG of half a sweep


def test_a_failed_calibration_falls_back_to_the_reference_cost(monkeypatch):
    def broken():
        raise RuntimeError("the time-scale calibration measured nothing: []")
    monkeypatch.setattr(sweep.timescale, "machine_cost", broken)
    said = []
    assert sweep.machine_cost(said.append) == sweep.timescale.REFERENCE
    assert "measured nothing" in said[0] and "REFERENCE" in said[0]


class Terminal:
    def __init__(self) -> None:
        self.text = ""

    def isatty(self) -> bool:
        return True

    def write(self, text: str) -> None:
        self.text += text

    def flush(self) -> None:
        pass


class FakeRun:
    def __init__(self, cfg) -> None:
        self.cfg, self.present = cfg, 0

    def board(self, role: str) -> dict:
        return {"present": self.present}


def test_the_bar_never_goes_back_and_the_estimate_learns_from_the_points_done(monkeypatch):
    plan = sweep.plan(None, ["guest.ram=4MiB"], ["guest.vcpus=1,2"])
    screen = Terminal()
    bar = sweep.ProgressBar(2, lambda cfg, present: 10.0 * (1 - present), screen)
    clock = iter([0.0, 0.0, 1.0, 2.0, 20.0, 20.0, 20.0])
    monkeypatch.setattr(sweep.time, "monotonic", lambda: next(clock))
    run = FakeRun(plan.points[0].cfg)
    bar.start(1, plan.points[0], run.cfg, [plan.points[1].cfg])
    assert "1/2 guest.vcpus=1: 0 s, ~10 s to go, ~20 s left in all" in screen.text
    run.present = run.cfg.npages // 2
    bar.update(run)
    run.present = run.cfg.npages // 4  # postcopy discarded the pages dirtied since
    bar.update(run)
    first, second = screen.text.split("\r")[2:4]
    assert first.startswith("sweep [" + "#" * 6 + "-" * 18 + "]")
    assert second.startswith("sweep [" + "#" * 6 + "-" * 18 + "]")
    bar.done()  # took 20 s for an estimated 10: the next point's estimate doubles
    bar.start(2, plan.points[1], plan.points[1].cfg, [])
    assert "2/2 guest.vcpus=2: 0 s, ~20 s to go, ~20 s left in all" in screen.text


def test_auto_points_take_the_rule_s_scale_from_one_calibration(monkeypatch):
    calls = []

    def calibrate():
        calls.append(1)
        return sweep.timescale.Cost(per_fault=1e-3, per_frame=0.5e-3)
    monkeypatch.setattr(sweep.timescale, "machine_cost", calibrate)
    plan = sweep.plan(None, ["guest.ram=32MiB"], ["migration.postcopy-preempt=false,true"])
    cost = sweep._once(lambda: sweep.machine_cost(print))
    got = [sweep.resolve(p.cfg, cost) for p in plan.points]
    assert calls == [1]  # one calibration for every point
    rule = [sweep.timescale.pick(p.cfg, calibrate()).scale for p in plan.points]
    assert [(cfg["emulator.time-scale"], auto) for cfg, auto in got] == [(s, True) for s in rule]
    assert rule[1] < rule[0]  # preempt's lower latency needs a slower scale
    fixed = plan.points[0].cfg.with_overrides(["emulator.time-scale=0.3"])
    assert sweep.resolve(fixed, cost) == (fixed, False)
