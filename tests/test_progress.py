"""Guest progress: what the destination's vCPUs did during postcopy (emu/figures/progress.py)."""

import pytest

from emu.cli import summary
from emu.figures import progress
from emu.migration.workload import Touches
from tests.conftest import config

# A guest that jumps far between pages while the background stream fills RAM in order: nearly
# every touch misses, and in vanilla waits behind the stream on main; preempt's channel skips
# it. 3129 pages: bench qemu's stride for 32 MiB (0.382 of RAM), odd, so that the walk visits
# every page (a stride sharing a factor with the 8192 pages revisits a few present ones).
FAR_STRIDE = {"workload__pattern": "stride", "workload__stride": str(3129 * 4096)}


def _dst_status_time(result: dict, status: str) -> float:
    return next(s["time"] for s in result["states"]["destination"] if s["status"] == status)


# ---- the figures, from made-up counts ----

def test_a_window_gives_touches_per_emulated_second_per_vcpu_and_in_all():
    got = progress.measure([300, 100], 1.0, 1.5, "completed")
    assert got["total"] == 800.0 and got["per-vcpu"] == [600.0, 200.0]
    assert got["touches"] == {"total": 400, "per-vcpu": [300, 100]}
    assert got["window"] == {"from": 1.0, "to": 1.5, "seconds": 0.5, "until": "completed"}
    assert progress.measure([5], 1.0, 1.0, "completed") is None  # no window, no figure


def test_a_vcpu_counts_its_batch_one_touch_per_cost_and_nothing_while_blocked():
    t = Touches(1.0, 100, 0.001)
    t.batch = (1.0, 100, 50)  # 50 touches from t=1.0
    assert t.at(1.0) == 0 and t.at(1.0105) == 10 and t.at(2.0) == 50
    t.faulted(1.05, 150, None)  # blocked at touch 150 (50 after its start), never woken
    assert t.fault == (1.05, 150) and t.faults == 1


def test_qemus_window_ends_at_the_last_fault_and_counts_the_others_on_from_their_wakeup():
    cost = 0.001
    vcpus = [
        # vCPU 0 faulted last, at t=2.0, after 40 touches
        {"from": 1.0, "touches": 90, "faulted": True, "fault-at": 2.0, "fault-touches": 40,
         "woken": 2.5},
        # vCPU 1: last fault at 1.2 after 10 touches, running again from 1.5: 500 more by 2.0,
        # but it did only 300 in all by the end of the run
        {"from": 1.0, "touches": 300, "faulted": True, "fault-at": 1.2, "fault-touches": 10,
         "woken": 1.5},
        # vCPU 2 still waits at the end: nothing after its fault
        {"from": 1.0, "touches": 7, "faulted": True, "fault-at": 1.9, "fault-touches": 7,
         "woken": None},
    ]
    got = progress.until_last_fault(vcpus, 1.0, cost)
    assert got["window"] == {"from": 1.0, "to": 2.0, "seconds": 1.0, "until": "last fault"}
    assert got["touches"]["per-vcpu"] == [40, 300, 7]
    vcpus[1]["touches"] = 10_000
    assert progress.until_last_fault(vcpus, 1.0, cost)["touches"]["per-vcpu"] == [40, 510, 7]
    assert progress.until_last_fault([{**v, "faulted": False} for v in vcpus], 1.0, cost) is None


def test_the_board_gives_the_figure_so_far():
    board = dict.fromkeys(progress.BOARD_FIELDS, 0.0)
    assert progress.from_board(board, 2, 1.0) is None  # not resumed on the destination yet
    board.update({progress.RESUMED: 0.5, "touches-0": 40.0, "touches-1": 60.0})
    got = progress.from_board(board, 2, 1.0)
    assert got["total"] == 200.0 and got["touches"]["per-vcpu"] == [40, 60]
    assert got["window"]["until"] == "run ended"
    assert len(progress.BOARD_FIELDS) == 1 + progress.MAX_VCPUS


def test_the_comparison_says_more_or_less():
    assert progress.ratio_text(2100, 1000, "postcopy-preempt") == \
        "postcopy-preempt: 2.1x more guest progress"
    assert progress.ratio_text(1000, 2000, "vanilla postcopy") == \
        "vanilla postcopy: 2.0x less guest progress"
    assert progress.ratio_text(None, 1000, "x") is None and progress.ratio_text(5, 0, "x") is None


# ---- real runs ----

@pytest.fixture(scope="module")
def vanilla_and_preempt():
    from emu.controller import migrate

    return {mode: migrate(config(**FAR_STRIDE, migration__postcopy_preempt=preempt))
            for mode, preempt in (("vanilla", "false"), ("preempt", "true"))}


def test_preempt_gets_the_guest_further_where_blocktime_does_not_tell(vanilla_and_preempt):
    van, pre = vanilla_and_preempt["vanilla"], vanilla_and_preempt["preempt"]
    assert van["status"] == pre["status"] == "completed"
    # the same time blocked, or about (the stream decides when postcopy ends) ...
    assert pre["blocktime-ms"]["total"] > 0.5 * van["blocktime-ms"]["total"]
    # ... but preempt's faults are served faster, and its guest does several times more while
    # it still faults (to completion the figure also holds the full-speed tail after the last
    # fault, whose length is chance: not compared)
    assert pre["progress"]["until-last-fault"]["total"] > \
        2 * van["progress"]["until-last-fault"]["total"]


@pytest.mark.parametrize("mode", ["vanilla", "preempt"])
def test_the_json_progress_is_counted_over_the_postcopy_phase(vanilla_and_preempt, mode):
    result = vanilla_and_preempt[mode]
    got = result["progress"]
    window = got["window"]
    assert window["until"] == "completed"
    # from the guest's resume on the destination to its completion
    assert _dst_status_time(result, "postcopy-active") <= window["from"]
    assert window["to"] == pytest.approx(_dst_status_time(result, "completed"), abs=1e-3)
    assert window["seconds"] == pytest.approx(window["to"] - window["from"], abs=2e-6)
    assert got["touches"]["total"] == sum(got["touches"]["per-vcpu"]) > 0
    assert got["total"] == pytest.approx(got["touches"]["total"] / window["seconds"], rel=1e-3)
    assert len(got["per-vcpu"]) == len(got["touches"]["per-vcpu"]) == 1
    qemu = got["until-last-fault"]
    assert qemu["window"]["from"] == window["from"] and qemu["window"]["to"] <= window["to"]
    assert qemu["touches"]["total"] <= got["touches"]["total"]
    assert f"guest progress in postcopy: {got['total']:,.0f} touches/s" in \
        summary(result, config(**FAR_STRIDE))


def test_two_vcpus_add_up_and_a_run_cut_short_counts_until_it_ended():
    from emu.controller import migrate

    result = migrate(config(**FAR_STRIDE, guest__vcpus="2", migration__postcopy_preempt="true",
                            emulator__duration_limit="250ms"))
    assert result["status"] == "failed"  # stopped by the limit, in postcopy
    got = result["progress"]
    assert got["window"]["until"] == "run ended"
    assert got["window"]["to"] == pytest.approx(result["reached"]["time"], abs=1e-6)
    per_vcpu = got["touches"]["per-vcpu"]
    assert len(per_vcpu) == 2 and all(n > 0 for n in per_vcpu)
    assert got["touches"]["total"] == sum(per_vcpu)
    assert got["total"] == pytest.approx(sum(got["per-vcpu"]), abs=0.2)
    assert "until-last-fault" not in got  # known from the destination's own report only


def test_without_postcopy_there_is_no_progress_to_report():
    assert progress.from_vcpus([], 1.0, "completed", 1e-6) is None  # no vCPU ran there
    assert progress.text(None).startswith("none")
