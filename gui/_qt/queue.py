"""QtUrgentQueue: where the pages that vCPUs wait for are, and what is ahead of them.

One row per stop on an urgent page's round trip: its request on the return path, the request
in the source's queue (QEMU's src_page_requests), then the page on the main channel (behind
the background stream, in vanilla postcopy) or on the preempt channel; with the bytes each
link connection holds queued. Each page shows its age: how long its vCPU has been blocked.
Under them, what main's backlog costs an urgent page, and what the chosen migration.design does
with one (gui.designs.urgent_path).
"""

from __future__ import annotations

from PySide6 import QtCore, QtWidgets

from emu.config import Config
from gui._qt import style
from gui.designs import urgent_path
from gui.session import Snapshot

SHOWN = 2  # pages listed per row; the rest are counted
HEADERS = (("where", "the stops of an urgent page's round trip"),
           ("queued", "bytes the link connection holds, of its socket buffer"),
           ("urgent pages (age)", "the pages a vCPU waits for there, and for how long"))
BAR_STEPS = 1000


class QtUrgentQueue(QtWidgets.QWidget):
    def __init__(self, parent: QtWidgets.QWidget | None = None) -> None:
        super().__init__(parent)
        title = QtWidgets.QLabel("Urgent pages: a vCPU waits on each")
        title.setObjectName("title")
        grid = QtWidgets.QGridLayout(self)
        grid.setContentsMargins(0, 0, 0, 0)
        grid.addWidget(title, 0, 0, 1, 3)
        self._headers = []
        for col, (text, tip) in enumerate(HEADERS):
            header = QtWidgets.QLabel(_grey(text))
            header.setToolTip(tip)
            grid.addWidget(header, 1, col)
            self._headers.append(header)
        self._bars: dict[str, QtWidgets.QProgressBar] = {}
        self._lists: dict[str, QtWidgets.QLabel] = {}
        rows = (("return", "return path\ndest → source"),
                ("queue", "request queue\nat the source"),
                ("main", "main channel\nsource → dest"),
                ("preempt", "preempt channel\nsource → dest"))
        top = QtCore.Qt.AlignmentFlag.AlignTop
        for row, (key, text) in enumerate(rows, start=2):
            grid.addWidget(QtWidgets.QLabel(text), row, 0, top)
            if key != "queue":
                self._bars[key] = _bar()
                grid.addWidget(self._bars[key], row, 1, top)
            self._lists[key] = QtWidgets.QLabel()
            self._lists[key].setTextFormat(QtCore.Qt.TextFormat.RichText)
            self._lists[key].setAlignment(QtCore.Qt.AlignmentFlag.AlignTop)
            style.fix_lines(self._lists[key], SHOWN + 1)
            grid.addWidget(self._lists[key], row, 2)
        self._hint = QtWidgets.QLabel()
        self._hint.setWordWrap(True)
        style.fix_lines(self._hint, 2)
        grid.addWidget(self._hint, len(rows) + 2, 0, 1, 3)
        # what the chosen design does with an urgent page: set once a run, so it may grow
        self._path = QtWidgets.QLabel()
        self._path.setObjectName("design-path")
        self._path.setWordWrap(True)
        grid.addWidget(self._path, len(rows) + 3, 0, 1, 3)
        grid.setColumnStretch(1, 1)  # the pages need the room more than the bars
        grid.setColumnStretch(2, 3)
        grid.setRowStretch(len(rows) + 4, 1)
        self._texts: dict[str, str] = {}
        self.reset(None)

    def set_presentation(self, on: bool) -> None:
        """Large letters: a page's line may wrap (the panel scrolls), so room for two lines
        a page."""
        for label in self._lists.values():
            label.setWordWrap(on)
            style.fix_lines(label, (SHOWN + 1) * (2 if on else 1))

    def reset(self, cfg: Config | None) -> None:
        """A new run: the socket buffer sets the bars' scale; preempt may be off."""
        self._cfg = cfg
        self._window = cfg["link.socket-buffer"] if cfg else 1
        self._preempt = bool(cfg and cfg["migration.postcopy-preempt"])
        # the buffer's size in the heading, so that a bar's text is short enough for a
        # 1280-pixel screen
        self._headers[1].setText(_grey(f"{HEADERS[1][0]} (of {style.size(self._window)})"))
        for bar in self._bars.values():
            bar.setValue(0)
            bar.setFormat("0 B")
        self._bars["preempt"].setEnabled(self._preempt)
        self._texts.clear()
        for key in self._lists:
            self._set(key, "")
        self._set("return", _grey("page requests travel here"))
        self._set_hint("")
        self._path.setText(urgent_path(cfg) if cfg else "")

    def update_from(self, snap: Snapshot) -> None:
        if self._cfg is None:
            return
        net = snap.boards.get("network", {})
        for key, bar in self._bars.items():
            queued = net.get(f"queued-{key}", 0.0)
            bar.setValue(min(BAR_STEPS, round(queued * BAR_STEPS / self._window)))
            bar.setFormat(style.size(queued))
        urgent = snap.urgent
        self._set("queue", _pages(urgent.queued, "none waiting"))
        background = [(page, age, "(background)") for page, age in urgent.background]
        self._set("main", _pages(urgent.main + background, "none"))
        off = "off (capability not set)"
        self._set("preempt", _pages(urgent.preempt, "none") if self._preempt else _grey(off))
        self._set("return", _pages(urgent.asking, "no request on its way"))
        self._set_hint(self._explain(net.get("queued-main", 0.0)))

    def _explain(self, queued_main: float) -> str:
        """What the main channel's backlog costs an urgent page, in words."""
        bandwidth = self._cfg["link.bandwidth"]
        wait = style.duration(queued_main / bandwidth)
        if self._preempt:
            return (f"With postcopy-preempt an urgent page skips the {style.size(queued_main)} "
                    f"queued on main (≈ {wait} of background pages): it goes on its own "
                    f"connection and only shares the link's bandwidth.")
        return (f"Vanilla postcopy: an urgent page sent now on main waits behind "
                f"{style.size(queued_main)} of background pages, ≈ {wait} at "
                f"{style.rate(bandwidth)}.")

    def _set(self, key: str, html: str) -> None:
        if self._texts.get(key) != html:  # relayout only when the words change
            self._texts[key] = html
            self._lists[key].setText(html)

    def _set_hint(self, text: str) -> None:
        if self._texts.get("hint") != text:
            self._texts["hint"] = text
            self._hint.setText(text)

    def text(self, key: str) -> str:
        """The page list shown for queue, main, preempt or return, or "path": the sentence
        about the design (for tests)."""
        return self._path.text() if key == "path" else self._lists[key].text()


def _pages(entries: list[tuple], empty: str) -> str:
    """Oldest first: (page, age) or (page, age, where). The column's heading says that the
    figure is an age: the line fits a 1280-pixel screen in presentation mode."""
    if not entries:
        return _grey(empty)
    oldest = sorted(entries, key=lambda e: -e[1])
    lines = [f"page {entry[0]} · <b>{style.duration(entry[1])}</b>"
             + (f" {entry[2]}" if len(entry) > 2 else "") for entry in oldest[:SHOWN]]
    if len(oldest) > SHOWN:
        lines.append(f"+ {len(oldest) - SHOWN} more")
    return "<br>".join(lines)


def _grey(text: str) -> str:
    return f"<span style='color:#777'>{text}</span>"


def _bar() -> QtWidgets.QProgressBar:
    bar = QtWidgets.QProgressBar()
    bar.setRange(0, BAR_STEPS)
    bar.setTextVisible(True)
    bar.setMinimumWidth(120)
    return bar
