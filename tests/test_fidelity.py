"""The emulator against the analytical model (emu/figures/model.py, docs/concepts.md "The latency
model").

In controlled scenarios the mean emulated latency of the faults the model describes lies within
15% of its prediction. Everything is emulated time, where the emulator's own delays count only
x time-scale. How each scenario makes the model's inputs well defined:

- Main is full: max-postcopy-bandwidth=0, postcopy from the start (switchover-after=0, so
  nearly every page faults), and a guest the background stream is still sending while the vCPU
  faults. One vCPU, so requests never queue behind each other (the model has no queueing).
- Only the faults the model describes: a fault on a page that was already in flight on main
  when requested waits for main, whatever the mode (the source drops the request, as QEMU does).
  The model is about the others, whose page the source sent as an urgent page: on main in
  vanilla, on the preempt channel otherwise.
- Requests arrive at random points of the main stream: the model's r is half the unit the
  migration thread writes between two looks at the request queue, an average over where the
  request lands in it. Where r matters (two thirds of the 4K preempt latency, a fifth of the 2M
  break-huge-off one), the workload is a tiny hot set, soon present, and rare cold touches: the
  gap between two faults is then a random number of the vCPU's 64-touch batches, spread over
  more than the unit's time on the link. The other case the model knows, a vCPU faulting back
  to back whose next request comes back before the thread's next look (it waits for that look:
  the latency is the period between looks), has its own scenario.
- Under a cap (the last scenario), a 4 KiB request made while the migration thread sleeps over
  budget waits for the next 100 ms window, as in QEMU 7.1/7.2 (docs/concepts.md, "The rate
  limiter and urgent pages"); a vCPU faulting back to back then gets one page per window.
- payload=false: headers travel and the link charges the page bytes, so a guest of 768 MiB
  costs neither memory nor copying (2 MiB pages need that many to fault often at 10 Gbit/s).

The time scale: the model charges the emulator's own work per fault as measured on an idle
machine (model.SOFTWARE_COST_S); a busy machine adds to it (a fault wakes half a dozen threads
in three processes, each a scheduler slice late when every core is taken), and so does the lag
with which frames are read. All of it counts x time-scale, so each scenario runs slow enough
(time_scale) that LOAD_ROOM_S more real time per fault still moves its figure by at most half
the tolerance. Nothing is skipped on a busy machine: a figure off by more than the tolerance
fails, lag or not.
"""

import numpy as np
import pytest

from emu.config import load_config
from emu.controller import Run, migrate
from emu.figures import report
from emu.figures.model import predict
from emu.migration.ram import SENT_URGENT_MAIN

TOLERANCE = 0.15
MIN_FAULTS = 25  # below this the mean of r's spread is too noisy to compare
# Real time per fault a loaded machine may add to the emulator's own. Measured on 2 cores, with
# other migrations and tests running beside: at a load of 3-5 well under 1 ms; with 3 or 4 busy
# loops more, 2 to 2.6 ms (every scenario passes); with 5, 7 ms for 2M pages and 25 ms for
# the 4K preempt one, which then fails (+37%): the machine no longer runs the emulator's
# threads when they wake. 7 ms keeps the file near a minute.
LOAD_ROOM_S = 7e-3
MAX_SCALE = 0.05  # the vanilla figure is already 8% above the model: more room for it

COMMON = {
    "emulator.payload": "false",
    "migration.switchover-after": "0",
    "migration.max-postcopy-bandwidth": "0",
    "guest.vcpus": "1",
    "link.rtt": "200us",
    "emulator.duration-limit": "20s",
}
# A hot set of a few pages and rare cold touches: random gaps between faults (see above).
SPREAD = {"workload.pattern": "hotset", "workload.hot-fraction": "0.002"}


def time_scale(cfg) -> float:
    """Slow enough that LOAD_ROOM_S of real time per fault is at most half the tolerance of
    the predicted latency, in emulated time."""
    network_us = predict(cfg, software_cost=0.0)["latency-us"]
    return round(min(MAX_SCALE, TOLERANCE / 2 * network_us * 1e-6 / LOAD_ROOM_S), 4)


def config(**sets: str):
    cfg = load_config(None, [f"{k}={v}" for k, v in {**COMMON, **sets}.items()])
    return cfg.with_overrides([f"emulator.time-scale={time_scale(cfg)}"])


def check(cfg, mean_us: float, count: int, lag_us: float) -> None:
    pred = predict(cfg)
    assert count >= MIN_FAULTS, f"only {count} faults to compare"
    error = mean_us / pred["latency-us"] - 1
    terms = ", ".join(f"{k} {v:.1f}" for k, v in pred["terms-us"].items())
    assert abs(error) <= TOLERANCE, (
        f"emulated mean {mean_us:.1f} us over {count} faults vs model {pred['latency-us']:.1f} us "
        f"({error:+.1%}) at time-scale {cfg['emulator.time-scale']:g}; model terms (us): "
        f"{terms}; emulator lag {lag_us} us per frame (emulated)")


def urgent_on_main(cfg) -> tuple[np.ndarray, float]:
    """Latencies (us) of the faults whose page the source sent as an urgent page on main, and
    the emulator's lag. The report mixes these faults with those on pages already in flight on
    main, so ask the run how the source sent each page."""
    with Run(cfg) as run:
        run.wait()
        assert run.ok, run.errors
        faults = run.reports["destination"]["faults"]
        sent_as = run.pages().src[faults["page"]]
        lag = report.build(run, None, 0.0)["emulator"]["lag-avg-us"]
    return faults["latency"][sent_as == SENT_URGENT_MAIN] * 1e6, lag


def test_vanilla_4k_waits_for_the_full_main_socket():
    # 1 MiB socket at 1 Gbit/s: ~8 ms of head-of-line blocking per fault
    cfg = config(**{"guest.ram": "64MiB", "link.bandwidth": "1Gbit",
                    "link.socket-buffer": "1MiB"})
    latencies, lag = urgent_on_main(cfg)
    check(cfg, float(np.mean(latencies)), len(latencies), lag)


PREEMPT = [
    pytest.param({
        # r is half a 128 KiB record: 524 us of ~0.8 ms
        "guest.ram": "16MiB", "link.bandwidth": "1Gbit", "link.socket-buffer": "1MiB", **SPREAD,
        "workload.hot-probability": "0.99", "workload.touch-cost": "2.5us",
    }, id="4K"),
    pytest.param({
        # r is half a huge page: 0.84 ms of ~4.4. The unit is the whole huge page whatever
        # the record size, so large records spare the relay's work at no cost to the model.
        "guest.ram": "768MiB", "guest.page-size": "2MiB", "link.bandwidth": "10Gbit",
        "migration.x-postcopy-preempt-break-huge": "false", "emulator.chunk": "512KiB",
        **SPREAD, "workload.hot-probability": "0.999", "workload.touch-cost": "4us",
    }, id="2M-break-huge-off"),
    pytest.param({
        # r is half a 128 KiB record, 52 us of ~3.6 ms: any workload will do
        "guest.ram": "320MiB", "guest.page-size": "2MiB", "link.bandwidth": "10Gbit",
    }, id="2M-break-huge-on"),
]


@pytest.mark.parametrize("sets", PREEMPT)
def test_preempt_urgent_pages_share_the_link_with_the_full_main(sets):
    cfg = config(**{"migration.postcopy-preempt": "true", **sets})
    result = migrate(cfg)
    assert result["status"] == "completed", result["errors"]
    preempt = result["latency"]["by-channel"]["preempt"]
    check(cfg, preempt["avg-us"], preempt["count"], result["emulator"]["lag-avg-us"])


def test_back_to_back_faults_wait_a_whole_wakeup_cycle():
    # random touches: every one faults, and the next request reaches the source ~0.3 ms after
    # the look that sent the last page, well inside the thread's 3.1 ms wake-up cycle (256 KiB
    # + a record drained at 1 Gbit/s): the latency is the cycle, whatever the software cost
    cfg = config(**{"migration.postcopy-preempt": "true", "guest.ram": "32MiB",
                    "link.bandwidth": "1Gbit", "link.socket-buffer": "1MiB",
                    "link.write-wakeup": "256KiB", "workload.pattern": "random",
                    "workload.touch-cost": "2.5us"})
    result = migrate(cfg)
    assert result["status"] == "completed", result["errors"]
    preempt = result["latency"]["by-channel"]["preempt"]
    check(cfg, preempt["avg-us"], preempt["count"], result["emulator"]["lag-avg-us"])


@pytest.mark.parametrize("preempt", ["false", "true"])
def test_back_to_back_faults_under_a_cap_wait_for_the_next_window(preempt):
    # QEMU 7.1/7.2 with 4 KiB pages: 5 MB/s lets 500 KB through per 100 ms window, which the
    # 1 MiB socket takes at once, so the migration thread sleeps nearly all of each window. A
    # request made meanwhile wakes it, but qemu_savevm_state_iterate()'s gate sends nothing
    # until the window ends; then the page goes first. A vCPU always faulting so gets one
    # page a window, in vanilla and preempt alike: each fault lasts the window less a touch,
    # whatever the software cost (it only moves when the next request comes), so the run can
    # go at time-scale 1
    cfg = load_config(None, [f"{k}={v}" for k, v in {
        **COMMON, "guest.ram": "16MiB", "link.bandwidth": "1Gbit", "link.rtt": "1ms",
        "link.socket-buffer": "1MiB", "migration.max-postcopy-bandwidth": "5MB/s",
        "migration.postcopy-preempt": preempt, "workload.pattern": "random",
        "emulator.time-scale": "1"}.items()])
    if preempt == "true":
        result = migrate(cfg)
        assert result["status"] == "completed", result["errors"]
        urgent = result["latency"]["by-channel"]["preempt"]
        check(cfg, urgent["avg-us"], urgent["count"], result["emulator"]["lag-avg-us"])
    else:
        latencies, lag = urgent_on_main(cfg)
        check(cfg, float(np.mean(latencies)), len(latencies), lag)
