"""The CPU time of QEMU's threads, charged in emulated time (emu/cpu.py, the cpu.* keys).

Everything is asserted on emulated time and counts: a charge is the same emulated time at any
time scale, a busy listen thread delays what queues behind it on main and not what comes on
preempt, and all costs 0 is the emulator without them."""

import threading
from types import SimpleNamespace

import numpy as np
import pytest

from emu import cli
from emu.board import Board
from emu.clock import Clock
from emu.config import KEYS, load_config
from emu.cpu import Costs, CpuThread, fields
from emu.figures.model import cpu_time, predict
from emu.migration.destination import Destination
from emu.migration.placement import MAIN, PREEMPT, Placer
from emu.migration.wire import READ_PAGES, RamRecord, pages_bytes
from tests.conftest import config

CPU_KEYS = [k for k in KEYS if k.startswith("cpu.")]
ZERO = {k.replace(".", "__").replace("-", "_"): "0" for k in CPU_KEYS}


@pytest.mark.parametrize("scale", [0.2, 2.0])
def test_a_charge_lasts_its_emulated_time_whatever_the_scale(scale):
    clock = Clock()
    clock.start(scale)
    board = Board(fields(("listen",)))
    cpu = CpuThread("listen", clock, board)
    t0 = clock.now()
    for _ in range(10):  # many small charges, one wait
        cpu.charge(2e-3)
    cpu.settle()
    assert clock.now() - t0 >= 20e-3
    assert cpu.free_at == pytest.approx(t0 + 20e-3, abs=1e-3 * scale)
    assert board["cpu-listen-busy"] == pytest.approx(20e-3)
    assert board["cpu-listen-acts"] == 1


def test_work_queues_behind_the_busy_thread_only():
    clock = Clock()
    clock.start(1.0)
    listen, preempt = CpuThread("listen", clock), CpuThread("preempt", clock)
    t0 = clock.now()
    listen.charge(50e-3)  # a backlog of background pages
    listen.charge(1e-3)  # the urgent page behind them
    preempt.charge(1e-3)  # the urgent page on its own channel
    assert listen.free_at - t0 >= 51e-3
    assert preempt.free_at - t0 < 10e-3


def test_costs_zero_never_wait():
    clock = Clock()
    clock.start(1.0)
    cpu = CpuThread("fault", clock)
    cpu.charge(Costs().save(32, 32 * 4104) + Costs().place(1, 1 << 30))
    cpu.settle()
    assert cpu.busy == 0 and cpu.acts == 0


def test_costs_per_page_and_per_byte_scale_with_the_host_page():
    costs = Costs.from_config(config())
    small, huge = costs.place(1, 4096), costs.place(1, 2 << 20)
    assert small == pytest.approx(costs.place_page + 4096 * costs.place_byte)
    assert huge - small == pytest.approx(((2 << 20) - 4096) * costs.place_byte)
    # one writev per 32 target pages, as QEMUFile's 64 iovecs
    assert costs.save(33, 0) - costs.save(32, 0) == pytest.approx(costs.save_page + costs.write)


def test_all_costs_zero_is_the_emulator_without_them(run_migration):
    result = run_migration(migration__postcopy_preempt="true", guest__ram="8MiB", **ZERO)
    assert result["status"] == "completed", result["errors"]
    cpu = result["emulator"]["cpu"]
    assert all(t["busy-ms"] == 0 and t["acts"] == 0 for t in cpu["threads"].values())
    assert cpu["charged-per-fault-us"] == 0
    pred = predict(config(**ZERO, migration__postcopy_preempt="true"))
    assert pred["terms-us"]["cpu"] == 0


def test_each_thread_is_charged_in_a_run(run_migration):
    result = run_migration(migration__postcopy_preempt="true", guest__ram="8MiB")
    assert result["status"] == "completed", result["errors"]
    threads = result["emulator"]["cpu"]["threads"]
    faults = result["latency"]["count"]
    assert faults > 0
    for name in ("migration", "listen", "preempt", "fault", "return-path"):
        assert threads[name]["busy-ms"] > 0 and threads[name]["acts"] > 0, name
    assert threads["fault"]["acts"] == result["query-migrate"]["ram"]["postcopy-requests"]


def test_a_busy_listen_thread_delays_urgent_pages_on_main_not_on_preempt():
    # the destination's own placing hook, on a placer fed as the listen and preempt threads
    # would feed it: three background records of 32 small pages on main, then an urgent page
    # behind them; at the same time an urgent page on preempt
    cfg = config(cpu__place_page="1ms", cpu__place_byte="0")
    clock = Clock()
    clock.start(1.0)
    dst = SimpleNamespace(cfg=cfg, costs=Costs.from_config(cfg),
                          cpu=[CpuThread(n, clock) for n in ("listen", "preempt")])
    placed = {}
    placer = Placer(np.zeros(cfg.npages, np.uint8), None, cfg.page_size,
                    lambda first, count, channel: placed.setdefault(first, clock.now()),
                    lambda count, which, zero: Destination._placing(dst, count, which, zero))
    t0 = clock.now()

    def listen():
        for k in range(3):
            placer.receive(MAIN, RamRecord(k * 32 * 4096, 32, 0, None))
        placer.receive(MAIN, RamRecord(1000 * 4096, 1, 0, None))

    thread = threading.Thread(target=listen)
    thread.start()
    placer.receive(PREEMPT, RamRecord(2000 * 4096, 1, 0, None))
    thread.join()
    assert placed[1000] - t0 >= 97e-3  # 96 pages ahead, then its own
    assert placed[2000] - t0 < 50e-3  # only its own, 1 ms (a loaded machine may add to it)
    assert placed[2000] - t0 >= 1e-3


def test_the_model_charges_the_listen_thread_backlog_in_vanilla_only():
    sets = {"link__bandwidth": "10Gbit", "guest__page_size": "4KiB"}
    vanilla, preempt = config(**sets), config(**sets, migration__postcopy_preempt="true")
    costs = Costs.from_config(vanilla)
    ahead = costs.place(32, 4096) - 4096 / 1.25e9
    assert cpu_time(vanilla, "vanilla", 1e6) - cpu_time(vanilla, "vanilla", 0) \
        == pytest.approx(ahead)
    assert cpu_time(preempt, "preempt", 1e6) == cpu_time(preempt, "preempt", 0)


@pytest.mark.parametrize(("setting", "message"), [
    ("cpu.place-byte=-1ns", "cpu.place-byte: must be between 0 and 100ns"),
    ("cpu.place-page=1s", "cpu.place-page: must be between 0 and 100ms"),
    ("cpu.write=fast", "cpu.write: expected a duration like 200us"),
    ("cpu.fault=2us", "unknown key 'cpu.fault' (keys: cpu.save-page, cpu.write,"),
])
def test_bad_cpu_settings_stop_with_one_line(setting, message, capsys):
    assert cli.main(["run", "--set", setting]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1, err
    assert err.startswith(f"postcopy-emu: {message}"), err


def test_the_model_lets_a_busy_migration_thread_look_at_the_queue_between_records():
    # the seed's 4K preempt cell: the vCPU faults back to back, and its request reaches the
    # source while the migration thread refills main after a wake-up, record by record
    sets = ["guest.page-size=4KiB", "migration.postcopy-preempt=true"]
    busy = predict(load_config("seed-10g", sets))
    idle = predict(load_config("seed-10g", [*sets, *(f"{k}=0" for k in CPU_KEYS)]))
    assert busy["inputs"]["rest"] < idle["inputs"]["rest"] / 2
    # never asleep on main: a look after every record
    never = load_config("seed-10g", [*sets, "cpu.write-byte=1ns"])
    c = Costs.from_config(never).save(32, pages_bytes(32, READ_PAGES))  # a write of 4 records
    assert predict(never)["inputs"]["rest"] == pytest.approx(never["link.bandwidth"] * c / 2)


def test_zero_pages_cost_their_check_and_a_zero_placement():
    costs = Costs.from_config(config())
    assert costs.save(32, 14, zero_pages=32) - costs.save(32, 14) \
        == pytest.approx(32 * costs.zero_check)
    assert costs.place_zero(3, 4096) == pytest.approx(3 * costs.place_zero_page)
    assert costs.place_zero(1, 2 << 20) == costs.place(1, 2 << 20)  # a huge page is copied


def test_a_listen_thread_slower_than_the_link_is_reported(run_migration):
    # 1024 pages at 2 ms each: the listen thread is busy all along, while 4 MiB cross the
    # link in 33 ms
    result = run_migration(guest__ram="4MiB", migration__switchover_after="0",
                           cpu__place_page="2ms", emulator__time_scale="1")
    assert result["status"] == "completed", result["errors"]
    health = result["emulator"]
    assert health["cpu"]["threads"]["listen"]["busy-share"] > 0.9
    assert "the listen thread was busy placing pages" in health["warning"]
