"""Export from the window (issue 14 item 3): the faults as CSV, each plot and the page bitmap
as PNG and SVG, the whole window as PNG. Against a made-up migration: no processes."""

import csv

import pytest

from emu.figures import faultcsv
from emu.migration import ram as R
from gui.synthetic import SyntheticSession
from tests.gui.conftest import small_config

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def window_with_faults(make_window):
    """A window on a vanilla run: 30 background pages on main, then two urgent pages that
    waited behind them, and a preempt-free page that came in the background."""
    cfg = small_config()
    window = make_window(cfg)
    s = SyntheticSession(cfg)
    window.show_session(s, follow=False)
    s.now = 0.2
    s.block([100, 200], at=0.2)
    for i in range(30):  # the background stream, a page every 0.1 ms
        s.now = 0.2001 + i * 1e-4
        s.send(1000 + i, R.SENT_MAIN)
        s.arrive(1000 + i, R.BACKGROUND)
    s.now = 0.21
    s.send([100, 200], R.SENT_URGENT_MAIN)
    s.arrive(100, R.URGENT_MAIN)
    s.arrive(200, R.BACKGROUND)  # was in the background stream already
    window.refresh()
    return window, s


def test_csv_has_the_columns_and_one_row_per_fault(window_with_faults, tmp_path):
    window, s = window_with_faults
    path = tmp_path / "faults.csv"
    assert window.export_csv(str(path)) == 2
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == faultcsv.COLUMNS
    assert len(rows) == s.faults.count == 2
    first = {r["page"]: r for r in rows}["100"]
    assert first["vcpu"] == "0" and first["channel"] == "main"
    assert float(first["time_s"]) == pytest.approx(0.2)
    assert float(first["latency_us"]) == pytest.approx(10_000, abs=0.1)
    assert first["guest_address"] == hex(100 * 4096)
    assert first["page_came"] == "on demand, on main"
    # what it waited behind: the 30 background pages that came on main meanwhile
    assert first["behind_background"] == "30" and first["behind_urgent"] == "0"
    assert first["behind_bytes"] == str(30 * 4096)
    assert first["waited_behind"] == "30 background pages on main (120 KiB)"
    assert {r["page"]: r for r in rows}["200"]["page_came"] == "in the background stream"


@pytest.mark.parametrize("what", ["scatter", "histogram", "bitmap"])
def test_each_picture_exports_as_png_and_svg(window_with_faults, tmp_path, what):
    window, _ = window_with_faults
    png, svg = tmp_path / f"{what}.png", tmp_path / f"{what}.svg"
    window.export_picture(what, str(png))
    window.export_picture(what, str(svg))
    assert png.read_bytes().startswith(PNG) and png.stat().st_size > 1000
    text = svg.read_text()
    assert text.lstrip().startswith("<?xml") and "<svg" in text and len(text) > 1000


def test_the_window_saves_as_png(window_with_faults, tmp_path):
    window, _ = window_with_faults
    path = tmp_path / "window.png"
    window.export_window(str(path))
    assert path.read_bytes().startswith(PNG) and path.stat().st_size > 10_000
    with pytest.raises(ValueError):
        window.export_window(str(tmp_path / "window.svg"))


def test_an_export_that_fails_says_so_in_the_event_log(window_with_faults, tmp_path):
    window, _ = window_with_faults
    window._exported(str(tmp_path), lambda: window.export_csv(str(tmp_path)))  # a directory
    assert "export failed" in window.events.toPlainText()


def test_the_plots_context_menus_are_on(window_with_faults):
    window, _ = window_with_faults
    for widget in (window.latency.scatter, window.latency.histogram):
        assert widget.getPlotItem().getViewBox().menuEnabled()
    assert window.bitmap.view_box.menuEnabled()
    # the menu's "Export..." offers the SVG exporter that works with Qt 6's paths
    import pyqtgraph as pg

    from gui._qt.export import QtSvgExporter

    offered = pg.exporters.listExporters()
    assert QtSvgExporter in offered and pg.exporters.SVGExporter not in offered
