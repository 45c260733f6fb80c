"""QtPageBitmap: every host page of guest RAM as one cell, coloured by what happened to it.

One persistent ImageItem holds a 2-D uint8 grid of page keys (see gui.pagemap) drawn through
a fixed 256-entry lookup table with levels (0, 255): Qt paints it as an indexed image, so a
million pages cost two byte-wide passes and one compare per frame, and a redraw only when a
page changed.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyqtgraph as pg
from PySide6 import QtCore, QtWidgets

from emu.migration import ram as R
from gui import pagemap
from gui._qt import style
from gui._qt.style import swatch
from gui.session import RUNNING, Snapshot

MARKED_MAX = 64  # waiting pages circled at once; more would hide the picture
RING = (200, 0, 40)  # the circle around a page a vCPU waits for
HOVER = "Hover over a page for its story; click to keep it."
INFO_LINES = 2  # of a page's story


class QtPageBitmap(QtWidgets.QWidget):
    """The page grid, its legend with live counts, and a line about the hovered page."""

    def __init__(self, parent: QtWidgets.QWidget | None = None) -> None:
        super().__init__(parent)
        self._title = QtWidgets.QLabel()
        self._title.setObjectName("title")
        self._view = pg.GraphicsLayoutWidget()
        self._view.setBackground("w")
        # the context menu offers pyqtgraph's exporters (PNG, SVG, ...)
        self._box = self._view.addViewBox(lockAspect=True, invertY=True, enableMenu=True)
        self._box.setMouseEnabled(x=False, y=False)  # the whole guest, always: hover for detail
        self._image = pg.ImageItem(axisOrder="row-major", autoDownsample=False)
        self._image.setLookupTable(pagemap.lookup_table())
        self._image.setLevels((0, 255))
        self._box.addItem(self._image)
        # Circles around pages a vCPU waits for: one page is a pixel or less on a big guest.
        self._waiting = pg.ScatterPlotItem(symbol="o", brush=None)
        self._pinned = pg.ScatterPlotItem(symbol="s", brush=None)
        for item in (self._waiting, self._pinned):
            self._box.addItem(item)
        self._info = QtWidgets.QLabel(HOVER)
        self._info.setWordWrap(True)
        self.set_presentation(False)
        self._legend, self._counts, self._names = _legend()
        self._layout()
        self._view.scene().sigMouseMoved.connect(self._hovered)
        self._view.scene().sigMouseClicked.connect(self._clicked)
        self._legend_turn = style.Turn("legend")
        self._describe: Callable[[int, int, np.ndarray], str] | None = None
        self._snap: Snapshot | None = None
        self._pin: int | None = None
        self._hover: int | None = None
        self.reset(1, R.TARGET_PAGE)

    def _layout(self) -> None:
        grid = QtWidgets.QGridLayout(self)
        grid.setContentsMargins(0, 0, 0, 0)
        grid.addWidget(self._title, 0, 0, 1, 2)
        grid.addWidget(self._view, 1, 0)
        grid.addLayout(self._legend, 1, 1)
        grid.addWidget(self._info, 2, 0, 1, 2)
        grid.setColumnStretch(0, 1)
        grid.setRowStretch(1, 1)

    def set_presentation(self, on: bool) -> None:
        """Thicker rings around waiting and pinned pages in presentation mode."""
        width = 3 if on else 2
        self._waiting.setSize(19 if on else 15)
        self._waiting.setPen(pg.mkPen(RING, width=width))
        self._pinned.setSize(25 if on else 21)
        self._pinned.setPen(pg.mkPen("k", width=width))
        style.fix_lines(self._info, INFO_LINES + on)  # a page's story at 1.5 times the size

    # ---- a new run ----

    def reset(self, npages: int, page_size: int,
              describe: Callable[[int, int, np.ndarray], str] | None = None,
              preempt: bool = False) -> None:
        """Blank grid for a guest of npages host pages; describe(page, display code, arrival
        times) gives the hover text; the legend's words fit a run with(out) *preempt*."""
        for code, text in pagemap.legend(preempt).items():
            self._names[code].setText(text)
        self.npages = npages
        rows, cols = pagemap.grid_shape(npages)
        self._cols = cols
        self._shown = np.full((rows, cols), pagemap.OUTSIDE_KEY, np.uint8)
        self._keys(self._shown)[:] = R.MISSING << pagemap.SRC_BITS | R.UNSENT
        self._next = self._shown.copy()
        self._factor = 0  # pages per screen pixel, each way, of the picture drawn
        self._draw()
        self._box.setRange(QtCore.QRectF(0, 0, cols, rows), padding=0.01)
        self._describe = describe
        self._snap = None
        self._pin = self._hover = None
        self._marked = np.zeros(0, np.int64)
        self._waiting.setData([], [])
        self._pinned.setData([], [])
        self._set_counts()
        # short enough for a 1280-pixel screen: the layout of the grid goes in the tooltip
        self._title.setText(f"Guest RAM on the destination: {npages:,} pages of "
                            f"{style.size(page_size)}")
        self._title.setToolTip(f"One cell per host page, {cols} per row, page 0 top left")
        self._info.setText(HOVER)

    # ---- every tick ----

    def update_from(self, snap: Snapshot) -> bool:
        """Redraw what changed; True if the picture changed."""
        count_turn = self._legend_turn.due() or snap.phase != RUNNING
        self._snap = snap
        if snap.dst is None:
            return False
        queued = np.fromiter((p for p, _ in snap.urgent.queued), np.int64)
        pagemap.page_keys(snap.dst, snap.src, self._keys(self._next), queued)
        changed = not np.array_equal(self._next, self._shown)
        if changed:
            self._shown, self._next = self._next, self._shown
        if changed or self._factor != self._fit_factor():
            self._draw()
        self._stale_counts |= changed
        if self._stale_counts and count_turn:
            self._set_counts()
        self._mark_waiting(snap.waiting[:MARKED_MAX])
        self._show_info()
        return changed

    def _fit_factor(self) -> int:
        rows, cols = self._shown.shape
        return pagemap.pool_factor(rows, cols, self._box.width(), self._box.height())

    def _draw(self) -> None:
        """Hand the grid to the image; with more pages than pixels, a pooled copy that keeps
        the rare states visible (Qt's own scaling would drop three pages in four)."""
        factor = self._fit_factor()
        picture = self._shown if factor == 1 else pagemap.pool(self._shown, factor)
        self._image.setImage(picture, autoLevels=False, levels=(0, 255))
        if factor != self._factor:
            rows, cols = picture.shape
            self._image.setRect(QtCore.QRectF(0, 0, cols * factor, rows * factor))
            self._factor = factor

    def _keys(self, grid: np.ndarray) -> np.ndarray:
        return grid.reshape(-1)[:self.npages]

    def _mark_waiting(self, pages: np.ndarray) -> None:
        if np.array_equal(pages, self._marked):
            return
        self._marked = pages
        rows, cols = np.divmod(pages, self._cols)
        self._waiting.setData(cols + 0.5, rows + 0.5)

    def _set_counts(self) -> None:
        """The legend's page counts: a full pass over the pages, so a few times a second."""
        self._stale_counts = False
        counts = pagemap.counts(self._keys(self._shown))
        for code, label in self._counts.items():
            label.setText(f"{int(counts[code]):,}")

    def legend_text(self, code: int) -> str:
        """The legend's words for display state *code* (for tests)."""
        return self._names[code].text()

    def count(self, code: int) -> int:
        """Pages the legend counts in display state *code* (for tests)."""
        return int(self._counts[code].text().replace(",", ""))

    # ---- hover and click ----

    def _page_at(self, scene_pos: QtCore.QPointF) -> int | None:
        if not self._box.sceneBoundingRect().contains(scene_pos):
            return None
        point = self._box.mapSceneToView(scene_pos)
        row, col = int(np.floor(point.y())), int(np.floor(point.x()))
        page = row * self._cols + col
        if 0 <= col < self._cols and 0 <= page < self.npages and row >= 0:
            return page
        return None

    def _hovered(self, scene_pos: QtCore.QPointF) -> None:
        self._hover = self._page_at(scene_pos)
        self._show_info()

    def _clicked(self, event) -> None:
        if event.button() == QtCore.Qt.MouseButton.LeftButton:  # the right one: the menu
            self.select(self._page_at(event.scenePos()))

    def select(self, page: int | None) -> None:
        """Keep telling the story of *page* (None: forget it), as a click does."""
        self._pin = page
        if page is None:
            self._pinned.setData([], [])
        else:
            row, col = divmod(page, self._cols)
            self._pinned.setData([col + 0.5], [row + 0.5])
        self._show_info()

    def info_text(self) -> str:
        return self._info.text()

    @property
    def view(self) -> pg.GraphicsLayoutWidget:
        return self._view

    @property
    def view_box(self) -> pg.ViewBox:
        return self._box

    def _show_info(self) -> None:
        page = self._hover if self._hover is not None else self._pin
        snap = self._snap
        if page is None or snap is None or snap.dst is None or self._describe is None:
            return
        code = int(pagemap.KEY_CODES[self._keys(self._shown)[page]])
        self._info.setText(self._describe(page, code, snap.arrival))


def _legend() -> tuple[QtWidgets.QGridLayout, dict[int, QtWidgets.QLabel],
                       dict[int, QtWidgets.QLabel]]:
    grid = QtWidgets.QGridLayout()
    grid.setVerticalSpacing(2)
    heading = QtWidgets.QLabel("<b>page state</b>")
    grid.addWidget(heading, 0, 0, 1, 3)
    counts, names = {}, {}
    for row, code in enumerate(pagemap.LEGEND_ORDER, start=1):
        grid.addWidget(swatch(pagemap.COLOURS[code]), row, 0)
        names[code] = QtWidgets.QLabel(pagemap.LEGEND[code])
        grid.addWidget(names[code], row, 1)
        counts[code] = QtWidgets.QLabel("0")
        counts[code].setAlignment(QtCore.Qt.AlignmentFlag.AlignRight)
        # room for a million pages, so a growing count does not move the layout
        counts[code].setMinimumWidth(counts[code].fontMetrics().horizontalAdvance("0,000,000"))
        grid.addWidget(counts[code], row, 2)
    ring = QtWidgets.QLabel("<span style='color:#c80028; font-size:15px'>&#9711;</span>")
    grid.addWidget(ring, len(pagemap.LEGEND_ORDER) + 1, 0)
    grid.addWidget(QtWidgets.QLabel("a vCPU is blocked on this page"),
                   len(pagemap.LEGEND_ORDER) + 1, 1, 1, 2)
    grid.setRowStretch(len(pagemap.LEGEND_ORDER) + 2, 1)
    return grid, counts, names
