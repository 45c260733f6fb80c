"""Postcopy recovery, named after QEMU's qtests: break the network mid-postcopy, lose nothing.

Each test asserts the state sequence on both sides and the memory check.
"""

import time

import pytest

from emu.controller import Run, migrate
from emu.faults import Fault, parse
from tests.conftest import PATIENCE, config
from tests.test_migration import assert_completed

# the source's states through a recovery: QEMU 9.1 added postcopy-recover-setup (the 10.1
# design has it); before, the source connects in postcopy-paused
RECOVERY = {"7.1": ["postcopy-active", "postcopy-paused", "postcopy-recover", "postcopy-active"],
            "10.1": ["postcopy-active", "postcopy-paused", "postcopy-recover-setup",
                     "postcopy-recover", "postcopy-active"]}


def statuses(result, side):
    return [s["status"] for s in result["states"][side]]


def assert_recovered(result, times=1):
    assert_completed(result)
    src = statuses(result, "source")
    assert src[:3] == ["setup", "active", "device"] and src[-1] == "completed", src
    assert src.count("postcopy-paused") == times and src.count("postcopy-recover") >= times, src
    assert "postcopy-paused" in statuses(result, "destination")
    assert result["recoveries"] >= times


def run_with(faults, recover_after=0.05, **sets):
    return migrate(config(**sets), None, [parse(f) for f in faults], recover_after)


@pytest.mark.parametrize("design", ["7.1", "10.1"])
def test_postcopy_recovery_plain(design):
    # 10.1: past postcopy-device (the next iteration after the destination's PONG), or the
    # cut fails the migration (tests/test_postcopy_device.py)
    result = run_with(["cut main at 80ms"], workload__pattern="ab", migration__design=design)
    assert_recovered(result)
    src = statuses(result, "source")
    assert src[src.index("postcopy-active"):-1] == RECOVERY[design]
    dst = statuses(result, "destination")
    assert dst[dst.index("postcopy-active"):] == [
        "postcopy-active", "postcopy-paused", "postcopy-recover", "postcopy-active", "completed"]


def test_postcopy_preempt_recovery_plain():
    result = run_with(["cut preempt at 30ms"], workload__pattern="ab",
                      migration__postcopy_preempt="true")
    assert_recovered(result)
    assert result["latency"]["by-channel"]["preempt"]["count"] > 0


def test_postcopy_recovery_double_failures_handshake():
    """The link breaks again in the middle of the recovery handshake: back to paused, and
    the next recovery completes."""
    result = run_with(["cut main at 80ms", "cut main at postcopy-recover"],
                      workload__pattern="ab", migration__design="10.1")
    assert_recovered(result, times=2)
    src = statuses(result, "source")
    first = src.index("postcopy-paused")
    assert src[first:first + 4] == ["postcopy-paused", "postcopy-recover-setup",
                                    "postcopy-recover", "postcopy-paused"]


def test_postcopy_recovery_double_failures_reconnect():
    """The first migrate resume goes to an address nobody listens on (as QEMU's test does):
    the source goes back to postcopy-paused, and a later recovery completes. QEMU 9.1's
    postcopy-recover-setup is what tells that the attempt failed (the 10.1 design)."""
    run = Run(config(workload__pattern="ab", migration__design="10.1"),
              [Fault(0.08, "cut", "main")], recover_after=None)
    try:
        run.start()
        while run.status["source"] != "postcopy-paused" or \
                run.status["destination"] != "postcopy-paused":
            run.poll()
            assert not run.finished, run.errors
        run.command("source", "migrate-resume", f"unix:{run.tmpdir}/nobody.sock")
        while [s for s, _ in run.states["source"]].count("postcopy-recover-setup") < 1 or \
                run.status["source"] != "postcopy-paused":
            run.poll()
        run.recover()
        run.wait()
        assert run.ok, run.errors
    finally:
        run.stop()
    src = [s for s, _ in run.states["source"]]
    assert src.count("postcopy-recover-setup") == 2 and src[-1] == "completed", src


def test_before_9_1_a_failed_reconnect_leaves_the_source_paused_without_a_word():
    """7.1: migrate resume to an address nobody listens on changes no state (no
    postcopy-recover-setup, so no MIGRATION event); only migrate_fd_error is traced. A later
    recovery completes."""
    run = Run(config(workload__pattern="ab"), [Fault(0.03, "cut", "main")], recover_after=None,
              trace=("migrate_fd_error",))
    try:
        run.start()
        while run.status["source"] != "postcopy-paused" or \
                run.status["destination"] != "postcopy-paused":
            run.poll()
            assert not run.finished, run.errors
        before = list(run.states["source"])
        run.command("source", "migrate-resume", f"unix:{run.tmpdir}/nobody.sock")
        deadline = time.monotonic() + PATIENCE
        while not any("migrate_fd_error" in str(what) for _, what in run.events_in_order()):
            run.poll()
            assert time.monotonic() < deadline, run.states
        assert run.states["source"] == before and run.status["source"] == "postcopy-paused"
        run.recover()
        run.wait()
        assert run.ok, run.errors
    finally:
        run.stop()
    src = [s for s, _ in run.states["source"]]
    assert "postcopy-recover-setup" not in src and src[-1] == "completed", src


@pytest.mark.parametrize("channel", ["main", "preempt", "return"])
def test_cut_each_channel(channel):
    result = run_with([f"cut {channel} at 20ms"], migration__postcopy_preempt="true",
                      guest__vcpus=2)
    assert_recovered(result)
    assert result["faults"][0]["channel"] == channel


def test_corrupted_bytes_break_the_connection_never_the_memory():
    result = run_with(["corrupt main at 20ms"], workload__pattern="sequential")
    assert_recovered(result)
    assert result["integrity"]["bad-touches"] == 0
    assert any("checksum" in e["event"] for e in result["events"])


def test_migrate_pause_then_recover():
    result = run_with(["pause at 20ms"], migration__postcopy_preempt="true")
    assert_recovered(result)


def test_2M_pages_recover_with_half_sent_huge_pages():
    """Host pages half assembled in a temporary page when the link breaks are sent again."""
    result = run_with(["cut main at 15ms"], guest__page_size="2MiB", guest__ram="64MiB",
                      migration__postcopy_preempt="true")
    assert_recovered(result)


def test_last_urgent_pages_are_not_lost_at_the_end():
    """QEMU once stopped the destination's preempt thread on main's EOF, losing urgent pages
    still on their way: completion here waits for every channel's end of stream."""
    cfg = config(migration__postcopy_preempt="true", guest__vcpus=4, workload__pattern="random")
    with Run(cfg) as run:
        run.wait()
        assert run.ok, run.errors
        done = dict(run.states["destination"])["completed"]
        pages = run.pages()
        urgent = pages.dst == 6  # URGENT_PREEMPT
        assert urgent.any()
        assert pages.arrival[urgent].max() <= done
        assert (pages.dst >= 3).all()


def test_no_recovery_means_the_run_does_not_complete():
    result = migrate(config(emulator__duration_limit="300ms"), None,
                     [parse("cut main at 20ms")], None)
    assert result["status"] == "failed"
    assert statuses(result, "source")[-1] == "postcopy-paused"
