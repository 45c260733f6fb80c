"""The analytical latency model (emu/figures/model.py): its terms, their shape, and the inputs it
reads off a scenario. Pure arithmetic: no migration runs here (tests/test_fidelity.py runs them)."""

import json

import pytest

from emu import cli
from emu.config import KEYS, load_config
from emu.figures import model
from emu.figures.model import MODES, Inputs, latency_terms, predict, predict_all
from emu.migration import wire

TEN_GBIT = 1.25e9  # bytes/s
KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30
RECORD = wire.pages_bytes(32, wire.READ_PAGES)  # a default postcopy write on the wire


def inputs(**changes) -> Inputs:
    base = dict(bandwidth=TEN_GBIT, rtt=200e-6, page_size=4 * KIB, backlog=4 * MIB,
                rest=16 * KIB, software=0.0)
    return Inputs(**{**base, **changes})


def total(mode: str, **changes) -> float:
    return sum(latency_terms(mode, inputs(**changes)).values())


# The network's terms alone: QEMU's threads' CPU time (the model's t, and the migration
# thread's busy share in r) has its own tests, tests/test_cpu_cost.py
NO_CPU = [f"{key}=0" for key in KEYS if key.startswith("cpu.")]


def cfg(*sets: str):
    """A scenario whose requests arrive at random moments (a hot set: a fault now and then);
    tests of back-to-back faults set workload.pattern=random."""
    return load_config(None, ["emulator.time-scale=1", "workload.pattern=hotset", *NO_CPU,
                              *sets])


# ---- the formula ----

@pytest.mark.parametrize(("page", "expected"), [(4 * KIB, 3.3e-6), (2 * MIB, 1.7e-3)])
def test_page_term_at_10_gbit(page, expected):
    # the notes' figures: P/B is 3.3 us for 4K and 1.7 ms for 2M at 10 Gbit/s
    terms = latency_terms("preempt", inputs(page_size=page))
    assert terms["page"] == pytest.approx(expected, rel=0.02)


def test_vanilla_queues_behind_the_backlog_and_shares_nothing():
    terms = latency_terms("vanilla", inputs())
    assert terms == pytest.approx({"rtt": 200e-6, "software": 0.0, "queued": 4 * MIB / TEN_GBIT,
                                   "rest": 16 * KIB / TEN_GBIT, "page": 4 * KIB / TEN_GBIT,
                                   "shared": 0.0})


@pytest.mark.parametrize("mode", ["preempt", "preempt-no-break-huge"])
def test_preempt_skips_the_backlog_but_shares_the_link(mode):
    terms = latency_terms(mode, inputs())
    assert terms["queued"] == 0.0
    assert terms["shared"] == pytest.approx(terms["page"])  # S >= P: half the bandwidth


def test_shared_term_is_min_of_page_and_backlog():
    page = 2 * MIB
    for backlog, expected in [(0, 0), (MIB, MIB), (2 * MIB, page), (64 * MIB, page)]:
        terms = latency_terms("preempt", inputs(page_size=page, backlog=backlog))
        assert terms["shared"] == pytest.approx(expected / TEN_GBIT)


@pytest.mark.parametrize("mode", MODES)
def test_latency_grows_with_the_page(mode):
    pages = [4 * KIB, 64 * KIB, 2 * MIB, 1 << 30]
    latencies = [total(mode, page_size=p) for p in pages]
    assert latencies == sorted(latencies) and len(set(latencies)) == len(latencies)


def test_vanilla_grows_with_the_backlog_preempt_only_up_to_a_page():
    backlogs = [0, 4 * KIB, 64 * KIB, 4 * MIB, 64 * MIB]
    vanilla = [total("vanilla", backlog=s) for s in backlogs]
    preempt = [total("preempt", backlog=s) for s in backlogs]
    assert vanilla == sorted(vanilla) and len(set(vanilla)) == len(vanilla)
    assert preempt == sorted(preempt)
    assert preempt[1:] == pytest.approx([preempt[1]] * 4)  # saturated once S >= P = 4 KiB
    assert vanilla[-1] - vanilla[0] == pytest.approx(64 * MIB / TEN_GBIT)


def test_head_of_line_blocking_figure_of_the_notes():
    # "~13 MB of socket buffers at 10 Gbit/s is ~10 ms"
    assert total("vanilla", backlog=13e6) == pytest.approx(10e-3, rel=0.1)


def test_unknown_mode():
    with pytest.raises(model.ModelError, match="unknown mode"):
        latency_terms("postcopy", inputs())


# ---- inputs read off a scenario ----

def test_backlog_is_whole_records_less_the_bytes_on_the_wire():
    # 1 MiB holds 7 records of 128 KiB + header, not 8; 12.5 KB are on the wire at 1 Gbit/s
    pred = predict(cfg("link.socket-buffer=1MiB", "link.bandwidth=1Gbit", "link.rtt=200us"))
    assert pred["inputs"]["backlog"] == pytest.approx(7 * RECORD - 125e6 * 100e-6)
    assert pred["terms-us"]["queued"] == pytest.approx(pred["inputs"]["backlog"] / 125e6 * 1e6)


def test_no_backlog_when_the_window_is_all_on_the_wire():
    pred = predict(cfg("link.socket-buffer=64KiB", "link.bandwidth=10Gbit", "link.rtt=10ms"))
    assert pred["inputs"]["backlog"] == 0


@pytest.mark.parametrize(("page", "mode", "rest"), [
    ("4KiB", "vanilla", 64 * KIB),  # half a record: runs of small pages share a record
    ("4KiB", "preempt", 64 * KIB),
    ("2MiB", "vanilla", MIB),  # half a huge page: the thread finishes it first
    ("2MiB", "preempt-no-break-huge", MIB),
    ("2MiB", "preempt", 64 * KIB),  # break-huge: half a record
])
def test_rest_is_half_the_unit_written_between_two_looks_at_the_queue(page, mode, rest):
    pred = predict_all(cfg(f"guest.page-size={page}", "guest.ram=1GiB"))[mode]
    assert pred["inputs"]["rest"] == rest


def test_rest_follows_the_write_granularity():
    small, large = (predict(cfg("migration.postcopy-preempt=true", f"emulator.chunk={c}"))
                    for c in ("4KiB", "256KiB"))
    assert small["inputs"]["rest"] == 2 * KIB and large["inputs"]["rest"] == 128 * KIB
    assert large["latency-us"] > small["latency-us"]


def test_write_wakeup_makes_the_thread_look_at_the_queue_less_often():
    # asleep on a full main until 1 MiB more than its record has drained, then a burst
    sets = ("link.socket-buffer=4MiB", "link.write-wakeup=1MiB", "link.bandwidth=1Gbit")
    preds = predict_all(cfg(*sets))
    assert preds["preempt"]["inputs"]["rest"] == (MIB + 128 * KIB) / 2
    # the urgent page follows the first record of a wake-up: main holds what is below 3 MiB
    held = (3 * MIB // RECORD) * RECORD
    assert preds["vanilla"]["inputs"]["backlog"] == pytest.approx(held - 125e6 * 100e-6)
    without = predict_all(cfg(*sets[:1], *sets[2:]))
    assert preds["preempt"]["latency-us"] > without["preempt"]["latency-us"]


WAKEUP = ("migration.postcopy-preempt=true", "link.socket-buffer=4MiB", "link.write-wakeup=1MiB",
          "link.bandwidth=1Gbit", "workload.touch-cost=2us")


def test_back_to_back_faults_wait_for_the_next_look_whatever_their_round_trip():
    # the next request comes back before the thread's next look (1 MiB + a record drained):
    # it waits for that look, so the latency is the cycle, less the one touch in between
    cycle = (MIB + 128 * KIB) / 125e6
    for rtt in ("100us", "400us"):
        pred = predict(cfg(*WAKEUP, "workload.pattern=random", f"link.rtt={rtt}"))
        assert pred["latency-us"] == pytest.approx((cycle - 2e-6) * 1e6)
    assert predict(cfg(*WAKEUP))["latency-us"] < (cycle - 2e-6) * 1e6  # at random: half


def test_a_back_to_back_request_back_within_two_cycles_waits_for_the_second_look():
    # a 1 GiB page sent whole: the next request comes back just after the thread started the
    # next page, and waits for all of it: two pages after the look that sent the last one
    sets = ("guest.page-size=1GiB", "guest.ram=20GiB", "link.bandwidth=10Gbit",
            "workload.touch-cost=1us")
    pred = predict(cfg(*sets, "workload.pattern=random"))
    assert pred["latency-us"] == pytest.approx(2 * GIB / TEN_GBIT * 1e6 - 1)
    assert predict(cfg(*sets))["latency-us"] < 1.6 * GIB / TEN_GBIT * 1e6  # at random: 1.5


def test_back_to_back_faults_spanning_cycles_arrive_at_random_phases():
    # vanilla: the page comes back behind ~15 MiB of main, 13 cycles: half a cycle again
    sets = (*WAKEUP, "migration.postcopy-preempt=false", "link.socket-buffer=16MiB")
    assert predict(cfg(*sets, "workload.pattern=random"))["inputs"]["rest"] == \
        predict(cfg(*sets))["inputs"]["rest"] == (MIB + 128 * KIB) / 2


def test_back_to_back_faults_under_a_cap_get_about_one_page_a_window():
    # QEMU 7.1/7.2 with 4 KiB pages: the fault made while the migration thread sleeps waits
    # for the next window (the gate in qemu_savevm_state_iterate()); with a window that fits
    # the socket there is no other: each fault lasts the window, less one touch
    sets = ("link.bandwidth=1Gbit", "workload.pattern=random")
    fits = predict(cfg(*sets, "migration.max-postcopy-bandwidth=5MB/s"))
    assert fits["latency-us"] == pytest.approx(1e5 - 2, abs=0.1)
    # 50 MB/s: the thread is blocked a while on a full main, where faults are quicker
    blocked = predict(cfg(*sets, "migration.max-postcopy-bandwidth=50MB/s"))
    at_random = predict(cfg("link.bandwidth=1Gbit", "migration.max-postcopy-bandwidth=50MB/s"))
    assert at_random["latency-us"] < blocked["latency-us"] < fits["latency-us"]


def test_write_wakeup_hides_inside_a_huge_page_sent_whole():
    pred = predict(cfg("guest.page-size=2MiB", "guest.ram=1GiB", "link.write-wakeup=256KiB"))
    assert pred["inputs"]["rest"] == MIB


def test_software_cost_shrinks_with_the_time_scale():
    slow = predict(cfg("emulator.time-scale=0.1"))
    assert slow["terms-us"]["software"] == pytest.approx(model.SOFTWARE_COST_S * 0.1 * 1e6)
    assert predict(cfg(), software_cost=0)["terms-us"]["software"] == 0
    assert predict(cfg(), software_cost=1e-3)["terms-us"]["software"] == pytest.approx(1e3)


def test_total_is_the_sum_of_the_terms():
    pred = predict(cfg("guest.page-size=2MiB", "migration.postcopy-preempt=true"))
    assert pred["mode"] == "preempt"
    assert pred["latency-us"] == pytest.approx(sum(pred["terms-us"].values()), abs=0.01)
    assert set(pred["terms-us"]) == set(model.TERMS)


def test_modes_in_order_for_huge_pages_on_a_full_link():
    preds = predict_all(cfg("guest.page-size=2MiB", "guest.ram=1GiB", "link.bandwidth=10Gbit"))
    lat = [preds[m]["latency-us"] for m in ("vanilla", "preempt-no-break-huge", "preempt")]
    assert lat == sorted(lat, reverse=True) and len(set(lat)) == 3
    assert [preds[m]["mode"] for m in MODES] == list(MODES)


def test_break_huge_does_not_matter_for_small_pages():
    preds = predict_all(cfg())
    assert preds["preempt"]["latency-us"] == preds["preempt-no-break-huge"]["latency-us"]


def test_no_prediction_without_postcopy():
    with pytest.raises(model.ModelError, match="precopy only"):
        predict(cfg("migration.postcopy-ram=false"))


# ---- a background rate cap (QEMU's 100 ms windows) ----

def test_a_cap_at_or_above_the_link_changes_nothing():
    full = predict(cfg())
    for cap in ("1Gbit", "2Gbit"):
        capped = predict(cfg(f"migration.max-postcopy-bandwidth={cap}"))
        assert capped["latency-us"] == pytest.approx(full["latency-us"])


def test_a_cap_whose_window_fits_the_socket_never_blocks_the_thread():
    # 8 MB/s lets 800 KB through per 100 ms window: less than the 4 MiB socket holds. The
    # thread sleeps all the window; a 4 KiB request waits for its end, half of it on average,
    # and goes first, main drained by then
    pred = predict(cfg("migration.max-postcopy-bandwidth=8MB/s", "migration.postcopy-preempt=on"))
    assert pred["inputs"]["main-full"] == 0 and pred["inputs"]["backlog"] == 0
    assert pred["inputs"]["rest"] == pytest.approx(125e6 * 0.05)


def test_with_huge_pages_a_request_during_the_sleep_waits_at_most_for_the_page():
    # the thread sleeps inside a host page: break-huge serves a request at once, otherwise
    # the rest of the page goes first (half a page on average)
    sets = ("guest.page-size=2MiB", "guest.ram=1GiB", "migration.max-postcopy-bandwidth=8MB/s")
    preds = predict_all(cfg(*sets))
    assert preds["preempt"]["inputs"]["rest"] == 0
    assert preds["preempt-no-break-huge"]["inputs"]["rest"] == pytest.approx(MIB)
    assert preds["vanilla"]["latency-us"] - preds["preempt"]["latency-us"] == pytest.approx(
        MIB / 125e6 * 1e6, rel=0.05)


def test_a_larger_cap_keeps_main_full_longer():
    caps = ["4MB/s", "40MB/s", "80MB/s", "120MB/s", "0"]
    preds = [predict(cfg(f"migration.max-postcopy-bandwidth={c}", "link.socket-buffer=1MiB"))
             for c in caps]
    full = [p["inputs"]["main-full"] for p in preds]
    lat = [p["latency-us"] for p in preds]
    assert full == sorted(full) and full[0] == 0 and full[-1] == 1
    # and with 4 KiB pages less time asleep, where requests wait for the next window
    assert lat[:4] == sorted(lat[:4], reverse=True) and lat[0] > 5 * lat[-1]
    # 40 MB/s: 4 MB per window, of which the socket holds 1 MiB; the rest blocks the thread
    assert full[1] == pytest.approx((4e6 - 7 * RECORD) / 125e6 / 0.1)


# ---- what people see ----

def test_format_prediction_lists_every_term():
    pred = predict(cfg("migration.postcopy-preempt=true"))
    text = model.format_prediction(pred)
    assert "postcopy-preempt, break-huge on" in text
    for name in (*model.TERMS, "total"):
        assert f"  {name} " in text
    assert f"{pred['latency-us']:.3f} us" in text


def test_cli_predict_json(capsys):
    assert cli.main(["predict", "--json", "--set", "guest.page-size=2MiB"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["mode"] == "vanilla"
    assert set(out["terms-us"]) == set(model.TERMS)
    assert set(out["all-modes-us"]) == set(MODES)
    assert out["all-modes-us"]["vanilla"] == out["latency-us"]


def test_cli_predict_table(capsys):
    assert cli.main(["predict", "default", "--set", "link.rtt=1ms"]) == 0
    out = capsys.readouterr().out
    assert "rtt 1ms" in out and "the same scenario in each mode" in out


def test_cli_predict_without_postcopy(capsys):
    assert cli.main(["predict", "--set", "migration.postcopy-ram=false"]) == 2
    assert "precopy only" in capsys.readouterr().err


def test_a_listen_thread_slower_than_the_link_sets_mains_pace():
    # 25 Gbit/s brings a 32 KiB record in 10.5 us; the listen thread places its 8 pages in
    # 16.9 us (cpu.place-page + 4 KiB x cpu.place-byte each): the window is the receiver's,
    # so main's backlog drains at the thread's pace
    fast = load_config(None, ["emulator.time-scale=1", "link.bandwidth=25Gbit",
                              "emulator.chunk=32KiB"])
    place = 8 * (500e-9 + 4096 * 400e-12)
    assert model.main_drain(fast) == pytest.approx(wire.pages_bytes(8, 8) / place)
    pred = predict(fast.with_overrides(["migration.postcopy-preempt=false"]))
    assert pred["terms-us"]["queued"] == pytest.approx(
        pred["inputs"]["backlog"] / model.main_drain(fast) * 1e6)
    # at 10 Gbit/s the thread keeps up: the link's pace, as before
    assert model.main_drain(fast.with_overrides(["link.bandwidth=10Gbit"])) == 1.25e9
