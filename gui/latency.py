"""QtLatencyPlots: how long each vCPU waited for each missing page.

Top: every resolved fault as a point, emulated time against latency on a log scale, coloured by
the channel that delivered the page. Bottom: QEMU's postcopy-latency-dist, the log2 histogram
(bucket N = [2^N us, 2^(N+1) us)), as a share of all faults. The previous run stays in grey
underneath both, so vanilla and preempt compare side by side. Points are appended to
persistent items; the histogram and the figures are redrawn a few times a second at most.
"""

from __future__ import annotations

import time

import numpy as np
import pyqtgraph as pg
from PySide6 import QtCore, QtWidgets

from emu import metrics
from gui import style
from gui.session import BUCKETS, FaultLog, Snapshot

DASH = QtCore.Qt.PenStyle.DashLine
REDRAW_S = 0.25  # real seconds between histogram redraws
FLOOR_S = 1e-6  # latencies are drawn no lower than 1 us (a log scale has no zero)


def bucket_label(n: int) -> str:
    """Lower edge of bucket n: 2^n us, written 1us .. 512us, 1ms .. 512ms, 1s .."""
    for unit, shift in (("s", 20), ("ms", 10)):
        if n >= shift:
            return f"{1 << (n - shift)}{unit}"
    return f"{1 << n}us"


def describe_stats(stats: dict) -> str:
    if not stats["count"]:
        return "no faults yet"
    return (f"{stats['count']:,} faults · avg {style.duration(stats['avg-us'] * 1e-6)} · "
            f"p50 {style.duration(stats['p50-us'] * 1e-6)} · "
            f"p99 {style.duration(stats['p99-us'] * 1e-6)}")


class QtLatencyPlots(QtWidgets.QWidget):
    def __init__(self, parent: QtWidgets.QWidget | None = None) -> None:
        super().__init__(parent)
        self._title = QtWidgets.QLabel("Page-fault latency: how long a vCPU waited for a page")
        self._title.setObjectName("title")
        self._stats = QtWidgets.QLabel()
        self._stats.setTextFormat(QtCore.Qt.TextFormat.RichText)
        self._scatter = pg.PlotWidget(background="w")
        self._hist = pg.PlotWidget(background="w")
        self._points, self._prev_points, self._switch = self._build_scatter()
        self._bars, self._prev_bars = self._build_hist()
        layout = QtWidgets.QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        for widget, stretch in ((self._title, 0), (self._stats, 0), (self._scatter, 3),
                                (self._hist, 2)):
            layout.addWidget(widget, stretch)
        self._previous: tuple[str, FaultLog] | None = None
        self.reset("")

    # ---- building ----

    def _build_scatter(self):
        plot = self._scatter.getPlotItem()
        plot.setTitle("every fault: when it happened, how long the vCPU was blocked")
        plot.setLabel("left", "latency (ms, log scale)")
        plot.setLabel("bottom", "emulated time (s)")
        plot.getAxis("left").setLogMode(True)  # the points are log10(ms)
        plot.showGrid(x=True, y=True, alpha=0.25)
        plot.setMenuEnabled(False)
        legend = plot.addLegend(offset=(-10, 10), labelTextSize="9pt")
        legend.setBrush((255, 255, 255, 200))
        previous = pg.ScatterPlotItem(size=5, pen=None, brush=(*style.PREVIOUS, 60),
                                      name="previous run")
        plot.addItem(previous)
        points = []
        for name, rgb in zip(metrics.CHANNELS, style.CHANNEL_COLOURS, strict=True):
            item = pg.ScatterPlotItem(size=5, pen=None, brush=(*rgb, 190),
                                      name=f"page came on {name}")
            plot.addItem(item)
            points.append(item)
        switch = pg.InfiniteLine(angle=90, pen=pg.mkPen((80, 80, 80), style=DASH),
                                 label="switchover", labelOpts={"position": 0.95,
                                                                "color": (60, 60, 60)})
        plot.addItem(switch)
        return points, previous, switch

    def _build_hist(self):
        plot = self._hist.getPlotItem()
        plot.setTitle("postcopy-latency-dist: share of faults per log2 bucket")
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
        previous = pg.PlotCurveItem(x=[0.0], y=[], stepMode="center", pen=pg.mkPen(style.PREVIOUS, width=2,
                                                                    style=DASH))
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
        self._last_redraw = 0.0
        for item in self._points:
            item.clear()
        self._switch.hide()
        self._redraw()

    def set_previous(self, label: str, log: FaultLog | None) -> None:
        """Keep a finished run in grey under the next one (None: no overlay)."""
        self._previous = (label, log) if log is not None and log.count else None
        if self._previous is None:
            self._prev_points.clear()
        else:
            lat = np.maximum(log.records["latency"], FLOOR_S) * 1e3
            self._prev_points.setData(x=log.records["time"], y=np.log10(lat))
        self._redraw()

    # ---- every tick ----

    def update_from(self, snap: Snapshot, log: FaultLog, switchover: float | None) -> None:
        self._log = log
        new = snap.new_faults
        for channel, item in enumerate(self._points):
            mine = new[new["channel"] == channel]
            if len(mine):
                lat = np.maximum(mine["latency"], FLOOR_S) * 1e3
                item.addPoints(x=mine["time"], y=np.log10(lat))
        if switchover is not None and not self._switch.isVisible():
            self._switch.setValue(switchover)
            self._switch.show()
        due = time.monotonic() - self._last_redraw >= REDRAW_S or snap.phase != "running"
        if log.count != self._shown_count and due:
            self._redraw()

    def _redraw(self) -> None:
        """The histogram and the figures (percentiles over every fault: not every tick)."""
        self._last_redraw = time.monotonic()
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
        now = describe_stats(self._log.summary()) if self._log else "no faults yet"
        rows = [f"<b>this run</b> ({self._label}): {now}"]
        if self._previous is not None:
            label, log = self._previous
            rows.append(f"<span style='color:{style.css(style.PREVIOUS)}'>previous run, grey "
                        f"({label}): {describe_stats(log.summary())}</span>")
        return "<br>".join(rows)

    def stats_text(self) -> str:
        return self._stats.text()
