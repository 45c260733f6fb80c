"""Trace points from the children to `run --trace PATTERN`: each one that fires in a child
reaches the controller as a Trace event with the child's emulated time, and the run's log,
--trace's output and the JSON events show it; nothing is sent when no pattern names it."""

import json
import re

import pytest

from emu import cli, trace
from emu.child import Control
from emu.clock import Clock
from emu.config import ConfigError
from emu.events import Trace
from tests.conftest import BASE

LINE = re.compile(r"\[ *([\d.]+) ms\] (.*)")


def _run(capsys, *trace_args: str) -> tuple[list[dict], list[tuple[float, str]]]:
    sets = sum((["--set", f"{k}={v}"] for k, v in BASE.items()), [])
    assert cli.main(["run", *trace_args, "--json", *sets]) == 0
    out, err = capsys.readouterr()
    lines = [(float(m[1]), m[2]) for m in map(LINE.fullmatch, err.splitlines()) if m]
    return json.loads(out)["events"], lines


def test_a_trace_point_in_a_child_reaches_run_trace_with_its_time(capsys):
    events, lines = _run(capsys, "--trace", "migrate_set_state")
    traced = [e for e in events if e.get("trace") == "migrate_set_state"]
    for side in ("source", "destination"):
        states = [e["fields"]["new_state"] for e in traced if e["role"] == side]
        assert states[0] == "setup" and states[-1] == "completed", traced
        assert "postcopy-active" in states
    # as QEMU's trace backend prints it, after the time the child's clock said
    active = next(e for e in traced if e["fields"]["new_state"] == "postcopy-active")
    assert active["event"] == f"{active['role']}: migrate_set_state new_state=postcopy-active"
    assert active["time"] > 0
    assert any(text == active["event"] and abs(ms - active["time"] * 1e3) < 0.01
               for ms, text in lines), lines
    # one log, in time order, the traces among the state changes
    assert [text for _, text in lines] == [e["event"] for e in events]
    assert [t for t, _ in lines] == sorted(t for t, _ in lines)


def test_patterns_are_qemu_s_and_a_scenario_after_a_bare_trace_stays_one():
    parse = cli._parser().parse_args

    def patterns(*argv):
        args = parse(["run", *argv])
        cli._trace_patterns(args)
        return args.trace, args.scenario

    assert patterns() == (None, None)  # no --trace: nothing traced, no log on stderr
    assert patterns("--trace") == ((), None)  # the log, no trace point
    assert patterns("--trace", "postcopy_preempt_*,enable=migrate_set_state",
                    "--trace=-postcopy_preempt_restored") == (
        ("postcopy_preempt_*", "migrate_set_state", "-postcopy_preempt_restored"), None)
    assert patterns("--trace", "seed-10g") == ((), "seed-10g")
    assert patterns("--trace", "postcopy_*", "classroom") == (("postcopy_*",), "classroom")
    with pytest.raises(ConfigError, match="--trace: 'a/b' is not a trace pattern"):
        patterns("--trace", "a/b")


def test_an_unknown_pattern_is_warned_about(capsys):
    cli._warn_unmatched(("migrate_set_*", "no_such_point"))
    assert capsys.readouterr().err == (
        "postcopy-emu: warning: --trace: no trace point matches 'no_such_point'\n")


class Pipe:
    def __init__(self) -> None:
        self.sent = []

    def send(self, event) -> None:
        self.sent.append(event)


def test_a_child_sends_nothing_when_no_pattern_names_a_point():
    point = trace.point("test_transport_point")
    conn, clock = Pipe(), Clock()
    clock.start(1.0, at=2.5)
    control = Control(conn, "source", {})
    try:
        control.trace_to_controller(clock, ())
        assert not point.enabled  # the hot path's one boolean test, and no call
        control.trace_to_controller(clock, ("test_transport_*",))
        point(page=7)
    finally:
        trace.enable([])
        trace.set_sink(lambda name, fields: None)
    [event] = conn.sent
    assert isinstance(event, Trace) and (event.role, event.name, event.fields) == (
        "source", "test_transport_point", {"page": 7})
    assert 2.5 <= event.t < 3.5  # the run's emulated time, not the real one
