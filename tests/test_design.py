"""migration.design: QEMU 8.0's preempt-full (the return-path thread sends requested pages on
preempt itself) and 10.1's locality hint, against 7.1 (docs/concepts.md, "Designs: 7.1, 8.0,
10.1").

The source's threads run in-process on endpoints that take every record at once and note its
emulated time (tests/test_rate_limit.py's Stream): requests come through the return-path
thread's own handler, as the destination's messages do.
"""

import subprocess
import sys
import threading
import time

import pytest

from emu import trace
from emu.migration import wire
from tests.conftest import PATIENCE
from tests.test_rate_limit import KIB, SMALL, Stream

PAGE = 4 * KIB
ASKED = 900 * PAGE  # far from where the background scan is during the first window


def ask(s: Stream, offset: int) -> float:
    """The destination asks for the page at `offset`: the return-path thread reads the
    message (on this thread); the emulated time it was read."""
    t = s.src.clock.now()
    s.src.rp.handle(*wire.decode_rp(wire.req_pages(offset, PAGE, True)))
    return t


def ask_while_asleep(s: Stream) -> tuple[float, float]:
    """Ask 20 ms into the first rate-limit sleep: (when it was asked, when the sleep's window
    ends), both emulated."""
    assert s.slept.wait(PATIENCE)
    t_pre, _, fields = next(st for st in s.steps if st[1] == "migration_rate_limit_pre")
    time.sleep(0.02)
    t_req = ask(s, ASKED)
    window_end = t_pre + fields["ms"] / 1000
    if t_req > window_end - 0.02:  # this thread ran too late to ask during the sleep
        pytest.skip("the machine is too loaded to ask while the migration thread sleeps")
    return t_req, window_end


def stream(design: str, cap: str = "10MiB/s", on_send=None, **sets) -> Stream:
    s = Stream("preempt", cap, on_send=on_send, migration__design=design, **SMALL, **sets)
    s.src.rp.preempt = s.src.preempt  # what Source._connect() hands the return path
    trace.enable(["migration_rate_limit_*", "postcopy_preempt_*", "ram_page_hint_*"])
    return s


@pytest.mark.parametrize("design", ["7.1", "8.0"])
def test_a_request_during_the_rate_limit_sleep(design):
    # 7.1: the migration thread sends it, after the gate lets it through at the window's end;
    # 8.0: the return-path thread sends it as it reads it, and the migration thread sleeps on
    # (its rate_limit_sem is never posted)
    with stream(design) as s:
        t_req, window_end = ask_while_asleep(s)
        _, t_sent, channel = s.sent(ASKED)
    assert channel == "preempt"
    names = [name for _, name, _ in s.steps]
    if design == "7.1":
        assert t_sent >= window_end - 1e-3
        assert "postcopy_preempt_send_host_page" not in names
    else:  # at once, before the window ends (the time it takes is Python's)
        assert t_sent < window_end - 5e-3 and t_sent - t_req < 0.02
        assert ("postcopy_preempt_send_host_page", {"rbname": wire.BLOCK.decode(),
                                                    "page": ASKED // PAGE}) in \
            [(name, fields) for _, name, fields in s.steps]
        assert ("migration_rate_limit_post", {"urgent": 1}) not in \
            [(name, fields) for _, name, fields in s.steps]
    assert s.src.board["urgent-preempt"] == 1


@pytest.mark.parametrize("design", ["7.1", "8.0"])
def test_a_request_while_the_migration_thread_is_blocked_on_a_full_main(design):
    # main "full": the migration thread's 20th write blocks until released. 7.1: the urgent
    # page waits for it; 8.0: the return-path thread sends it meanwhile
    blocked, release = threading.Event(), threading.Event()

    def full(s, ep) -> None:
        if ep.name == "main" and len(s.log) == 20 and not release.is_set():
            blocked.set()
            release.wait(PATIENCE)

    with stream(design, cap="0", on_send=full) as s:
        assert blocked.wait(PATIENCE)
        asker = threading.Thread(target=ask, args=(s, ASKED))
        asker.start()
        time.sleep(0.1)
        sent_while_blocked = any(off == ASKED for _, _, off, _ in list(s.log))
        release.set()
        asker.join(PATIENCE)
        s.sent(ASKED)
    assert sent_while_blocked == (design == "8.0")


@pytest.mark.parametrize("design", ["8.0", "10.1"])
def test_the_10_1_hint_moves_the_background_scan(design):
    # after the page the return-path thread sent, 10.1's scan goes on just past it; 8.0's
    # goes on where it was
    with stream(design) as s:
        ask_while_asleep(s)
        i, _, _ = s.sent(ASKED)
        deadline = time.monotonic() + PATIENCE
        while len(s.log) <= i + 1:
            assert time.monotonic() < deadline
            time.sleep(0.005)
    _, _, offset, _ = s.log[i + 1]  # the first background record after it
    names = [name for _, name, _ in s.steps]
    if design == "10.1":
        assert offset == ASKED + PAGE
        assert "ram_page_hint_update" in names and "ram_page_hint_collect" in names
    else:
        assert offset < ASKED
        assert "ram_page_hint_update" not in names


def test_8_0_serves_no_request_from_the_queue_in_preempt_mode():
    with stream("8.0") as s:
        ask(s, ASKED)
        s.sent(ASKED)
    assert not s.src.rs.queue.nonempty.is_set()
    assert s.src.board["postcopy-requests"] == 1


def test_break_huge_is_refused_with_8_0():
    proc = subprocess.run(
        [sys.executable, "-m", "emu.cli", "run", "--set", "migration.design=8.0",
         "--set", "migration.x-postcopy-preempt-break-huge=false"],
        capture_output=True, text=True, timeout=PATIENCE)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "Property 'migration.x-postcopy-preempt-break-huge' not found" in lines[0]


def test_bench_preempt_full_table_json_shape(monkeypatch, capsys):
    # the six cells' shape, from a tiny guest at a fixed scale (what --quick runs, smaller)
    import json

    from emu.figures import preempttable, seedtable, timescale

    monkeypatch.setattr(timescale, "machine_cost", lambda: timescale.REFERENCE)
    monkeypatch.setattr(seedtable, "scaled",
                        lambda cfg, cost=None: cfg.with_overrides(["emulator.time-scale=0.25"]))
    tiny = ("guest.ram=32MiB", "link.bandwidth=1Gbit", "link.socket-buffer=1MiB",
            "link.write-wakeup=256KiB")
    assert preempttable.main(True, True, window=0.3, sets=tiny) == 0
    out = json.loads(capsys.readouterr().out)
    cells = out["cells"]
    assert [(c["pattern"], c["mode"]) for c in cells] == [
        (p, m) for p in ("random", "sequential") for m in ("vanilla", "preempt", "preempt-full")]
    for c in cells:
        assert {"pattern", "mode", "published-us", "emulated-us", "model-us", "samples"} <= set(c)
        assert c["published-us"] == preempttable.PUBLISHED_US[(c["pattern"], c["mode"])]
        assert c["model-us"] > 0 and c["samples"] >= 0
        assert c["published-samples"] == sum(preempttable.PUBLISHED_DIST[(c["pattern"],
                                                                          c["mode"])])
        assert set(c["shares"]) == set(c["published-shares"]) == {"on-its-way", "behind-main"}
    assert set(out["checks"]) == {"random", "sequential"}


def test_preempt_full_published_histograms_bracket_their_averages():
    # the letter's histograms as transcribed: each bucket's edges bound the letter's average
    from emu.figures import preempttable

    for cell, dist in preempttable.PUBLISHED_DIST.items():
        n = sum(dist)
        low = sum(k * (2 ** b if b else 0) for b, k in enumerate(dist)) / n
        high = sum(k * 2 ** (b + 1) for b, k in enumerate(dist)) / n
        assert low <= preempttable.PUBLISHED_US[cell] <= high, cell
    # one writer, blocked one fault at a time: samples x average is how long it was blocked
    assert preempttable.published("random", "vanilla")["published-blocked-s"] == 31.9


def test_preempt_full_shares():
    from emu.figures import preempttable

    # buckets 0-5 are under 64 us, 12 and up 4096 us and more
    assert preempttable.shares([1, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 0, 3, 1]) == {
        "on-its-way": 0.25, "behind-main": 0.5}
    assert preempttable.shares([]) == {"on-its-way": None, "behind-main": None}


@pytest.mark.parametrize("design", ["8.0", "10.1"])
def test_whole_migration_with_preempt_full(run_migration, design):
    # real processes: the return-path thread's pages arrive on preempt, memory intact, and
    # their save costs are its CPU time
    from tests.test_migration import assert_postcopy

    result = run_migration(migration__design=design, migration__postcopy_preempt="true",
                           workload__pattern="random", guest__vcpus=2)
    assert_postcopy(result, device=design == "10.1")
    assert result["latency"]["by-channel"]["preempt"]["count"] > 0


def test_2m_pages_with_preempt_full(run_migration):
    from tests.test_migration import assert_postcopy

    result = run_migration(migration__design="8.0", migration__postcopy_preempt="true",
                           guest__page_size="2MiB", guest__ram="64MiB")
    assert_postcopy(result)
    assert result["latency"]["by-channel"]["preempt"]["count"] > 0


@pytest.mark.parametrize("channel", ["main", "preempt"])
def test_preempt_full_recovers_from_a_cut(channel):
    # the return-path thread owns the preempt channel: a cut anywhere pauses, the recovery's
    # new preempt channel is handed to it
    from tests.test_recovery import assert_recovered, run_with

    result = run_with([f"cut {channel} at 20ms"], migration__design="8.0",
                      migration__postcopy_preempt="true", guest__vcpus=2,
                      workload__pattern="random")
    assert_recovered(result)
    assert result["latency"]["by-channel"]["preempt"]["count"] > 0


@pytest.mark.parametrize("cap", ["0", "10MB/s"])
def test_the_model_s_preempt_full_has_no_wait_for_the_migration_thread(cap):
    from emu.config import load_config
    from emu.figures import model

    sets = ["migration.postcopy-preempt=true", f"migration.max-postcopy-bandwidth={cap}"]
    full = model.predict(load_config("preempt-full-10g", [*sets, "migration.design=8.0"]))
    old = model.predict(load_config("preempt-full-10g", [*sets, "migration.design=7.1"]))
    assert full["mode"] == "preempt-full" and old["mode"] == "preempt"
    assert full["terms-us"]["rest"] == 0 and old["terms-us"]["rest"] > 0
    assert full["latency-us"] < old["latency-us"]
    same = {"rtt", "page", "software"}
    assert {k: full["terms-us"][k] for k in same} == {k: old["terms-us"][k] for k in same}


def test_8_0_vanilla_keeps_the_queue_and_the_wait_for_the_window():
    # without preempt, 8.0's return path queues as 7.1's does: the page waits for the gate
    s = Stream("vanilla", "10MiB/s", migration__design="8.0", **SMALL)
    with s:
        _, window_end = ask_while_asleep(s)
        _, t_sent, channel = s.sent(ASKED)
    assert channel == "main" and t_sent >= window_end - 1e-3


def test_the_time_scale_calibration_measures_faults():
    # its capped preempt faults run on design 8.0: under 7.1's rate limiter each waited for
    # the next 100 ms window and the calibration measured nothing (RuntimeError)
    from emu.figures import timescale

    cost = timescale.calibrate()
    assert cost.per_fault > 0 and cost.per_frame >= 0
