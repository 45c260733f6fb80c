"""The seed-table bench's rules (the bench itself runs for minutes: `postcopy-emu bench`)."""

from emu.figures import seedtable, timescale
from emu.migration import wire


def test_every_cell_comes_from_the_one_preset_with_only_page_and_mode_changed():
    base = seedtable.load_config(seedtable.PRESET)
    for page in seedtable.PAGES:
        for mode in seedtable.MODES:
            cfg = seedtable.cell_config(page, mode, timescale.REFERENCE)
            differ = {k for k in base.to_json()["link"] if cfg[f"link.{k}"] != base[f"link.{k}"]}
            assert not differ
            assert cfg["guest.ram"] == base["guest.ram"] == 20 << 30
            assert cfg["emulator.payload"] is False
            assert (cfg["migration.postcopy-preempt"]) == (mode != "vanilla")


def test_time_scale_keeps_the_emulator_cost_small_against_the_latency():
    cost = timescale.REFERENCE  # no calibration run in a unit test
    fast = seedtable.cell_config("4K", "preempt", cost)
    slow = seedtable.cell_config("1G", "vanilla", cost)
    assert timescale.MIN_SCALE <= fast["emulator.time-scale"] < slow["emulator.time-scale"]
    frame = min(slow["emulator.chunk"], wire.record_pages(slow.page_size) * wire.TARGET_PAGE)
    frames = timescale.FRAMES_PER_S * frame / slow["link.bandwidth"]
    assert slow["emulator.time-scale"] <= round(frames, 4)


def test_ratios_and_table():
    cells = [{"page-size": "4K", "mode": "vanilla", "seed-ms": 10.68, "emulated-ms": 8.0,
              "model-ms": 8.5, "samples": 10, "time-scale": 0.2},
             {"page-size": "4K", "mode": "preempt", "seed-ms": 0.57, "emulated-ms": 0.5,
              "model-ms": 0.25, "samples": 90, "time-scale": 0.01}]
    r = seedtable.ratios(cells)["4K"]
    assert r == {"seed-ms": 18.74, "emulated-ms": 16.0, "model-ms": 34.0}
    text = seedtable.table(cells)
    assert "4K vanilla/preempt: seed 18.74x, emulated 16.0x" in text
