"""The preempt channel is created asynchronously (QEMU 7.1, d0edb8a173) and, from 8.0, only
once the main channel is up (5655aab079): whole migrations with the `delay CHANNEL-connect`
fault, which makes a channel's connection late.

Assertions are on emulated time, counts, the trace points and the memory, never wall-clock.
"""

import pytest

from emu import faults
from emu.cli import summary
from emu.config import ConfigError
from emu.controller import migrate
from tests.conftest import config
from tests.test_migration import assert_completed, assert_postcopy

PREEMPT = {"migration__postcopy_preempt": "true", "workload__pattern": "ab"}


def run(design: str, *fault_texts: str, **sets) -> dict:
    cfg = config(**{**PREEMPT, "migration__design": design, **sets})
    return migrate(cfg, faults=[faults.parse(t) for t in fault_texts],
                   trace=("postcopy_preempt_new_channel", "pce_postcopy_preempt_wait_channel",
                          "get_queued_page"))


def traced(result: dict, name: str) -> list[dict]:
    return [e for e in result["events"] if e.get("trace") == name]


def test_the_delay_fault_parses_and_describes_itself():
    fault = faults.parse("delay preempt-connect 50ms")
    assert (fault.action, fault.channel, fault.delay) == ("delay", "preempt", 0.05)
    assert fault.describe() == "delay preempt-connect 50ms"
    assert faults.check({"action": "delay", "channel": "main", "delay": "1s"}).delay == 1.0
    with pytest.raises(ConfigError, match="a delay's channel must be one of main, preempt"):
        faults.parse("delay return-connect 5ms")
    with pytest.raises(ConfigError, match="delay must be a duration"):
        faults.check({"action": "delay", "channel": "preempt", "delay": "soon"})


def first(result: dict, side: str, status: str) -> float:
    return next(s["time"] for s in result["states"][side] if s["status"] == status)


@pytest.mark.parametrize("design", ["7.1", "8.0"])
def test_a_late_preempt_channel_holds_the_migration_where_the_design_waits(design):
    """A 300 ms preempt connection, 100 ms of precopy. 7.1 connects it behind main, and its
    destination loads nothing until every channel is in (migration_has_all_channels()): the
    whole precopy stalls until 300 ms, main full. 8.0 starts on main alone, connects preempt
    in postcopy_start() after the first PONG and waits for it there: 300 ms more before the
    switchover. Either way no urgent page goes on main."""
    result = run(design, "delay preempt-connect 300ms")
    assert_postcopy(result)
    waited = traced(result, "pce_postcopy_preempt_wait_channel")
    assert [w["fields"]["what"] for w in waited] == ["postcopy_start"]
    if design == "7.1":
        assert first(result, "destination", "active") >= 0.3
    else:
        assert waited[0]["fields"]["ms"] >= 299, waited
        assert first(result, "destination", "active") < 0.1
    assert first(result, "source", "device") >= 0.3
    assert result["requests"]["urgent-main"] == 0
    cfg = config(**{**PREEMPT, "migration__design": design})
    assert "  fault: delay preempt-connect 300 ms" in summary(result, cfg).splitlines()


def test_a_preempt_channel_that_reaches_the_destination_first_still_completes():
    """7.1: main's first frame is 200 ms late, so the preempt channel, started right behind
    main's connection, says its hello first. The destination tells them apart by their
    hellos, in either order (QEMU 7.1's, taking the first connection for main, hung here:
    what 8.0's 5655aab079 fixed on the source)."""
    result = run("7.1", "delay main-connect 200ms")
    assert_postcopy(result)
    preempt_in = next(e["time"] for e in traced(result, "postcopy_preempt_new_channel")
                      if e["role"] == "destination")
    active = next(s["time"] for s in result["states"]["destination"] if s["status"] == "active")
    assert preempt_in < 0.2 <= active  # preempt was in before main said anything


def test_with_8_0_the_preempt_channel_follows_main():
    """8.0: the preempt channel connects only after main's first PONG, even with main late."""
    result = run("8.0", "delay main-connect 200ms")
    assert_postcopy(result)
    dst = [e for e in result["events"] if e.get("role") == "destination"
           and e.get("trace") == "postcopy_preempt_new_channel"]
    assert len(dst) == 1 and dst[0]["time"] > 0.2


@pytest.mark.parametrize("design", ["7.1", "8.0"])
def test_what_if_postcopy_did_not_wait_for_the_preempt_channel(design):
    """x-preempt-wait-channel=false, an experiment QEMU does not have: postcopy starts with
    the preempt channel still connecting (300 ms late), the first urgent pages go on main,
    the later ones on preempt; the memory arrives intact."""
    result = run(design, "delay preempt-connect 300ms", migration__x_preempt_wait_channel="false",
                 workload__pattern="random", migration__max_postcopy_bandwidth="40MiB/s",
                 emulator__duration_limit="30s")
    assert_postcopy(result)  # memory intact too
    assert not traced(result, "pce_postcopy_preempt_wait_channel")[:-1]  # only the EOFs'
    up = next(e["time"] for e in traced(result, "postcopy_preempt_new_channel")
              if e["role"] == "source")
    assert result["requests"]["urgent-main"] > 0 and result["requests"]["urgent-preempt"] > 0
    sent = [(e["time"], e["fields"]["channel"]) for e in traced(result, "get_queued_page")]
    assert all(channel == "main" for t, channel in sent if t < up)
    assert all(channel == "preempt" for t, channel in sent if t > up + 0.01)
    device = next(s["time"] for s in result["states"]["source"] if s["status"] == "device")
    assert device < up  # postcopy began before the channel was up


@pytest.mark.parametrize("design", ["7.1", "8.0"])
def test_a_recovery_waits_for_its_late_preempt_channel(design):
    """The recovery's preempt channel is late too: 7.1 waits for it before the handshake,
    8.0 connects it after RECV_BITMAP's round trip; either way the recovery completes."""
    cfg = config(**{**PREEMPT, "migration__design": design})
    result = migrate(cfg, faults=[faults.parse("delay preempt-connect 50ms"),
                                  faults.parse("cut main at 30ms")], recover_after=0.05,
                     trace=("pce_postcopy_preempt_wait_channel",))
    assert_completed(result)
    waited = traced(result, "pce_postcopy_preempt_wait_channel")
    recovery = [w["fields"]["ms"] for w in waited if w["fields"]["what"] == "recovery"]
    assert len(recovery) == 1 and recovery[0] > 40, waited  # 50 ms less the RECV_BITMAP trip
