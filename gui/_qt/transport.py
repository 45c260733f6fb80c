"""QtTransport: the player of a recorded run (gui.replay.ReplaySession): a timeline to scrub,
with marks at switchover, pauses, recoveries and faults; play/pause, steps of one event, one
emulated millisecond or one frame either way, and the speed. Shown only for a replay.
"""

from __future__ import annotations

from PySide6 import QtCore, QtGui, QtWidgets

from gui.replay import SPEEDS, ReplaySession

# A mark's colour and letter: the letter keeps them apart for a reader who does not tell the
# colours apart.
MARK_STYLE = {"switchover": ((40, 40, 40), "S"), "pause": ((200, 30, 30), "P"),
              "recovery": ((20, 110, 200), "R"), "fault": ((150, 90, 0), "F")}
TRACK_H = 8
MARK_PICK_PX = 6
LETTER_W = 10  # pixels per mark letter  # how near the pointer must be to a mark for its tooltip


class QtTimeline(QtWidgets.QWidget):
    """Emulated time from the recording's first frame to its last; click or drag to seek."""

    seek = QtCore.Signal(float)

    def __init__(self, parent: QtWidgets.QWidget | None = None) -> None:
        super().__init__(parent)
        self.setMinimumHeight(34)
        self.setMouseTracking(True)
        self.setSizePolicy(QtWidgets.QSizePolicy.Policy.Expanding,
                           QtWidgets.QSizePolicy.Policy.Fixed)
        self._span = (0.0, 1.0)
        self._marks: list[dict] = []
        self._position = 0.0

    def set_recording(self, start: float, end: float, marks: list[dict]) -> None:
        self._span = (start, max(end, start + 1e-9))
        self._marks = marks
        self.update()

    @property
    def span(self) -> tuple[float, float]:
        return self._span

    @property
    def marks(self) -> list[dict]:
        return self._marks

    def set_position(self, t: float) -> None:
        if t != self._position:
            self._position = t
            self.update()

    def x_of(self, t: float) -> float:
        lo, hi = self._span
        return 8 + (self.width() - 16) * (t - lo) / (hi - lo)

    def t_of(self, x: float) -> float:
        lo, hi = self._span
        return lo + (hi - lo) * min(max((x - 8) / max(self.width() - 16, 1), 0.0), 1.0)

    def paintEvent(self, event: QtGui.QPaintEvent) -> None:  # noqa: N802 (Qt's name)
        p = QtGui.QPainter(self)
        p.setRenderHint(QtGui.QPainter.RenderHint.Antialiasing)
        mid = self.height() // 2 + 4
        left, right = self.x_of(self._span[0]), self.x_of(self._span[1])
        p.setPen(QtCore.Qt.PenStyle.NoPen)
        p.setBrush(QtGui.QColor(215, 215, 215))
        p.drawRoundedRect(QtCore.QRectF(left, mid - TRACK_H / 2, right - left, TRACK_H), 3, 3)
        now = self.x_of(self._position)
        p.setBrush(QtGui.QColor(120, 150, 190))
        p.drawRoundedRect(QtCore.QRectF(left, mid - TRACK_H / 2, now - left, TRACK_H), 3, 3)
        font = p.font()
        font.setPointSizeF(max(font.pointSizeF() * 0.8, 6))
        font.setBold(True)
        p.setFont(font)
        for x, group in self._mark_groups():
            for k, mark in enumerate(group):  # marks a few pixels apart: letters side by side
                rgb, letter = MARK_STYLE.get(mark["kind"], ((0, 0, 0), "?"))
                p.setPen(QtGui.QPen(QtGui.QColor(*rgb), 2))
                line_x = self.x_of(mark["t"])
                p.drawLine(QtCore.QPointF(line_x, mid - TRACK_H),
                           QtCore.QPointF(line_x, mid + TRACK_H))
                left_x = x + (k - (len(group) - 1) / 2) * LETTER_W
                p.drawText(QtCore.QRectF(left_x - LETTER_W / 2, 0, LETTER_W, mid - TRACK_H),
                           QtCore.Qt.AlignmentFlag.AlignCenter, letter)
        p.setPen(QtGui.QPen(QtGui.QColor(30, 30, 30), 1))
        p.setBrush(QtGui.QColor(255, 255, 255))
        p.drawEllipse(QtCore.QPointF(now, mid), 7, 7)
        p.end()

    def _mark_groups(self) -> list[tuple[float, list[dict]]]:
        """The marks, those closer than a letter's width to the one before grouped."""
        groups: list[tuple[float, list[dict]]] = []
        for mark in self._marks:
            x = self.x_of(mark["t"])
            if groups and x - self.x_of(groups[-1][1][-1]["t"]) < LETTER_W:
                groups[-1][1].append(mark)
            else:
                groups.append((x, [mark]))
        return groups

    def mousePressEvent(self, event: QtGui.QMouseEvent) -> None:  # noqa: N802
        self.seek.emit(self.t_of(event.position().x()))

    def mouseMoveEvent(self, event: QtGui.QMouseEvent) -> None:  # noqa: N802
        x = event.position().x()
        if event.buttons() & QtCore.Qt.MouseButton.LeftButton:
            self.seek.emit(self.t_of(x))
        self.setToolTip(self.tip_at(x))

    def tip_at(self, x: float) -> str:
        """The marks under the pointer, in words, with their emulated times."""
        near = [m for m in self._marks if abs(self.x_of(m["t"]) - x) <= MARK_PICK_PX]
        return "\n".join(f"{m['text']} at {m['t'] * 1e3:.1f} ms" for m in near)


class QtTransport(QtWidgets.QWidget):
    """The timeline and the player's buttons, driving one ReplaySession."""

    changed = QtCore.Signal()  # the position moved by hand: the window shows it at once

    def __init__(self, parent: QtWidgets.QWidget | None = None) -> None:
        super().__init__(parent)
        self.replay: ReplaySession | None = None
        self.timeline = QtTimeline()
        self.timeline.seek.connect(lambda t: self._do(lambda r: r.seek(t)))
        self.play = _button("Play")
        self.play.setToolTip("Play the recording from here at the chosen speed; again to pause")
        self.play.clicked.connect(self._play_clicked)
        self.buttons = {}
        for name, tip, act in (
                ("|<", "To the start", lambda r: r.seek(r.start_time)),
                ("< event", "Back to the previous event or mark", lambda r: r.step_event(-1)),
                ("< 1 ms", "One emulated millisecond back", lambda r: r.step_ms(-1)),
                ("< frame", "One frame back (the window drew 25 a second)",
                 lambda r: r.step_frame(-1)),
                ("frame >", "One frame forward", lambda r: r.step_frame(1)),
                ("1 ms >", "One emulated millisecond forward", lambda r: r.step_ms(1)),
                ("event >", "On to the next event or mark", lambda r: r.step_event(1)),
                (">|", "To the end", lambda r: r.seek(r.end_time))):
            button = _button(name)
            button.setToolTip(tip)
            button.clicked.connect(lambda _=False, a=act: self._do(a))
            self.buttons[name] = button
        self.speed = QtWidgets.QComboBox()
        self.speed.addItems([f"{s:g}x" for s in SPEEDS])
        self.speed.setCurrentIndex(SPEEDS.index(1.0))
        self.speed.setToolTip("Playing speed, times the run's own emulator.time-scale")
        self.speed.currentIndexChanged.connect(self._speed_chosen)
        self.where = QtWidgets.QLabel()
        self.where.setSizePolicy(QtWidgets.QSizePolicy.Policy.Ignored,
                                 QtWidgets.QSizePolicy.Policy.Preferred)
        self._layout()

    def _layout(self) -> None:
        row = QtWidgets.QHBoxLayout()
        row.setContentsMargins(0, 0, 0, 0)
        names = list(self.buttons)
        for name in names[:4]:
            row.addWidget(self.buttons[name])
        row.addWidget(self.play)
        for name in names[4:]:
            row.addWidget(self.buttons[name])
        row.addWidget(QtWidgets.QLabel("speed"))
        row.addWidget(self.speed)
        row.addWidget(self.where, 1)  # takes the rest: its text never resizes the row
        column = QtWidgets.QVBoxLayout(self)
        column.setContentsMargins(0, 0, 0, 0)
        column.setSpacing(2)
        column.addWidget(self.timeline)
        column.addLayout(row)

    def bind(self, replay: ReplaySession) -> None:
        """Drive *replay*: a ReplaySession, or a gui.compare.ReplayGroup (runs side by side)."""
        self.replay = replay
        self.timeline.set_recording(replay.start_time, replay.end_time, replay.marks)
        self.update_from(replay)

    def update_from(self, replay: ReplaySession) -> None:
        """After every tick: the span (it grows with a live run), the handle, the play
        button, where the player is."""
        span = (replay.start_time, replay.end_time)
        if span != self.timeline.span or len(replay.marks) != len(self.timeline.marks):
            self.timeline.set_recording(*span, replay.marks)
        self.timeline.set_position(replay.position)
        text = "Pause" if replay.playing else "Play"
        if self.play.text() != text:
            self.play.setText(text)
        where = replay.where()
        if self.where.text() != where:
            self.where.setText(where)

    def _do(self, action) -> None:
        if self.replay is not None:
            action(self.replay)
            self.changed.emit()

    def _play_clicked(self) -> None:
        self._do(lambda r: r.play(not r.playing))

    def _speed_chosen(self, index: int) -> None:
        if self.replay is not None:
            self.replay.speed = SPEEDS[index]


def _button(text: str) -> QtWidgets.QToolButton:
    """A button as wide as its text: push buttons are 75 pixels at least, and nine of them
    would not leave the player room in a 1280-pixel window."""
    button = QtWidgets.QToolButton()
    button.setText(text)
    button.setToolButtonStyle(QtCore.Qt.ToolButtonStyle.ToolButtonTextOnly)
    button.setMinimumWidth(button.fontMetrics().horizontalAdvance("Pause") + 16)
    return button
