"""The real-QEMU harness: QEMU's trace lines put together per request, the guest's progress
read from its faults, the one-line reason when QEMU cannot run, and where QEMU is installed
one short postcopy migration."""

import json
import os
import tempfile

import pytest

from emu.qemu import available, env, guest, harness, hugepages, traces
from emu.qemu.__main__ import main as qemu_main

needs_qemu = pytest.mark.skipif(available() is not None, reason=str(available()))

BASE = 0x7F0000000000  # the destination's host address of guest RAM offset 0
DESTINATION = """\
100@1000.000100:{f} HVA={a:#x} rb=pc.ram offset=0x300000 pid=7
100@1000.000110:postcopy_page_req_add new page req {a:#x} total 1
101@1000.004000:postcopy_place_page host={o:#x}
101@1000.005000:postcopy_page_req_del resolved page req {a:#x} total 0
101@1000.005001:postcopy_place_page host={a:#x}
100@1000.006000:{f} HVA={b:#x} rb=pc.ram offset=0x400000 pid=7
100@1000.006010:postcopy_page_req_add new page req {b:#x} total 1
100@1000.007000:{f} HVA={c:#x} rb=pc.ram offset=0x500000 pid=7
100@1000.007010:postcopy_page_req_add new page req {c:#x} total 2
101@1000.009000:postcopy_page_req_del resolved page req {b:#x} total 1
101@1000.009500:postcopy_page_req_del resolved page req {c:#x} total 0
qemu-system-x86_64: a line that is not an event
101@1000.010000:postcopy_ram_incoming_cleanup_blocktime total blocktime 9
""".format(a=BASE + 0x300000, b=BASE + 0x400000, c=BASE + 0x500000, o=BASE + 0x1000,
           f="postcopy_ram_fault_thread_request Request for")
SOURCE = """\
200@1000.000200:migrate_handle_rp_req_pages in pc.ram at 0x300000 len 0x1000
200@1000.000210:ram_save_queue_pages pc.ram: start: 0x300000 len: 0x1000
201@1000.003000:get_queued_page pc.ram/0x300000 page_abs=0x300
200@1000.006100:migrate_handle_rp_req_pages in (null) at 0x400000 len 0x1000
201@1000.006200:get_queued_page_not_dirty pc.ram/0x400000 page_abs=0x400
201@1000.001000:migration_rate_limit_pre 99
201@1000.002900:migration_rate_limit_post urgent: 1
"""


def _trace():
    return traces.assemble(list(traces.parse(DESTINATION.splitlines())),
                           list(traces.parse(SOURCE.splitlines())))


def test_requests_are_followed_by_host_page_through_both_qemus():
    trace = _trace()
    assert trace.block_base == BASE and trace.blocktime_ms == 9
    first, second, third = trace.requests
    assert (first.offset, first.fault, first.at_source, first.unqueued, first.resolved) == \
        (0x300000, 1000.0001, 1000.0002, 1000.003, 1000.005)
    assert second.at_source == 1000.0061 and second.unqueued is None
    assert second.already_sent == 1000.0062 and third.at_source is None
    assert trace.rate_limit_sleeps == [(1000.001, 1000.0029, True)]
    assert trace.placed == [1000.004, 1000.005001]


def test_latency_ends_at_req_del_or_at_the_thread_s_next_fault_if_earlier():
    latencies = [round(x * 1e6) for x in _trace().latencies()]
    # the second page's req_del (9.0 ms) came after its thread faulted again at 7.0 ms
    assert latencies == [4900, 1000, 2500]


def test_progress_counts_the_guest_s_touches_up_to_its_last_fault():
    walk = guest.Walk.for_ram("stride", 32 << 20)
    order = walk.order()
    trace = traces.Trace(block_base=BASE)
    start = 5 * walk.npages + 10  # pass 6, position 10
    # the vCPU faults at positions 12, 40 of pass 6 and 3 of pass 7; another thread and a
    # page outside the region do not count
    for t, position, pid in ((1.0, 12, 7), (1.5, 40, 7), (1.6, 50, 8), (2.0, 3, 7)):
        hva = BASE + walk.base + order[position] * guest.PAGE
        trace.faults.append(traces.Fault(t, pid, hva, 0))
    trace.faults.append(traces.Fault(2.5, 7, BASE + 0x1000, 0))
    touches, window = harness._progress(trace, walk, start, vcpu=7, resumed=0.5)
    assert touches == walk.npages + 3 - 10 and window == 1.5


def test_without_qemu_the_reason_is_one_line_with_the_install_command(monkeypatch):
    monkeypatch.setattr(env, "qemu_version", lambda: None)
    why = available()
    assert why == "qemu-system-x86_64 not found (install it: apt-get install qemu-system-x86)"
    with pytest.raises(harness.HarnessError, match="install it"):
        harness.run(harness.Scenario(ram=32 << 20))


def test_by_hand_without_qemu_says_so_in_one_line_and_exits_0(monkeypatch, capsys):
    monkeypatch.setattr(env, "qemu_version", lambda: None)
    assert qemu_main(["--pattern", "random"]) == 0
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "apt-get install qemu-system-x86" in err


def test_scenario_refuses_an_unknown_mode():
    with pytest.raises(ValueError, match="mode must be one of vanilla, preempt"):
        harness.Scenario(mode="fast")


def _children() -> list[str]:
    """This process's children, but for multiprocessing's resource tracker (earlier tests in
    the same run start it, and it stays)."""
    mine = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == os.getpid() and not _is_resource_tracker(pid):
            mine.append(pid)
    return mine


def _is_resource_tracker(pid: str) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"resource_tracker" in f.read()
    except OSError:
        return False


@needs_qemu
@pytest.mark.timeout(90)
def test_a_short_vanilla_postcopy_migration_completes_and_leaves_nothing(monkeypatch, tmp_path):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    # A precopy cap, so that the first pass takes longer than QEMU's first 100 ms window
    # (or the migration completes in precopy); postcopy is unlimited.
    result = harness.run(harness.Scenario(pattern="stride", ram=32 << 20, precopy=0.4,
                                          max_bandwidth=50_000_000, timeout=60))
    summary = result.summary()
    assert result.latencies and summary["count"] == len(result.latencies)
    assert result.verified and result.end.passes >= result.start.passes > harness.BOOT_PASSES
    assert result.version.startswith(".".join(map(str, env.qemu_version())))
    assert result.source["status"] == "completed" and result.blocktime_ms is not None
    assert os.listdir(tmp_path) == [] and _children() == []


def test_progress_on_huge_pages_takes_the_first_touch_of_any_page_in_the_fault_s():
    walk = guest.Walk.for_ram("stride", 32 << 20)
    order, huge = walk.order(), 2 << 20
    host = [(walk.base + page * guest.PAGE) // huge for page in order]
    trace = traces.Trace(block_base=BASE)
    expected, done = [], 5 * walk.npages + 10
    for t, position in ((1.0, 300), (2.0, 7000)):
        trace.faults.append(traces.Fault(t, 7, BASE + host[position] * huge, 0))
        while host[done % walk.npages] != host[position]:  # the guest's own walk, step by step
            done += 1
        expected.append(done)
    touches, window = harness._progress(trace, walk, 5 * walk.npages + 10, 7, 0.0, huge)
    assert touches == expected[-1] - (5 * walk.npages + 10) and window == 2.0


@needs_qemu
@pytest.mark.skipif(os.geteuid() != 0, reason="huge pages need root (mount, nr_hugepages)")
@pytest.mark.timeout(90)
def test_on_2mib_pages_a_migration_verifies_and_the_pool_and_mount_are_given_back(
        monkeypatch):
    monkeypatch.setattr(hugepages, "existing_mount", lambda size: None)  # a private mount
    counter = f"{hugepages.pool()}/nr_hugepages"
    with open(counter) as f:
        before = int(f.read())
    # break-huge off: the -global that only matters on huge pages
    scenario = dict(pattern="stride", mode="preempt-no-break-huge", ram=32 << 20,
                    precopy=0.4, max_bandwidth=50_000_000, timeout=60)
    try:
        with hugepages.hugetlbfs(2 * scenario["ram"]) as mount:
            assert os.statvfs(mount).f_bsize == 2 << 20
            result = harness.run(harness.Scenario(**scenario, hugetlbfs=mount))
    except hugepages.HugepagesError as e:
        pytest.skip(str(e))
    assert result.verified and result.latencies
    hosts = {r.host for r in result.trace.requests}
    assert all((h - result.trace.block_base) % (2 << 20) == 0 for h in hosts)
    assert not os.path.exists(mount) and not hugepages.is_mounted(mount)
    with open(counter) as f:  # lowered by what was added (others may change it meanwhile)
        assert int(f.read()) == before


@needs_qemu
@pytest.mark.timeout(90)
def test_by_hand_json_has_the_bench_s_figures(capsys):
    assert qemu_main(["--ram", "32MiB", "--bandwidth", "50MB/s", "--precopy", "400ms",
                      "--mode", "preempt", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["summary"]) == {"count", "median-ms", "mean-ms", "p99-ms", "blocktime-ms",
                                   "progress"}
    assert out["verified"] and out["summary"]["count"] > 0 and out["qemu"]


def test_a_migration_that_ends_in_precopy_says_why():
    first_window = {"status": "completed", "total-time": 44, "ram": {"dirty-sync-count": 2}}
    assert "within QEMU's first 100 ms" in harness._ended_in_precopy(first_window)
    converged = {"status": "completed", "total-time": 891, "ram": {"dirty-sync-count": 11}}
    assert "precopy converged" in harness._ended_in_precopy(converged)


def test_phases_count_the_requests_that_waited_at_the_source_and_the_silence_before():
    waited = traces.Request(BASE, 0, BASE, 7, fault=10.0, at_source=10.0002, unqueued=10.0502,
                            resolved=10.051)
    quick = traces.Request(BASE + 4096, 4096, BASE + 4096, 7, fault=10.06, at_source=10.0601,
                           unqueued=10.0602, resolved=10.061)
    trace = traces.Trace(requests=[waited, quick], placed=[10.005, 10.0102, 10.0506])
    phases = harness.Result(harness.Scenario(ram=32 << 20), "7.2.0", trace, None, None, None,
                            None, None).phases()
    assert phases["requests"] == 2 and phases["waited-at-source"] == 1
    assert phases["waited-median-ms"] == 50.0 and phases["silent-ms"] == 40.0


@needs_qemu
@pytest.mark.timeout(60)
def test_a_qemu_that_will_not_start_is_reported_and_nothing_is_left(monkeypatch, tmp_path):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with pytest.raises(harness.HarnessError, match="destination QEMU exited .*accel"):
        harness.run(harness.Scenario(ram=32 << 20, accel="no-such-accel"))
    assert os.listdir(tmp_path) == [] and _children() == []


@needs_qemu
@pytest.mark.timeout(60)
def test_a_parameter_qemu_refuses_is_a_harness_error_with_qemu_s_words(monkeypatch, tmp_path):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with pytest.raises(harness.HarnessError, match="QmpError: .*downtime_limit"):
        harness.run(harness.Scenario(ram=32 << 20, downtime_limit=10 ** 9))
    assert os.listdir(tmp_path) == [] and _children() == []
