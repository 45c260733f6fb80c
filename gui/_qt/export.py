"""Pictures of the window's panels, as files: PNG (what is on screen) or SVG (vector, for
slides). The plots' context menus offer the same exporters.

pyqtgraph's own SVG exporter fails on the paths Qt 6 writes, closed with "Z" (pyqtgraph issue
#3495: `x,y = c.split(',')`, ValueError), so SVG here is Qt's own QSvgGenerator drawing the
scene, registered with pyqtgraph in its place: the context menu's "Export..." offers it too.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyqtgraph as pg
import pyqtgraph.exporters  # noqa: F401 (pg.exporters is not imported by pyqtgraph itself)
from PySide6 import QtCore, QtGui, QtWidgets
from PySide6.QtSvg import QSvgGenerator

FORMATS = (".png", ".svg")
PNG_SCALE = 2  # PNG exports at twice the screen's pixels: sharp on a slide


class QtSvgExporter(pg.exporters.Exporter):
    """An item (a PlotItem with its axes, a ViewBox) or a whole scene as SVG, drawn by Qt."""

    Name = "Scalable Vector Graphics (SVG)"
    allowCopy = False

    def parameters(self):
        return None

    def export(self, fileName=None, toBytes=False, copy=False):  # noqa: N803 (pyqtgraph's)
        if fileName is None:
            self.fileSaveDialog(filter="Scalable Vector Graphics (*.svg)")
            return
        source = self.getSourceRect()
        target = QtCore.QRectF(0, 0, source.width(), source.height())
        svg = QSvgGenerator()
        svg.setFileName(os.fspath(fileName))
        svg.setSize(target.size().toSize())
        svg.setViewBox(target)
        # the screen's dots per inch: at the generator's 72, text in points would shrink and
        # the axes, which measure their text, would draw their ticks elsewhere
        svg.setResolution(round(QtGui.QGuiApplication.primaryScreen().logicalDotsPerInch()))
        svg.setTitle("postcopy-emu")
        painter = QtGui.QPainter(svg)
        try:
            painter.fillRect(target, QtGui.QColor("white"))  # the plots' background
            self.setExportMode(True, {"painter": painter, "antialias": True,
                                      "background": QtGui.QColor("white")})
            self.getScene().render(painter, target, source)
        finally:
            self.setExportMode(False)
            painter.end()


pg.exporters.Exporter.Exporters[:] = [
    exporter for exporter in pg.exporters.Exporter.Exporters
    if exporter is not pg.exporters.SVGExporter]
QtSvgExporter.register()


def save_item(item, path: str | os.PathLike) -> None:
    """Save a plot's PlotItem (axes included), or a ViewBox, as PNG or SVG by *path*'s suffix."""
    suffix = Path(path).suffix.lower()
    if suffix == ".svg":
        QtSvgExporter(item).export(os.fspath(path))
    elif suffix == ".png":
        exporter = pg.exporters.ImageExporter(item)
        width = int(item.sceneBoundingRect().width() * PNG_SCALE)
        exporter.parameters()["width"] = width  # the height follows, aspect kept
        if not exporter.export(os.fspath(path)) and not Path(path).exists():
            raise OSError(f"could not save {path}")
    else:
        raise ValueError(f"{path}: export as .png or .svg")


def save_widget(widget: QtWidgets.QWidget, path: str | os.PathLike) -> None:
    """A widget as drawn on screen (the whole window, e.g.), as PNG."""
    if Path(path).suffix.lower() != ".png":
        raise ValueError(f"{path}: a window is saved as .png")
    if not widget.grab().save(os.fspath(path), "PNG"):
        raise OSError(f"could not save {path}")
