"""What a run says about itself: a failed run's summary, the processes' names, the events."""

import json
import os
import signal

from emu import cli
from emu.cli import summary
from emu.controller import EVENT_DELAY_S, Run, migrate
from emu.events import Link, StateChanged
from tests.conftest import BASE, config


def test_a_killed_destination_says_how_far_the_run_got():
    cfg = config(emulator__time_scale="0.1", guest__ram="64MiB",
                 migration__switchover_after="50ms")
    killed = []

    def progress(run):  # kill -9 the destination once postcopy has run a while
        if run.postcopy_start is not None and not killed \
                and run.clock.now() > run.postcopy_start + 0.02:
            killed.append(run.clock.now())
            os.kill(run.children["destination"].pid, signal.SIGKILL)
    result = migrate(cfg, progress, recover_after=None)
    assert killed, "the migration completed before the kill"
    assert result["status"] == "failed"
    reached = result["reached"]
    assert reached["time"] >= killed[0] > 0
    assert reached["destination"] == "postcopy-active" and reached["died"] == ["destination"]
    assert reached["source"] == "postcopy-paused"
    assert reached["page-faults"] == result["latency"]["count"]
    assert 0 < reached["present"] < 1
    # nothing was compared: not checked, which is not bad memory
    assert result["integrity"]["ok"] is None
    # query-migrate's total-time is the time so far, as QEMU's before completion
    assert result["query-migrate"]["total-time"] >= round(killed[0] * 1e3)
    text = summary(result, cfg)
    first = text.splitlines()[0]
    assert first.startswith(f"postcopy-emu: failed after {reached['time'] * 1e3:.0f} ms"), first
    assert "reached: source postcopy-paused, destination postcopy-active (then its process died)" \
        in text
    assert f"by then {reached['page-faults']} page faults resolved" in text
    assert "integrity: not checked: the run did not complete" in text
    assert "BAD" not in text


def test_a_completed_run_is_checked_and_says_its_total_time(run_migration):
    result = run_migration()
    assert result["integrity"]["ok"] is True
    text = summary(result, config())
    assert text.startswith(f"postcopy-emu: completed in {result['query-migrate']['total-time']} ms")
    assert "integrity: ok (" in text and "reached:" not in text


def _title(pid: int) -> tuple[str, str]:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        cmdline = f.read().split(b"\0")[0].decode()
    with open(f"/proc/{pid}/comm") as f:
        return cmdline, f.read().strip()


def test_children_carry_their_role_in_the_process_title():
    run = Run(config())
    try:
        run.start()
        titles = {role: _title(child.pid) for role, child in run.children.items()}
    finally:
        run.stop()
    assert titles == {role: (f"postcopy-emu: {role}", f"pce-{role}")
                      for role in ("source", "destination", "network")}


def test_events_that_arrive_out_of_order_are_logged_in_time_order():
    """Each child has its own pipe: the link's connection at 2 ms can be read before the
    source's setup at 0 ms. The log, what --trace and the window are handed, and the report's
    events all come in time order."""
    run = Run(config())
    try:
        run._event(Link("connected", "main", 0.002))
        run._event(StateChanged("destination", "setup", 0.001))
        run._event(StateChanged("source", "setup", 0.0))
        # at 0 s, too recent: an earlier event may still be on its way
        assert run.log.since(0, horizon=-EVENT_DELAY_S) == ([], 0)
        shown, seen = run.log.since(0, horizon=1.0 - EVENT_DELAY_S)
        assert shown == [(0.0, "source: setup"), (0.001, "destination: setup"),
                         (0.002, "link: main connection connected")]
        # later than any delay: shown next, not lost; the report sorts it in
        run._event(StateChanged("source", "active", 0.0005))
        assert run.log.since(seen, horizon=1.0) == ([(0.0005, "source: active")], 4)
        assert [t for t, _ in run.events_in_order()] == [0.0, 0.0005, 0.001, 0.002]
    finally:
        run.stop()


def test_a_real_migration_traces_and_reports_its_events_in_time_order(capsys):
    sets = [f"{k}={v}" for k, v in {**BASE, "migration.postcopy-preempt": "true"}.items()]
    assert cli.main(["run", "--trace", "--json", *sum((["--set", s] for s in sets), [])]) == 0
    out, err = capsys.readouterr()
    events = json.loads(out)["events"]
    times = [e["time"] for e in events]
    assert len(times) >= 8 and times == sorted(times), events
    traced = [line for line in err.splitlines() if line.startswith("[")]
    assert [line.split("] ", 1)[1] for line in traced] == [e["event"] for e in events]
    traced_ms = [float(line[1:].split(" ms]")[0]) for line in traced]
    assert traced_ms == sorted(traced_ms), traced
    # a bare --trace names no trace point: the children send none
    assert not any("trace" in e for e in events) and "migrate_set_state" not in err
