"""QtPointRaster: a scatter plot of many points, drawn as one image.

pyqtgraph's ScatterPlotItem paints every point at every repaint, so a plot that gains points
all through a run gets slower with each frame. Points that never move can be stamped into an
RGBA image once: a new point costs a few pixels, a repaint costs one small image, and only a
new view range or a resize stamps every point again.
"""

from __future__ import annotations

import numpy as np
import pyqtgraph as pg
from PySide6 import QtCore

RADIUS = 2  # a mark's radius in pixels (3 in presentation mode)


def mark(shape: str, radius: int = RADIUS) -> list[tuple[int, int]]:
    """The pixels (dy, dx) of one mark: a "disc" (at radius 2, a 5 x 5 square without its
    corners) or a diagonal "cross", two pixels thick from radius 3 on."""
    span = range(-radius, radius + 1)
    if shape == "disc":
        return [(dy, dx) for dy in span for dx in span if abs(dy) + abs(dx) < 2 * radius]
    thick = 1 if radius >= 3 else 0
    return [(dy, dx) for dy in span for dx in span
            if min(abs(dy - dx), abs(dy + dx)) <= thick]


DOT = mark("disc")


def stamp(image: np.ndarray, view: tuple[float, float, float, float], x: np.ndarray,
          y: np.ndarray, rgba: tuple[int, int, int, int],
          shape: list[tuple[int, int]] = DOT) -> None:
    """Draw marks of *shape* (pixel offsets) at data points (x, y)
    into *image* (rows, columns, 4; C-contiguous), which shows the data rectangle
    view = (x0, x1, y0, y1) with row 0 at y0.

    The points mark their pixels, and the marks grow into dots by shifting the whole mask
    once per pixel of a dot: the cost follows the image's size, not the number of points, of
    which a long run has many more than the plot has pixels.
    """
    rows, cols = image.shape[:2]
    x0, x1, y0, y1 = view
    r = max(max(abs(dy), abs(dx)) for dy, dx in shape)
    col = np.floor((x - x0) / (x1 - x0) * cols).astype(np.int64) + r
    row = np.floor((y - y0) / (y1 - y0) * rows).astype(np.int64) + r
    hit = np.zeros((rows + 2 * r, cols + 2 * r), bool)  # a margin for marks that spill in
    near = (row >= 0) & (row < rows + 2 * r) & (col >= 0) & (col < cols + 2 * r)
    hit[row[near], col[near]] = True
    dots = np.zeros((rows, cols), bool)
    for dy, dx in shape:
        dots |= hit[r - dy:r - dy + rows, r - dx:r - dx + cols]
    pixels = image.view(np.uint32).reshape(rows, cols)  # one store per pixel
    pixels[dots] = np.array(rgba, np.uint8).view(np.uint32)[0]


class QtPointRaster:
    """Layers of points (drawn in the order given) on one ImageItem in a ViewBox, each layer
    in its colour and shape ("disc" unless told)."""

    def __init__(self, box: pg.ViewBox, colours: list[tuple[int, int, int, int]],
                 shapes: list[str] | None = None) -> None:
        self._box = box
        self._colours = colours
        self._shape_names = shapes or ["disc"] * len(colours)
        self.set_radius(RADIUS)
        self._points: list[list[np.ndarray]] = [[] for _ in colours]  # per layer: (2, n)
        self._image = pg.ImageItem(axisOrder="row-major")
        box.addItem(self._image)
        self._picture = np.zeros((1, 1, 4), np.uint8)
        self._view = (0.0, 1.0, 0.0, 1.0)
        self._stale = True
        box.sigRangeChanged.connect(self._invalidate)
        box.sigResized.connect(self._invalidate)

    def set_radius(self, radius: int) -> None:
        """Marks of *radius* pixels from the next redraw on (presentation mode: thicker)."""
        self._shapes = [mark(name, radius) for name in self._shape_names]
        self._stale = True

    def count(self, layer: int) -> int:
        return sum(chunk.shape[1] for chunk in self._points[layer])

    def clear(self, layer: int) -> None:
        self._points[layer] = []
        self._stale = True

    def add(self, layer: int, x: np.ndarray, y: np.ndarray) -> None:
        """Add points to a layer: drawn at once on top, or with everything at the next
        redraw() if the view has changed."""
        chunk = np.vstack([np.asarray(x, float), np.asarray(y, float)])
        self._points[layer].append(chunk)
        if not self._stale:
            stamp(self._picture, self._view, chunk[0], chunk[1], self._colours[layer],
                  self._shapes[layer])
            self._image.setImage(self._picture, autoLevels=False, levels=(0, 255))

    def redraw(self) -> None:
        """Stamp every point again if the view range or size changed since the last time."""
        if not self._stale:
            return
        self._stale = False
        (x0, x1), (y0, y1) = self._box.viewRange()
        self._view = (x0, x1, y0, y1)
        rows, cols = max(1, round(self._box.height())), max(1, round(self._box.width()))
        self._picture = np.zeros((rows, cols, 4), np.uint8)
        for layer, chunks in enumerate(self._points):
            if chunks:
                self._points[layer] = [np.hstack(chunks)]  # one stamp per layer
                every = self._points[layer][0]
                stamp(self._picture, self._view, every[0], every[1], self._colours[layer],
                      self._shapes[layer])
        self._image.setImage(self._picture, autoLevels=False, levels=(0, 255))
        self._image.setRect(QtCore.QRectF(x0, y0, x1 - x0, y1 - y0))

    def _invalidate(self, *_) -> None:
        self._stale = True
