"""QtLatencyPlots: how long each vCPU waited for each missing page.

Top: every resolved fault as a point, emulated time against latency on a log scale, coloured by
the channel that delivered the page. Bottom: QEMU's postcopy-latency-dist, the log2 histogram
(bucket N = [2^N us, 2^(N+1) us)), as a share of all faults. The previous run stays in grey
underneath both, so vanilla and preempt compare side by side. Points are appended to
persistent items; the histogram and the figures are redrawn a few times a second at most.
"""

from __future__ import annotations

import numpy as np
import pyqtgraph as pg
from PySide6 import QtCore, QtWidgets

from emu import metrics
from gui import style
from gui.session import BUCKETS, RUNNING, FaultLog, Snapshot

DASH = QtCore.Qt.PenStyle.DashLine
FLOOR_S = 1e-6  # latencies are drawn no lower than 1 us (a log scale has no zero)
CHUNK = 8000  # points per scatter item
X_END = 0.5  # emulated seconds shown at first
Y_RANGE = (-2.0, 2.0)  # log10(ms): 10 us to 100 ms, widened to fit every point


def bucket_label(n: int) -> str:
    """Lower edge of bucket n: 2^n us, written 1us .. 512us, 1ms .. 512ms, 1s .."""
    for unit, shift in (("s", 20), ("ms", 10)):
        if n >= shift:
            return f"{1 << (n - shift)}{unit}"
    return f"{1 << n}us"


class PointCloud:
    """Points appended as they come, in ScatterPlotItems of at most CHUNK points each:
    ScatterPlotItem.addPoints copies every point it holds, so one item for a whole run
    would make each frame slower than the last."""

    def __init__(self, plot: pg.PlotItem, brush: tuple[int, ...]) -> None:
        self._plot = plot
        self._brush = brush
        self._items: list[pg.ScatterPlotItem] = []
        self.clear()

    def clear(self) -> None:
        for item in self._items[1:]:
            self._plot.removeItem(item)
        if self._items:
            self._items[0].clear()
        else:
            self._items.append(self._new_item())
        self._items = self._items[:1]

    @property
    def count(self) -> int:
        return sum(len(item.data) for item in self._items)

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        if len(self._items[-1].data) >= CHUNK:
            self._items.append(self._new_item())
        self._items[-1].addPoints(x=x, y=y)

    def _new_item(self) -> pg.ScatterPlotItem:
        item = pg.ScatterPlotItem(size=5, pen=None, brush=self._brush)
        self._plot.addItem(item)
        return item


def _key_html(previous: str | None) -> str:
    dots = [(rgb, f"page came on {name}") for rgb, name in
            zip(style.CHANNEL_COLOURS, metrics.CHANNELS, strict=True)]
    dots.append((style.PREVIOUS, f"previous run: {previous}" if previous else "previous run"))
    return " &nbsp; ".join(f"<span style='color:{style.css(rgb)}; font-size:16px'>&#9679;"
                           f"</span> {text}" for rgb, text in dots)


def stats_row(name: str, stats: dict, colour: str = "#000") -> str:
    """One row of the figures table: which run, count, avg, p50, p99."""
    cells = [name, f"{stats['count']:,} faults"]
    if stats["count"]:
        cells += [f"{what} {style.duration(stats[key] * 1e-6)}" for what, key in
                  (("avg", "avg-us"), ("p50", "p50-us"), ("p99", "p99-us"))]
    return (f"<tr style='color:{colour}'>"
            + "".join(f"<td nowrap style='padding-right:12px'>{cell}</td>" for cell in cells)
            + "</tr>")


class QtLatencyPlots(QtWidgets.QWidget):
    def __init__(self, parent: QtWidgets.QWidget | None = None) -> None:
        super().__init__(parent)
        self._title = QtWidgets.QLabel("Page-fault latency: how long a vCPU waited for a page")
        self._title.setObjectName("title")
        self._stats = QtWidgets.QLabel()
        self._stats.setTextFormat(QtCore.Qt.TextFormat.RichText)
        self._stats.setWordWrap(True)
        style.fix_lines(self._stats, 2)
        self._key = QtWidgets.QLabel(_key_html(None))
        style.fix_lines(self._key, 1)
        self._scatter = pg.PlotWidget(background="w")
        self._hist = pg.PlotWidget(background="w")
        self._points, self._prev_points, self._switch = self._build_scatter()
        self._bars, self._prev_bars = self._build_hist()
        layout = QtWidgets.QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        for widget, stretch in ((self._title, 0), (self._stats, 0), (self._key, 0),
                                (self._scatter, 3), (self._hist, 2)):
            layout.addWidget(widget, stretch)
        self._previous: tuple[str, FaultLog] | None = None
        self._points_turn = style.Turn("points")
        self._hist_turn = style.Turn("histogram")
        self.reset("")

    # ---- building ----

    def _build_scatter(self):
        plot = self._scatter.getPlotItem()
        plot.setLabel("left", "latency of each fault (ms, log)")
        plot.setLabel("bottom", "emulated time (s)")
        plot.getAxis("left").setLogMode(True)  # the points are log10(ms)
        plot.getAxis("bottom").enableAutoSIPrefix(False)
        # Decade lines instead of showGrid(): a grid is drawn by the axes across the whole
        # plot, so every new point would repaint both axes with all their ticks.
        for decade in range(-4, 6):
            plot.addItem(pg.InfiniteLine(decade, angle=0, pen=pg.mkPen((225, 225, 225))),
                         ignoreBounds=True)
        plot.setMouseEnabled(x=False, y=False)
        plot.disableAutoRange()
        plot.setMenuEnabled(False)
        previous = pg.ScatterPlotItem(size=5, pen=None, brush=(*style.PREVIOUS, 60))
        plot.addItem(previous)
        points = [PointCloud(plot, (*rgb, 190)) for rgb in style.CHANNEL_COLOURS]
        switch = pg.InfiniteLine(angle=90, pen=pg.mkPen((80, 80, 80), style=DASH),
                                 label="switchover", labelOpts={"position": 0.95,
                                                                "color": (60, 60, 60)})
        plot.addItem(switch)
        return points, previous, switch

    def _build_hist(self):
        plot = self._hist.getPlotItem()
        plot.setTitle("postcopy-latency-dist: faults per log2 bucket", size="10pt",
                      color="#333")
        plot.setLabel("left", "% of faults")
        plot.setLabel("bottom", "latency bucket [2^N us, 2^(N+1) us)")
        plot.setMenuEnabled(False)
        plot.setMouseEnabled(x=False, y=False)
        plot.showGrid(y=True, alpha=0.25)
        bars = []
        for rgb in style.CHANNEL_COLOURS:
            item = pg.BarGraphItem(x0=[], width=1, height=[], brush=rgb, pen=pg.mkPen("w"))
            plot.addItem(item)
            bars.append(item)
        pen = pg.mkPen(style.PREVIOUS, width=2, style=DASH)
        previous = pg.PlotCurveItem(x=[0.0], y=[], stepMode="center", pen=pen)
        plot.addItem(previous)
        ticks = [(n, bucket_label(n)) for n in range(BUCKETS)]
        plot.getAxis("bottom").setTicks([ticks[::2], ticks[1::2]])
        return bars, previous

    # ---- runs ----

    def reset(self, label: str) -> None:
        """Clear the current run; *label* names it in the figures ("postcopy-preempt")."""
        self._label = label
        self._log: FaultLog | None = None
        self._shown_count = -1
        self._pending: list[np.ndarray] = []
        for cloud in self._points:
            cloud.clear()
        self._switch.hide()
        self._y = Y_RANGE
        self._x_end = X_END
        prev_t, prev_log_ms = self._prev_points.getData()
        self._fit_y(prev_log_ms)
        self._fit_x(prev_t)
        self._redraw()

    def set_previous(self, label: str, log: FaultLog | None) -> None:
        """Keep a finished run in grey under the next one (None: no overlay)."""
        self._previous = (label, log) if log is not None and log.count else None
        self._key.setText(_key_html(label if self._previous else None))
        if self._previous is None:
            self._prev_points.clear()
        else:
            lat = np.maximum(log.records["latency"], FLOOR_S) * 1e3
            self._prev_points.setData(x=log.records["time"], y=np.log10(lat))
            self._fit_y(np.log10(lat))
            self._fit_x(log.records["time"])
        self._redraw()

    def _fit_y(self, log_ms: np.ndarray | None) -> None:
        """Keep whole decades in view: a log axis over a sliver of a decade has no labels."""
        if log_ms is not None and len(log_ms):
            lo = min(self._y[0], np.floor(np.min(log_ms)))
            hi = max(self._y[1], np.ceil(np.max(log_ms)))
            if (lo, hi) == self._y:
                return
            self._y = (lo, hi)
        self._scatter.getPlotItem().setYRange(*self._y, padding=0.02)

    def _fit_x(self, times: np.ndarray | None) -> None:
        """Time from 0, widened by half when a point falls off the right: the axes are
        redrawn a few times a run, not at every frame."""
        if times is not None and len(times):
            end = self._x_end
            while np.max(times) > end:
                end *= 1.5
            if end == self._x_end:
                return
            self._x_end = end
        self._scatter.getPlotItem().setXRange(0, self._x_end, padding=0.01)

    # ---- every tick ----

    def update_from(self, snap: Snapshot, log: FaultLog, switchover: float | None) -> None:
        self._log = log
        running = snap.phase == RUNNING
        if len(snap.new_faults):
            self._pending.append(snap.new_faults)
        if self._points_turn.due() or not running:
            self._add_points()
        if switchover is not None and not self._switch.isVisible():
            self._switch.setValue(switchover)
            self._switch.show()
        if (self._hist_turn.due() or not running) and log.count != self._shown_count:
            self._redraw()

    def _add_points(self) -> None:
        if not self._pending:
            return
        new = np.concatenate(self._pending)
        self._pending.clear()
        for channel, cloud in enumerate(self._points):
            mine = new[new["channel"] == channel]
            if len(mine):
                log_ms = np.log10(np.maximum(mine["latency"], FLOOR_S) * 1e3)
                cloud.add(mine["time"], log_ms)
                self._fit_y(log_ms)
                self._fit_x(mine["time"])

    def _redraw(self) -> None:
        """The histogram and the figures."""
        log = self._log
        self._shown_count = log.count if log else 0
        dist = log.dist if log else np.zeros((len(metrics.CHANNELS), BUCKETS))
        total = max(int(dist.sum()), 1)
        base = np.zeros(BUCKETS)
        for channel, bars in enumerate(self._bars):
            share = dist[channel] * 100 / total
            bars.setOpts(x0=np.arange(BUCKETS), width=1, y0=base.copy(), height=share)
            base += share
        prev_dist = self._previous[1].dist.sum(axis=0) if self._previous else None
        if prev_dist is not None:
            share = prev_dist * 100 / max(int(prev_dist.sum()), 1)
            self._prev_bars.setData(np.arange(BUCKETS + 1), share)
        else:
            self._prev_bars.setData([0.0], [])
        self._fit_buckets(dist.sum(axis=0), prev_dist)
        self._stats.setText(self._stats_html())

    def _fit_buckets(self, dist: np.ndarray, prev: np.ndarray | None) -> None:
        used = np.flatnonzero(dist if prev is None else dist + prev)
        lo, hi = (used[0], used[-1] + 1) if len(used) else (6, 14)  # 64 us .. 16 ms
        lo, hi = min(lo, hi - 8), max(hi, lo + 8)
        self._hist.getPlotItem().setXRange(max(lo - 1, 0), hi + 1, padding=0)

    def _stats_html(self) -> str:
        log = self._log or FaultLog()
        rows = [stats_row("<b>this run</b>", log.summary())]
        if self._previous is not None:
            rows.append(stats_row("previous run", self._previous[1].summary(),
                                  style.css(style.PREVIOUS)))
        return "<table cellspacing='0' cellpadding='0'>" + "".join(rows) + "</table>"

    def stats_text(self) -> str:
        return self._stats.text()

    def point_count(self) -> int:
        """Points drawn for the current run (for tests)."""
        return sum(cloud.count for cloud in self._points)
