"""The guest's layout of the vCPUs' buffer (emu/migration/layout.py, workload.prefault-threads):
Linux's per-CPU batch, runs of it interleaved over the prefault threads, and what a vCPU that
walks its buffer in order meets on the destination because of it."""

import numpy as np
import pytest

from emu.config import ConfigError, load_config
from emu.figures import model, seedtable
from emu.migration import wire
from emu.migration.layout import Layout, zone_batchsize
from emu.migration.workload import Workload

MIB_PAGES = 256


@pytest.mark.parametrize(("mib", "batch"), [
    # zone_batchsize(): min(pages / 1024, 1 MiB) / 4, clamped to 2^n - 1, at least 1
    (16, 1), (64, 3), (128, 7), (256, 15), (512, 31), (1024, 63), (20 * 1024, 63),
])
def test_batch_is_linuxs_per_cpu_list_batch(mib, batch):
    assert zone_batchsize(mib * MIB_PAGES) == batch


@pytest.mark.parametrize(("pages", "threads"), [(5 * 1024 * MIB_PAGES, 20), (1_000_003, 7),
                                                (300, 4), (64, 64)])
def test_every_guest_page_backs_exactly_one_buffer_page(pages, threads):
    frames = Layout(pages, threads, seed=1).frames(np.arange(pages))
    assert np.array_equal(np.sort(frames), np.arange(pages))


def test_one_thread_leaves_the_buffer_in_order():
    k = np.arange(10_000)
    assert np.array_equal(Layout(10_000, 1, seed=1).frames(k), k)


def test_a_slice_is_runs_of_the_batch_one_per_round_of_the_threads():
    pages, threads = 4 * 1024 * MIB_PAGES, 20  # 4 GiB: batch 63
    layout = Layout(pages, threads, seed=3)
    batch, each = layout.batch, pages // threads
    for thread in (0, 7, 19):
        frames = layout.frames(thread * each + np.arange(each))
        starts = np.flatnonzero(np.diff(frames) != 1) + 1
        runs = np.diff(np.concatenate(([0], starts, [each])))
        # a run is one refill, or two when the thread was last in a round and first in the next
        assert set(runs[:-1].tolist()) <= {batch, 2 * batch}
        # round j is frames [j x threads x batch, (j + 1) x threads x batch): one run of each
        rounds = frames[::batch][:-1] // (threads * batch)
        assert np.array_equal(rounds, np.arange(len(rounds)))
        # so the next run of a slice is on average threads - 1 other runs ahead in scan order
        gaps = frames[starts] - frames[starts - 1] - 1
        mean_gap = (gaps.sum() / (each // batch - 1)) / batch
        assert mean_gap == pytest.approx(threads - 1, rel=0.05)


def test_the_layout_is_the_seeds():
    k = np.arange(100_000)
    one, again, other = (Layout(100_000, 8, seed).frames(k) for seed in (1, 1, 2))
    assert np.array_equal(one, again) and not np.array_equal(one, other)


@pytest.mark.parametrize("pattern", ["sequential", "ab", "random"])
def test_touches_land_where_the_layout_put_the_buffer(pattern):
    cfg = load_config(None, [f"workload.pattern={pattern}", "guest.ram=64MiB", "guest.vcpus=2",
                             "workload.prefault-threads=4"])
    linear = cfg.with_overrides(["workload.prefault-threads=1"])
    work, plain = Workload(cfg, 1, pos=123), Workload(linear, 1, pos=123)
    assert np.array_equal(work.peek(4096), work.layout.frames(plain.peek(4096)))
    if pattern != "random":
        assert np.array_equal(work.slice_pages()[123:123 + 4096], work.peek(4096))


def test_prefault_threads_need_a_page_each():
    with pytest.raises(ConfigError, match=r"workload.prefault-threads: must be at most "
                                          r"guest.ram / 4KiB = 64 \(got 65\)"):
        load_config(None, ["guest.ram=256KiB", "workload.prefault-threads=65"])


@pytest.mark.parametrize("pattern", ["sequential", "ab"])
def test_a_migration_of_a_laid_out_buffer_keeps_its_memory(run_migration, pattern):
    # the destination's memory check walks each slice in the order its vCPU wrote it
    result = run_migration(workload__pattern=pattern, guest__vcpus=2,
                           workload__prefault_threads=5)
    assert result["status"] == "completed", result["errors"]
    assert result["integrity"]["ok"], result["integrity"]
    assert result["latency"]["count"] > 0


# ---- what the writer meets ----

def test_the_model_of_a_writer_following_the_stream():
    cfg = load_config("preempt-full-10g", ["workload.pattern=sequential",
                                           "emulator.time-scale=0.01"])
    page_time = wire.pages_bytes(8, 8) / 8 / 1.25e9  # a record of 8 pages, its header shared
    fast = 8 * (page_time - 1e-6)  # the next record, less the 8 touches
    slow = 19 * 63 * page_time  # the other 19 threads' runs before the slice's next one
    stream = model.predict(cfg, software_cost=0)["terms-us"]["stream"]
    assert stream == pytest.approx((slow + (63 / 8 - 1) * fast) / (63 / 8) * 1e6, rel=0.01)
    linear = cfg.with_overrides(["workload.prefault-threads=1"])
    assert model.predict(linear, software_cost=0)["latency-us"] == pytest.approx(fast * 1e6,
                                                                                  rel=0.01)
    # 8.0's return-path thread keeps its own scan position: every fault is an urgent page
    full = cfg.with_overrides(["migration.postcopy-preempt=true", "migration.design=8.0"])
    assert model.predict(full)["terms-us"]["stream"] == 0


@pytest.mark.parametrize("preempt", ["false", "true"])
def test_a_sequential_writer_waits_once_a_run_for_the_other_threads_runs(preempt):
    # The preempt-full series' guest and writer: in vanilla and in 7.1 the request moves the
    # scan next to the writer, which then follows the stream; at the end of each 63-page run
    # it waits for the 19 other threads' runs the scan sends before its next one
    cfg = load_config("preempt-full-10g", [
        "workload.pattern=sequential", f"migration.postcopy-preempt={preempt}",
        "emulator.time-scale=0.012"])
    got = seedtable.measured(cfg, window_real=4)
    dist = got["dist"]
    assert got["samples"] >= 40, got
    assert got["emulated-us"] == pytest.approx(got["model-us"], rel=0.15), got
    slow = sum(dist[11:])  # 2 ms and more
    assert 0.07 < slow / got["samples"] < 0.2, dist  # one fault in 63 / 8 records
