"""Whole migrations between real processes, named after QEMU's qtests.

Every assertion is on emulated time, counts and memory contents, never on wall-clock time.
"""

import numpy as np
import pytest

from emu.controller import Run
from emu.figures.metrics import FAULT_DTYPE
from tests.conftest import config


def assert_completed(result):
    assert result["status"] == "completed", result["errors"]
    assert result["integrity"]["ok"], result["integrity"]
    for side in ("source", "destination"):
        states = [s["status"] for s in result["states"][side]]
        assert states[0] == "setup" and states[-1] == "completed", states
        times = [s["time"] for s in result["states"][side]]
        assert times == sorted(times)


def assert_postcopy(result, device: bool = False):
    """device: the design has QEMU 10.2's postcopy-device, from the device state (source) or
    POSTCOPY_LISTEN (destination) until the guest runs on the destination."""
    assert_completed(result)
    between = ["postcopy-device"] if device else []
    assert [s["status"] for s in result["states"]["source"]] == [
        "setup", "active", "device", *between, "postcopy-active", "completed"]
    assert [s["status"] for s in result["states"]["destination"]] == [
        "setup", "active", *between, "postcopy-active", "completed"]
    lat = result["latency"]
    assert lat["count"] > 0 and lat["avg-us"] > 0
    assert sum(lat["dist"]) == lat["count"]
    assert result["query-migrate"]["ram"]["postcopy-requests"] > 0


def test_postcopy_plain(run_migration):
    result = run_migration(workload__pattern="ab")
    assert_postcopy(result)
    assert result["latency"]["by-channel"]["preempt"]["count"] == 0
    qm = result["query-migrate"]
    assert qm["ram"]["postcopy-bytes"] > 0 and qm["ram"]["precopy-bytes"] > 0
    assert qm["ram"]["transferred"] >= 32 << 20


def test_postcopy_preempt_plain(run_migration):
    # random pages: a guest walking in order (ab) catches up with the background scan, which
    # 7.1 moves just past each requested page, so its faults find pages already on main
    result = run_migration(workload__pattern="random", migration__postcopy_preempt="true")
    assert_postcopy(result)
    assert result["latency"]["by-channel"]["preempt"]["count"] > 0


@pytest.mark.parametrize("break_huge", ["true", "false"])
def test_postcopy_preempt_2M_pages(run_migration, break_huge):
    result = run_migration(guest__page_size="2MiB", guest__ram="64MiB",
                           migration__postcopy_preempt="true",
                           migration__x_postcopy_preempt_break_huge=break_huge)
    assert_postcopy(result)
    assert result["latency"]["by-channel"]["preempt"]["count"] > 0


def test_postcopy_several_vcpus_random(run_migration):
    result = run_migration(guest__vcpus=4, workload__pattern="random",
                           migration__postcopy_preempt="true")
    assert_postcopy(result)
    assert len(result["query-migrate"]["postcopy-vcpu-blocktime"]) == 4
    assert sum(v > 0 for v in result["blocktime-ms"]["per-vcpu"]) >= 2


def test_postcopy_sequential_checks_previous_values(run_migration):
    result = run_migration(workload__pattern="sequential", guest__vcpus=2)
    assert_postcopy(result)
    assert result["integrity"]["bad-touches"] == 0


def test_postcopy_without_payload(run_migration):
    result = run_migration(emulator__payload="false", guest__ram="256MiB", emulator__time_scale=1,
                           migration__postcopy_preempt="true")
    assert_postcopy(result)
    assert "states" in result["integrity"]["checked"]


def test_precopy_only_stop_and_copy(run_migration):
    result = run_migration(migration__postcopy_ram="false", workload__pattern="ab")
    assert_completed(result)
    assert result["latency"]["count"] == 0
    assert result["query-migrate"]["ram"]["downtime-bytes"] > 0


def test_preempt_beats_vanilla_on_4k_random(run_migration):
    """The point of the feature: with a socket buffer much larger than a page, an urgent page
    in vanilla waits behind the whole background stream; on its own channel it does not."""
    sets = dict(workload__pattern="random", link__socket_buffer="2MiB", guest__ram="64MiB",
                emulator__time_scale="0.1")  # the emulator's own cost: 1/10 in emulated time
    vanilla = run_migration(**sets)
    preempt = run_migration(migration__postcopy_preempt="true", **sets)
    for result in (vanilla, preempt):
        assert_postcopy(result)
        assert result["latency"]["count"] >= 10
    assert vanilla["latency"]["avg-us"] >= 5 * preempt["latency"]["avg-us"], (
        vanilla["latency"], preempt["latency"])


def test_fault_records_are_complete():
    from emu.controller import Run
    from tests.conftest import config

    with Run(config(workload__pattern="random")) as run:
        run.wait()
        faults = run.reports["destination"]["faults"]
        assert faults.dtype == FAULT_DTYPE and len(faults)
        switchover = dict(run.states["destination"])["postcopy-active"]
        assert (faults["time"] >= switchover).all()
        assert (faults["latency"] > 0).all()
        assert set(np.unique(faults["channel"])) <= {0}
        assert (faults["page"] < run.cfg.npages).all()
        live, count = run.faults(0)
        assert count == len(faults) and (live["page"] == faults["page"]).all()


def test_break_huge_interrupts_huge_pages_only_when_on(run_migration):
    sets = dict(guest__page_size="2MiB", guest__ram="64MiB", migration__postcopy_preempt="true",
                guest__vcpus=2)
    on = run_migration(migration__x_postcopy_preempt_break_huge="true", **sets)
    off = run_migration(migration__x_postcopy_preempt_break_huge="false", **sets)
    assert on["requests"]["break-huge"] > 0
    assert off["requests"]["break-huge"] == 0
    for result in (on, off):
        assert_postcopy(result)
        assert result["requests"]["urgent-main"] == 0  # preempt: urgent pages never on main


def test_the_source_pings_around_the_device_state_as_qemu():
    """migration_thread() sends PING 1 at the start (its PONG is 8.0's sign that main is up),
    postcopy_start() PING 2 before POSTCOPY_LISTEN and PING 3 before POSTCOPY_RUN; the
    destination answers each on the return path."""
    with Run(config(workload__pattern="ab")) as run:
        run.wait()
        assert run.ok
        assert run.board("source")["pongs"] == 3


def test_dirty_sync_count_counts_qemus_syncs_and_none_in_postcopy():
    """migration_bitmap_sync() at setup (ram_init_bitmaps), per completed precopy round
    (ram_save_pending) and at the switchover (ram_postcopy_send_discard_bitmap); never in
    postcopy. 32 MiB at 1 Gbit/s is a round in about 0.27 s: two rounds before 600 ms."""
    with Run(config(workload__pattern="ab", migration__postcopy_preempt="true",
                    migration__switchover_after="600ms")) as run:
        while run.status["source"] != "postcopy-active" and not run.finished:
            run.poll()
        at_switchover = run.board("source")["dirty-sync-count"]
        run.wait()
        assert run.ok
        assert at_switchover >= 4  # setup, two rounds, the switchover
        assert run.board("source")["dirty-sync-count"] == at_switchover
