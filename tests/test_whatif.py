"""The what-ifs QEMU does not have, the preempt series' own TODO items (issue 13 item 4):
several preempt channels (migration.x-preempt-channels) and a non-blocking main channel on the
source (migration.x-main-nonblocking). Small guests; assertions on counts, contents, emulated
latencies and trace points.
"""

import subprocess
import sys

import pytest

from emu.config import ConfigError
from emu.controller import migrate
from tests.conftest import config


def run(trace_points=(), **sets) -> dict:
    return migrate(config(**sets), trace=tuple(trace_points))


def assert_intact(result):
    assert result["status"] == "completed", result["errors"]
    assert result["integrity"]["ok"], result["integrity"]


def traced(result, name: str, role: str) -> list[dict]:
    return [e["fields"] for e in result["events"]
            if e.get("trace") == name and e.get("role") == role]


# ---- several preempt channels ----

@pytest.mark.parametrize("design", ["7.1", "8.0"])
def test_two_preempt_channels_carry_requests_on_both(design):
    """x-preempt-channels=2: urgent pages go round robin on preempt and preempt1 (7.1: the
    migration thread sends them, 8.0: the return-path thread), each its own connection through
    the link, placed by its own preempt thread; the memory arrives whole."""
    result = run(["pce_preempt_channel_pick", "postcopy_place_page"], workload__pattern="random",
                 guest__vcpus="4", migration__postcopy_preempt="true",
                 migration__x_preempt_channels="2", migration__design=design)
    assert_intact(result)
    picks = traced(result, "pce_preempt_channel_pick", "source")
    assert {p["channel"] for p in picks} == {"preempt", "preempt1"}
    # the destination placed pages that came on each of the two connections
    placed = {p["channel"] for p in traced(result, "postcopy_place_page", "destination")}
    assert {"preempt", "preempt1"} <= placed
    assert result["latency"]["by-channel"]["preempt"]["count"] > 0


@pytest.mark.parametrize("value", ["0", "9"])
def test_preempt_channels_out_of_range_refused(value):
    """One line, exit 2, as every key out of its range."""
    out = subprocess.run([sys.executable, "-m", "emu.cli", "run", "--set",
                          "migration.postcopy-preempt=true", "--set",
                          f"migration.x-preempt-channels={value}"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "migration.x-preempt-channels" in lines[0]
    assert "between 1 and 8" in lines[0]


def test_preempt_channels_need_preempt():
    with pytest.raises(ConfigError, match="requires migration.postcopy-preempt=true"):
        config(migration__x_preempt_channels="2")


# ---- a non-blocking main channel ----

# main always full: records of 512 KiB through a link holding 64 KiB of main (a record waits
# for the link to be empty, then takes 4 ms at 1 Gbit/s); urgent pages on preempt
FULL_MAIN = {"workload__pattern": "random", "guest__vcpus": "2",
             "migration__postcopy_preempt": "true", "link__socket_buffer": "64KiB",
             "emulator__chunk": "512KiB"}


def test_nonblocking_main_serves_a_request_while_main_is_full():
    """7.1 blocking (QEMU's): a request waits while the migration thread sleeps in write() on
    full main. x-main-nonblocking: it waits for room or a request, whichever comes first, so the
    request goes at once; the urgent pages' emulated latency is lower, the memory intact."""
    blocking = run(**FULL_MAIN)
    nonblocking = run(["pce_main_would_block", "pce_main_writable"],
                      migration__x_main_nonblocking="true", **FULL_MAIN)
    assert_intact(blocking)
    assert_intact(nonblocking)
    # requests served while main was full, traced as the wait that a request ended
    woken = traced(nonblocking, "pce_main_writable", "source")
    assert any(w["urgent"] == 1 for w in woken)
    assert any(w["then"] == "wait" for w in traced(nonblocking, "pce_main_would_block", "source"))
    fast = nonblocking["latency"]["by-channel"]["preempt"]["avg-us"]
    slow = blocking["latency"]["by-channel"]["preempt"]["avg-us"]
    assert fast < 0.75 * slow, (fast, slow)


@pytest.mark.parametrize("sets", [{"migration__x_main_nonblocking": "true"},
                                  {"migration__x_main_nonblocking": "true",
                                   "migration__postcopy_preempt": "true",
                                   "migration__design": "8.0"}])
def test_nonblocking_main_only_where_it_changes_something(sets):
    """Without preempt the urgent page goes on main itself; from 8.0 on the return-path thread
    sends urgent pages: refused in both, with why."""
    with pytest.raises(ConfigError, match="x-main-nonblocking: requires"):
        config(**sets)


def test_a_sweep_varies_preempt_channels_with_preempt_set():
    """--vary values are checked alone (type, range); the point with the scenario's keys: two
    channels need preempt, which the scenario sets."""
    from emu.figures import sweep

    vary = sweep.parse_vary("migration.x-preempt-channels=1,2,4")
    assert vary.values == ("1", "2", "4")
    with pytest.raises(ConfigError, match="between 1 and 8"):
        sweep.parse_vary("migration.x-preempt-channels=1,9")
