"""QtLatencyPlots: how long each vCPU waited for each missing page.

Top: every resolved fault as a point, emulated time against latency on a log scale, coloured by
the channel that delivered the page. Bottom: QEMU's postcopy-latency-dist, the log2 histogram
(bucket N = [2^N us, 2^(N+1) us)), as a share of all faults. The previous run stays in grey
underneath both, so vanilla and preempt compare side by side. Points are appended to
persistent items; the histogram and the figures are redrawn a few times a second at most.
"""

from __future__ import annotations

import math

import numpy as np
import pyqtgraph as pg
from PySide6 import QtCore, QtGui, QtWidgets

from emu.figures import metrics
from gui._qt import style
from gui._qt.pointraster import QtPointRaster
from gui.comparison import ProgressTrack, compare
from gui.labels import bucket_interval, bucket_label
from gui.session import BUCKETS, RUNNING, FaultLog, Snapshot

DASH = QtCore.Qt.PenStyle.DashLine
HATCH = QtCore.Qt.BrushStyle.BDiagPattern
STATS_LINES = 3  # this run's figures, the previous run's, how they compare
STATS_PX, STATS_SCALE_MAX = 12, 1.35  # the figures' letters, and how much they grow at most
WIDEST_LABEL = "1.02ms"  # the widest of the histogram's bucket labels (bucket_label)
HIST_AXIS = "postcopy-latency-dist bucket (lower edge)"
FLOOR_S = 1e-6  # latencies are drawn no lower than 1 us (a log scale has no zero)
PREVIOUS_POINTS = (175, 175, 175)  # the previous run's points: light, under this run's
X_END = 0.5  # emulated seconds shown at first
Y_RANGE = (-2.0, 2.0)  # log10(ms): 10 us to 100 ms, widened to fit every point


def _log_ms(latency_s: np.ndarray) -> np.ndarray:
    """What the scatter plots: log10 of the latency in ms (the axis labels it in ms)."""
    return np.log10(np.maximum(latency_s, FLOOR_S) * 1e3)


def _key_html(previous: str | None) -> str:
    """What the marks mean: the channel that brought the page (by colour and by shape), or
    the previous run."""
    marks = list(zip(style.CHANNEL_COLOURS, style.CHANNEL_GLYPHS, metrics.CHANNELS,
                     strict=True))
    # the previous run's mode without its details: the line must fit a 1280-pixel screen
    marks.append((PREVIOUS_POINTS, style.CHANNEL_GLYPHS[0],
                  f"previous ({previous.partition(',')[0]})" if previous else "previous run"))
    return "via " + " &nbsp; ".join(
        f"<span style='color:{style.css(rgb)}; font-size:{style.px(16)}px'>{glyph}</span> "
        f"{text}" for rgb, glyph, text in marks)


def _label(plot: pg.PlotItem, side: str, text: str) -> None:
    """An axis title in the font size in force."""
    plot.setLabel(side, text, **{"font-size": f"{style.px(11)}px"})


def _short(label: str) -> str:
    """A mode label in the comparison's few words: "postcopy-preempt" -> "preempt"."""
    return label.replace("postcopy-preempt", "preempt").replace("vanilla postcopy", "vanilla")


def stats_row(name: str, stats: dict, colour: str = "#000") -> str:
    """One row of the figures table: which run, count, avg, p50, p99."""
    cells = [name, f"{stats['count']:,} faults"]
    if stats["count"]:
        cells += [f"{what} {style.duration(stats[key] * 1e-6)}" for what, key in
                  (("avg", "avg-us"), ("p50", "p50-us"), ("p99", "p99-us"))]
    return (f"<tr style='color:{colour}'>"
            + "".join(f"<td nowrap style='padding-right:6px'>{cell}</td>" for cell in cells)
            + "</tr>")


class QtLatencyPlots(QtWidgets.QWidget):
    def __init__(self, parent: QtWidgets.QWidget | None = None) -> None:
        super().__init__(parent)
        self._title = QtWidgets.QLabel("Page-fault latency")
        self._title.setObjectName("title")
        # said where the figures are: the emulator fell behind, so they are too high
        self._warning = QtWidgets.QLabel()
        self._warning.setObjectName("distorted")
        self._warning.setWordWrap(True)
        self._warning.setStyleSheet("color: #b00000; font-weight: bold;")
        self._warning.hide()
        self._stats = QtWidgets.QLabel()
        self._stats.setTextFormat(QtCore.Qt.TextFormat.RichText)
        style.fix_lines(self._stats, STATS_LINES)
        self._key = QtWidgets.QLabel(_key_html(None))
        style.fix_lines(self._key, 1)
        self._scatter = pg.PlotWidget(background="w")
        self._hist = pg.PlotWidget(background="w")
        self._stride = 0  # buckets between two labels on the histogram's axis
        self._raster, self._switch = self._build_scatter()
        self._bars, self._prev_bars = self._build_hist()
        self._hist.scene().sigMouseMoved.connect(self._hist_hovered)
        self._hist.getPlotItem().getViewBox().sigResized.connect(self._label_buckets)
        layout = QtWidgets.QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        for widget, stretch in ((self._title, 0), (self._warning, 0), (self._stats, 0),
                                (self._key, 0), (self._scatter, 1), (self._hist, 1)):
            layout.addWidget(widget, stretch)
        self._previous: tuple[str, FaultLog] | None = None
        self._progress = ProgressTrack()  # this run's guest progress, for the comparison
        self._prev_progress = ProgressTrack()
        self._prev_xy = (np.zeros(0), np.zeros(0))  # the previous run's points
        self._buckets_shown: tuple[int, int] | None = None
        self._points_turn = style.Turn("points")
        self._hist_turn = style.Turn("histogram")
        self.reset("")

    # ---- building ----

    def _build_scatter(self) -> tuple[QtPointRaster, pg.InfiniteLine]:
        plot = self._scatter.getPlotItem()
        _label(plot, "left", "latency (ms)")  # the decades say that the scale is log
        _label(plot, "bottom", "emulated time (s)")
        plot.getAxis("left").setLogMode(True)  # the points are log10(ms)
        plot.getAxis("bottom").enableAutoSIPrefix(False)
        # Decade lines instead of showGrid(): a grid is drawn by the axes across the whole
        # plot, so every new point would repaint both axes with all their ticks.
        for decade in range(-4, 6):
            plot.addItem(pg.InfiniteLine(decade, angle=0, pen=pg.mkPen((225, 225, 225))),
                         ignoreBounds=True)
        plot.setMouseEnabled(x=False, y=False)
        plot.disableAutoRange()
        # layer 0: the previous run, under the current run's channels (1: main, 2: preempt)
        raster = QtPointRaster(plot.getViewBox(), [(*PREVIOUS_POINTS, 255)] + [
            (*rgb, 255) for rgb in style.CHANNEL_COLOURS],
            ["disc", *style.CHANNEL_SHAPES])
        switch = pg.InfiniteLine(angle=90, pen=pg.mkPen((80, 80, 80), style=DASH),
                                 label="switchover", labelOpts={"position": 0.95,
                                                                "color": (60, 60, 60)})
        plot.addItem(switch)
        return raster, switch

    def _build_hist(self) -> tuple[list[pg.BarGraphItem], pg.PlotCurveItem]:
        plot = self._hist.getPlotItem()
        # no title: its line is the room the "% of faults" axis needs on a 720-pixel screen
        _label(plot, "left", "% of faults")
        _label(plot, "bottom", HIST_AXIS)
        plot.setMouseEnabled(x=False, y=False)
        plot.disableAutoRange()
        # A fixed scale, the 0 line clear of the axis below: the axes repaint only on resize.
        plot.setYRange(-8, 104, padding=0)
        for share in range(25, 101, 25):  # grid lines as items: see _build_scatter
            plot.addItem(pg.InfiniteLine(share, angle=0, pen=pg.mkPen((225, 225, 225))),
                         ignoreBounds=True)
        # three labels, room for them on a short plot with large letters
        plot.getAxis("left").setTicks([[(v, f"{v}") for v in (0, 50, 100)],
                                       [(v, "") for v in (25, 75)]])
        bars = []
        for rgb in style.CHANNEL_COLOURS:
            item = pg.BarGraphItem(x0=[], width=1, height=[], brush=rgb, pen=pg.mkPen("w"))
            plot.addItem(item)
            bars.append(item)
        # preempt's bars are hatched as well as blue: the shape of the channel, not only
        # its colour (the scatter's crosses)
        self._hatch = pg.BarGraphItem(x0=[], width=1, height=[], pen=pg.mkPen(None),
                                      brush=QtGui.QBrush(QtGui.QColor("white"), HATCH))
        plot.addItem(self._hatch)
        pen = pg.mkPen(style.PREVIOUS, width=2, style=DASH)
        previous = pg.PlotCurveItem(x=[0.0], y=[], stepMode="center", pen=pen)
        plot.addItem(previous)
        return bars, previous

    def _label_buckets(self, *_) -> None:
        """Name every bucket the axis has room for (1, 2, 4 ... buckets apart), the others
        get a bare tick: labels that overlap are read by nobody."""
        box = self._hist.getPlotItem().getViewBox()
        (x0, x1), _ = box.viewRange()
        axis = self._hist.getPlotItem().getAxis("bottom")
        font = axis.style.get("tickFont") or self._hist.font()
        room = QtGui.QFontMetrics(font).horizontalAdvance(WIDEST_LABEL) * 1.1
        per_bucket = max(box.width(), 1) / max(x1 - x0, 1e-9)
        stride = 1
        while stride * per_bucket < room and stride < BUCKETS:
            stride *= 2
        if stride == self._stride:
            return
        self._stride = stride
        axis.setTicks([[(n, bucket_label(n)) for n in range(0, BUCKETS, stride)],
                       [(n, "") for n in range(BUCKETS) if n % stride]])

    def bucket_labels(self) -> list[str]:
        """The histogram's tick labels, as drawn (for tests)."""
        return [text for n, text in self._hist.getPlotItem().getAxis("bottom")._tickLevels[0]]

    def _hist_hovered(self, scene_pos: QtCore.QPointF) -> None:
        """The tick labels give a bucket's lower edge, rounded: the tooltip the whole bucket."""
        x = self._hist.getPlotItem().getViewBox().mapSceneToView(scene_pos).x()
        self._hist.setToolTip(self.bucket_tip(x))

    @property
    def histogram(self) -> pg.PlotWidget:
        return self._hist

    @staticmethod
    def bucket_tip(x: float) -> str:
        """The tooltip over the histogram at bucket coordinate *x* (bucket n spans [n, n+1))."""
        n = math.floor(x)
        return f"bucket {n}: {bucket_interval(n)}" if 0 <= n < BUCKETS else ""

    def set_presentation(self, on: bool) -> None:
        """Fonts at the scale in force (gui._qt.style.scale), thicker marks and lines."""
        font = QtGui.QFont(self.font())
        font.setPointSizeF(style.BASE_POINT_SIZE * style.scale)
        for widget in (self._scatter, self._hist):
            plot = widget.getPlotItem()
            for side in ("left", "bottom"):
                axis = plot.getAxis(side)
                axis.setStyle(tickFont=font)
                _label(plot, side, axis.labelText)
        self._raster.set_radius(3 if on else 2)
        self._raster.redraw()
        self._switch.setPen(pg.mkPen((80, 80, 80), width=3 if on else 1, style=DASH))
        self._prev_bars.setPen(pg.mkPen(style.PREVIOUS, width=4 if on else 2, style=DASH))
        self._key.setText(_key_html(self.previous_label()))
        self._stats.setText(self._stats_html())
        self._stride = 0
        self._label_buckets()

    @property
    def scatter(self) -> pg.PlotWidget:
        return self._scatter

    # ---- runs ----

    def reset(self, label: str) -> None:
        """Clear the current run; *label* names it in the figures ("postcopy-preempt")."""
        self._label = label
        self._log: FaultLog | None = None
        self._progress = ProgressTrack()
        self._shown_count = -1
        self._pending: list[np.ndarray] = []
        for channel in range(len(metrics.CHANNELS)):
            self._raster.clear(1 + channel)
        self._switch.hide()
        self._y = Y_RANGE
        self._x_end = X_END
        self._fit_y(self._prev_xy[1])
        self._fit_x(self._prev_xy[0])
        self._raster.redraw()
        self._redraw()

    def set_previous(self, label: str, log: FaultLog | None,
                     progress: dict | None = None) -> None:
        """Keep a finished run in grey under the next one (None: no overlay), with its guest
        progress (its report's, emu/figures/progress.py) to compare the next one's with,
        point by point as far as this panel saw it run."""
        self._previous = (label, log) if log is not None and log.count else None
        self._prev_progress, self._progress = self._progress, ProgressTrack()
        self._prev_progress.add(progress)
        if self._previous is None or progress is None:
            self._prev_progress = ProgressTrack()
        self._key.setText(_key_html(label if self._previous else None))
        self._raster.clear(0)
        self._prev_xy = (np.zeros(0), np.zeros(0))
        if self._previous is not None:
            self._prev_xy = (log.records["time"], _log_ms(log.records["latency"]))
            self._fit_y(self._prev_xy[1])
            self._fit_x(self._prev_xy[0])
            self._raster.add(0, *self._prev_xy)
        self._raster.redraw()
        self._redraw()

    def _fit_y(self, log_ms: np.ndarray | None) -> None:
        """Keep whole decades in view: a log axis over a sliver of a decade has no labels."""
        if log_ms is not None and len(log_ms):
            lo = min(self._y[0], np.floor(np.min(log_ms)))
            hi = max(self._y[1], np.ceil(np.max(log_ms)))
            if (lo, hi) == self._y:
                return
            self._y = (lo, hi)
        # room above the top decade for its label, which is centred on it
        self._scatter.getPlotItem().setYRange(*self._y, padding=0.06)

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
        self._raster.redraw()  # only does something after a new range or a resize
        if switchover is not None and not self._switch.isVisible():
            self._switch.setValue(switchover)
            self._switch.show()
        if not (self._hist_turn.due() or not running):
            return
        seen = self._progress.now
        self._progress.add(snap.progress)
        if log.count != self._shown_count:
            self._redraw()
        elif self._progress.now != seen and self._previous is not None:
            self._stats.setText(self._stats_html())  # only the comparison line changed

    def _add_points(self) -> None:
        if not self._pending:
            return
        new = np.concatenate(self._pending)
        self._pending.clear()
        log_ms = _log_ms(new["latency"])
        self._fit_y(log_ms)  # first: a new range redraws every point anyway
        self._fit_x(new["time"])
        for channel in range(len(metrics.CHANNELS)):
            mine = new["channel"] == channel
            if mine.any():
                self._raster.add(1 + channel, new["time"][mine], log_ms[mine])

    def _redraw(self) -> None:
        """The histogram and the figures."""
        log = self._log
        self._shown_count = log.count if log else 0
        dist = log.dist if log else np.zeros((len(metrics.CHANNELS), BUCKETS))
        prev = self._previous[1].dist.sum(axis=0) if self._previous else np.zeros(BUCKETS)
        lo, hi = self._fit_buckets(dist.sum(axis=0) + prev)
        # Bars only where the axis shows them: a bar off to the side would still make the
        # axes repaint with every redraw.
        shown = np.arange(lo, hi)
        base = np.zeros(len(shown))
        for channel, bars in enumerate(self._bars):
            share = dist[channel, lo:hi] * 100 / max(int(dist.sum()), 1)
            bars.setOpts(x0=shown, width=1, y0=base.copy(), height=share)
            if channel == 1:
                self._hatch.setOpts(x0=shown, width=1, y0=base.copy(), height=share)
            base += share
        if self._previous:
            share = prev[lo:hi] * 100 / max(int(prev.sum()), 1)
            self._prev_bars.setData(np.arange(lo, hi + 1), share)
        else:
            self._prev_bars.setData([0.0], [])
        self._stats.setText(self._stats_html())

    def _fit_buckets(self, used_dist: np.ndarray) -> tuple[int, int]:
        """The buckets to show, [lo, hi): every one in use and a spare each side, at least
        ten; the axis range changes only when they do."""
        used = np.flatnonzero(used_dist)
        lo, hi = (used[0] - 1, used[-1] + 2) if len(used) else (5, 15)  # 32 us .. 32 ms
        lo, hi = max(min(lo, hi - 10), 0), max(hi, lo + 10)
        if (lo, hi) != self._buckets_shown:
            self._buckets_shown = (lo, hi)
            self._hist.getPlotItem().setXRange(lo - 0.3, hi + 0.3, padding=0)  # clear of the axes
            self._label_buckets()
        return lo, hi

    def _stats_html(self) -> str:
        log = self._log or FaultLog()
        rows = [stats_row("<b>this run</b>", log.summary())]
        if self._previous is not None:
            rows.append(stats_row("previous run", self._previous[1].summary(),
                                  style.css(style.PREVIOUS)))
        # the panel's widest line: its letters grow less than the rest in presentation mode
        size = round(STATS_PX * min(style.scale, STATS_SCALE_MAX))
        html = (f"<table cellspacing='0' cellpadding='0' style='font-size:{size}px'>"
                + "".join(rows) + "</table>")
        self._stats.setToolTip(self.comparison_tip())
        return html + self._comparison_html()

    def _comparison(self) -> tuple[str, str] | None:
        """(line, tooltip) of the grey comparison of guest progress (gui/comparison.py)."""
        if self._previous is None:
            return None
        return compare(self._progress, self._prev_progress, _short(self._label),
                       _short(self._previous[0]))

    def _comparison_html(self) -> str:
        """'preempt: 2.1x more guest progress than vanilla', in grey: one short line (the
        figures themselves are in its tooltip)."""
        found = self._comparison()
        if found is None:
            return ""
        return f"<div style='color:{style.css(style.PREVIOUS)}'>{found[0]}</div>"

    def comparison_tip(self) -> str:
        found = self._comparison()
        return "" if found is None else found[1]

    def comparison_text(self) -> str:
        """The comparison line as shown, without its markup ("" when there is none)."""
        return QtGui.QTextDocumentFragment.fromHtml(self._comparison_html()).toPlainText()

    def set_warning(self, text: str | None) -> None:
        """Say (or stop saying) that the figures are distorted, and how to get faithful ones."""
        if text != self.warning():
            self._warning.setText(text or "")
            self._warning.setHidden(text is None)

    def warning(self) -> str | None:
        """The distortion said beside the figures, if any."""
        return None if self._warning.isHidden() else self._warning.text()

    def stats_text(self) -> str:
        return self._stats.text()

    def previous_label(self) -> str | None:
        """The mode of the run shown in grey, if any."""
        return self._previous[0] if self._previous else None

    def point_count(self) -> int:
        """Points drawn for the current run (for tests)."""
        return sum(self._raster.count(1 + channel) for channel in range(len(metrics.CHANNELS)))
