"""The sweep's plot as a PNG (postcopy-emu sweep --png): page-fault latency (mean and p99, the
model's mean dashed) and the guest's progress against the first varied key, a line per value
of the second. Drawn by pyqtgraph offscreen: the command writes a file and needs no screen.

The data comes Qt-free from emu.figures.sweep.plot_series; only the drawing is here.
"""

from __future__ import annotations

import math
import os

SIZE = (1200, 480)  # pixels: two panels side by side, legible on a slide
# Okabe and Ito's palette: told apart with either red-green deficiency (gui/colourblind.py)
COLOURS = ((0, 114, 178), (213, 94, 0), (0, 158, 115), (204, 121, 167), (230, 159, 0),
           (86, 180, 233), (240, 228, 66), (0, 0, 0))


def _app():
    """A QApplication, offscreen unless the program already has one (the window's)."""
    from PySide6 import QtWidgets

    app = QtWidgets.QApplication.instance()
    if app is None:
        os.environ["QT_QPA_PLATFORM"] = "offscreen"  # a file, no window: no screen needed
        app = QtWidgets.QApplication(["postcopy-emu"])
    return app


def save(path: str | os.PathLike, data: dict, size: tuple[int, int] = SIZE) -> None:
    """Draw plot_series() *data* and save it as a PNG of exactly *size* pixels."""
    app = _app()
    import pyqtgraph as pg

    view = pg.GraphicsLayoutWidget()
    view.setBackground("w")
    view.resize(*size)
    ticks = [list(enumerate(data["x"]))]
    latency = view.addPlot()
    progress = view.addPlot()
    panels = ((latency, "page-fault latency", "ms"),
              (progress, "guest progress in postcopy", "touches/s"))
    for plot, title, unit in panels:
        plot.setTitle(title, color="k")
        for side in ("left", "bottom"):
            plot.getAxis(side).setTextPen("k")
            plot.getAxis(side).setPen((90, 90, 90))
        plot.getAxis("left").setWidth(LEFT_AXIS)
        plot.showGrid(x=True, y=True, alpha=0.25)
        plot.getAxis("bottom").setTicks(ticks)
        plot.setLabel("bottom", data["x-key"])
        plot.setLabel("left", unit)
        plot.addLegend(offset=(8, 8), labelTextColor=(0, 0, 0), brush=(255, 255, 255, 210))
        plot.setXRange(-0.3, len(data["x"]) - 0.7, padding=0)
    _styles_legend(latency)
    for n, series in enumerate(data["series"]):
        _lines(latency, progress, series, COLOURS[n % len(COLOURS)])
    _from_zero(latency, [s[f] for s in data["series"] for f in ("mean-ms", "p99-ms", "model-ms")])
    _from_zero(progress, [s["progress"] for s in data["series"]])
    view.show()
    app.processEvents()
    image = view.grab()
    view.close()
    if image.width() != size[0] or image.height() != size[1]:  # a high-density screen
        image = image.scaled(*size)
    if not image.save(os.fspath(path), "PNG"):
        raise OSError(f"could not save {path}")


LEGEND_ROW = 0.07  # of the plot's height: the headroom left above the data for each entry


def _from_zero(plot, lines: list[list[float]]) -> None:
    """The y axis from 0, so that a difference reads as the share of the whole it is, with
    room above the data for the legend (top left), which would hide points otherwise."""
    top = max((y for line in lines for y in line if not math.isnan(y)), default=0.0)
    rows = len(plot.legend.items)
    plot.setYRange(0, top / (0.92 - LEGEND_ROW * rows) or 1.0, padding=0)


STYLES = (("mean-ms", "mean", "SolidLine", "o"), ("p99-ms", "p99", "DotLine", "t"),
          ("model-ms", "model's mean", "DashLine", None))
LEGEND_GREY = (90, 90, 90)
LEFT_AXIS = 72  # pixels: room for "100,000" and the unit beside it, which overlap otherwise


def _pen(colour, style: str):
    import pyqtgraph as pg
    from PySide6 import QtCore

    return pg.mkPen(colour, width=2, style=getattr(QtCore.Qt.PenStyle, style))


def _styles_legend(latency) -> None:
    """What each line style means, once, in grey: the colours say the second key."""
    import pyqtgraph as pg

    for _, what, style, symbol in STYLES:
        sample = pg.PlotDataItem(pen=_pen(LEGEND_GREY, style), symbol=symbol,
                                 symbolBrush=LEGEND_GREY, symbolPen=LEGEND_GREY, symbolSize=8)
        latency.legend.addItem(sample, what)


def _lines(latency, progress, series: dict, colour: tuple[int, int, int]) -> None:
    x = list(range(len(series["mean-ms"])))
    for field, _, style, symbol in STYLES:
        if all(math.isnan(y) for y in series[field]):
            continue  # the model has nothing for precopy only
        # only the mean is named in the legend: the styles are named once, in grey
        latency.plot(x, series[field], connect="finite", pen=_pen(colour, style),
                     name=series["label"] if field == "mean-ms" else None, symbol=symbol,
                     symbolBrush=colour, symbolPen=colour, symbolSize=8)
    progress.plot(x, series["progress"], name=series["label"] or "touches/s",
                  connect="finite", pen=_pen(colour, "SolidLine"), symbol="o",
                  symbolBrush=colour, symbolPen=colour, symbolSize=8)
