"""What every panel shares: colours, number formats, the window's style sheet."""

from __future__ import annotations

import weakref

from PySide6 import QtWidgets

from emu.migration import ram as R
from gui import pagemap

# A channel's colour is the colour of the pages it delivered on demand, in every panel.
CHANNEL_COLOURS = (pagemap.COLOURS[R.URGENT_MAIN], pagemap.COLOURS[R.URGENT_PREEMPT])
PREVIOUS = (110, 110, 110)  # the previous run's overlay
# Shapes go with the colours, so that a student who cannot tell the colours apart still reads
# the channel: a disc for main, a cross for preempt, in the scatter and in its key.
CHANNEL_SHAPES = ("disc", "cross")
CHANNEL_GLYPHS = ("&#9679;", "&#10006;")

PRESENTATION_SCALE = 1.5  # fonts in presentation mode, for a projector at the back of a hall
BASE_POINT_SIZE = 9.0  # the application's font outside presentation mode (Qt's default)
scale = 1.0  # the font scale in force: 1, or PRESENTATION_SCALE


def px(pixels: float) -> int:
    """A font size (or a mark's size) in pixels at the scale in force."""
    return round(pixels * scale)


def style_sheet() -> str:
    """The window's style sheet at the scale in force."""
    return f"""
QLabel#title {{ font-weight: bold; font-size: {px(14)}px; }}
QGroupBox {{ font-weight: bold; }}
QLabel#note {{ color: #b03000; }}
"""


STYLE_SHEET = style_sheet()


# Heavy redraws are spread over the frames of an 8-frame cycle (the window ticks every panel
# once per frame), so no frame pays for two of them: (phase, period) of each. A plot paints
# one frame after its update (the scene tells its view on the next pass of the event loop),
# a label on the same frame: the phases below make their paints land on distinct frames.
TURNS = {
    "points": (0, 4),  # new points on the latency scatter (painted on frames 1 and 5)
    "histogram": (2, 8),  # histogram and percentiles (painted on frame 3)
    "legend": (6, 8),  # page counts of the bitmap's legend
    "counters": (7, 8),  # query-migrate and blocktime
    "banner": (4, 8),  # the window's status line
}


class Turn:
    """due() is True once every `period` calls, at call number `phase` of each period, and
    always while Turn.everyone is set (a frame that must show everything, e.g. a screenshot)."""

    everyone = False

    def __init__(self, name: str) -> None:
        self.phase, self.period = TURNS[name]
        self._frame = -1

    def due(self) -> bool:
        self._frame += 1
        return Turn.everyone or self._frame % self.period == self.phase


def swatch(rgb: tuple[int, int, int], size: int = 14) -> QtWidgets.QLabel:
    """A small square of colour, for legends."""
    label = QtWidgets.QLabel()
    label.setFixedSize(size, size)
    label.setStyleSheet(f"background: rgb{rgb}; border: 1px solid #555;")
    return label


def fix_lines(label: QtWidgets.QLabel, lines: int) -> QtWidgets.QLabel:
    """Give a label whose text changes every frame a fixed height (and no say in its width):
    a label that grows or shrinks makes the layout move, and Qt then repaints every plot."""
    label.setFixedHeight(label.fontMetrics().lineSpacing() * lines + 4)
    label.setSizePolicy(QtWidgets.QSizePolicy.Policy.Ignored,
                        QtWidgets.QSizePolicy.Policy.Fixed)
    _fixed[label] = lines
    return label


_fixed: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # label -> lines, of fix_lines


def refit_lines() -> None:
    """Fixed heights again, after the font changed (presentation mode)."""
    for label, lines in list(_fixed.items()):
        label.setFixedHeight(label.fontMetrics().lineSpacing() * lines + 4)


def css(rgb: tuple[int, int, int]) -> str:
    return "#" + "".join(f"{c:02x}" for c in rgb)


def size(nbytes: float) -> str:
    """Bytes the way people read them: 0 B, 812 B, 4 KiB, 3.9 MiB."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if abs(nbytes) >= 1 << shift:
            return f"{nbytes / (1 << shift):.1f}".removesuffix(".0") + f" {unit}"
    return f"{nbytes:.0f} B"


def rate(bytes_per_s: float) -> str:
    """A link speed in bits, as network people say it: 1 Gbit/s, 100 Mbit/s."""
    bits = bytes_per_s * 8
    for unit, mult in (("Tbit/s", 1e12), ("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bits >= mult:
            return f"{bits / mult:.1f}".removesuffix(".0") + f" {unit}"
    return f"{bits:.0f} bit/s"


def duration(seconds: float) -> str:
    """A latency or an age: 57 us, 0.83 ms, 33.1 ms, 1.20 s."""
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} us"
    if seconds < 10e-3:
        return f"{seconds * 1e3:.2f} ms"
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.2f} s"
