"""QtCompareWindow: recorded runs side by side on one timeline (`postcopy-emu replay A B`),
or a live run next to recordings (`postcopy-emu gui --compare A`).

One column per run: its page bitmap and counters, its latency scatter and histogram, under a
title that says which run is the baseline and whether the run fell behind its schedule. Above
them the player (gui/_qt/transport.py, driving a gui.compare.ReplayGroup) and the difference
of each run against the baseline, in words, at the instant shown.
"""

from __future__ import annotations

from PySide6 import QtCore, QtWidgets

from gui._qt import style
from gui._qt.bitmap import QtPageBitmap
from gui._qt.counters import QtCounters
from gui._qt.latency import QtLatencyPlots
from gui._qt.transport import QtTransport
from gui._qt.window import TICK_MS, describe_run, mode_label
from gui.compare import ReplayGroup, fell_behind
from gui.record import Recording
from gui.replay import ReplaySession
from gui.session import FINAL

BEHIND = "#b03000"


def run_names(replays: list, files: list[str]) -> list[str]:
    """Each run by its mode; by file and mode when two share a mode."""
    modes = [mode_label(r.cfg) for r in replays]
    return [f"{file}: {mode}" if modes.count(mode) > 1 else mode
            for file, mode in zip(files, modes, strict=True)]


class QtRunColumn(QtWidgets.QWidget):
    """One run of the comparison."""

    pin_clicked = QtCore.Signal(int)

    def __init__(self, index: int, replay, name: str, file: str) -> None:
        """replay: a ReplaySession, or the live Session."""
        super().__init__()
        self.index, self.replay, self.name = index, replay, name
        self.title = QtWidgets.QLabel()
        self.title.setTextFormat(QtCore.Qt.TextFormat.RichText)
        self.title.setWordWrap(True)
        style.fix_lines(self.title, 2)  # the same height with or without the red line
        self.title.setToolTip(f"{file}: {describe_run(replay.cfg)}")
        self.pin = QtWidgets.QPushButton("Pin as baseline")
        self.pin.setCheckable(True)
        self.pin.setToolTip("Compare every other run with this one")
        self.pin.toggled.connect(lambda on: self.pin_clicked.emit(self.index if on else -1))
        self.bitmap, self.counters, self.latency = QtPageBitmap(), QtCounters(), QtLatencyPlots()
        head = QtWidgets.QHBoxLayout()
        head.addWidget(self.title, 1)
        head.addWidget(self.pin)
        # the bitmap across the column, the latency plots beside the counters: two runs fit
        # side by side in 1280 pixels
        bottom = QtWidgets.QHBoxLayout()
        bottom.addWidget(self.latency, 3)
        bottom.addWidget(self.counters, 1)
        column = QtWidgets.QVBoxLayout(self)
        column.setContentsMargins(0, 0, 0, 0)
        column.addLayout(head)
        column.addWidget(self.bitmap, 4)
        column.addLayout(bottom, 5)
        self.reset()

    def reset(self) -> None:
        cfg = self.replay.cfg
        self.bitmap.reset(cfg.npages, cfg.page_size, self.replay.describe,
                          preempt=cfg["migration.postcopy-preempt"])
        self.latency.reset(self.name)
        self.counters.reset()

    def update_from(self, snap) -> None:
        replay = self.replay
        self.bitmap.update_from(snap)
        self.latency.update_from(snap, replay.faults, replay.switchover)
        self.counters.update_from(snap, replay.cfg, replay.faults,
                                  replay.report if snap.phase in FINAL else None,
                                  replay.integrity)

    def show_role(self, baseline: bool, pinned: bool) -> None:
        role = " · <b>baseline</b>" if baseline else ""
        behind = (f"<br><span style='color:{BEHIND}'>fell behind its schedule: its latencies "
                  "include the emulator's own lag</span>" if fell_behind(self.replay) else "")
        text = f"<span style='font-size:15px'><b>{self.name}</b></span>{role}{behind}"
        if self.title.text() != text:
            self.title.setText(text)
        with QtCore.QSignalBlocker(self.pin):
            self.pin.setChecked(pinned)


class QtCompareWindow(QtWidgets.QMainWindow):
    def __init__(self, replays: list, files: list[str]) -> None:
        """replays: ReplaySessions, and at most one live Session (started by the caller,
        recording: once it has ended, its column shows the replay of its recording)."""
        super().__init__()
        self.setWindowTitle("postcopy-emu: " + " · ".join(files) + " side by side")
        names = [name if isinstance(r, ReplaySession) else f"{name} (live)"
                 for r, name in zip(replays, run_names(replays, files), strict=True)]
        self.group = ReplayGroup(replays, names)
        self.transport = QtTransport()
        self.transport.bind(self.group)
        self.transport.changed.connect(self.tick)
        self.difference = QtWidgets.QLabel()
        self.difference.setWordWrap(True)
        self.difference.setObjectName("title")
        style.fix_lines(self.difference, 2 * len(replays))
        self.columns = [QtRunColumn(i, r, name, file)
                        for i, (r, name, file) in enumerate(zip(replays, names, files,
                                                                strict=True))]
        for column in self.columns:
            column.pin_clicked.connect(self.pin)
        row = QtWidgets.QHBoxLayout()
        for column in self.columns:
            row.addWidget(column, 1)
        central = QtWidgets.QWidget()
        layout = QtWidgets.QVBoxLayout(central)
        layout.addWidget(self.transport)
        layout.addWidget(self.difference)
        layout.addLayout(row, 1)
        self.setCentralWidget(central)
        self._timer = QtCore.QTimer(self)
        self._timer.setInterval(TICK_MS)
        self._timer.timeout.connect(self.tick)
        self._timer.start()
        self.tick()

    def pin(self, index: int) -> None:
        """Pin run *index* as the baseline (-1: back to the first that kept up)."""
        self.group.pin(None if index < 0 else index)
        self.tick()

    def seek(self, t: float) -> None:
        self.group.seek(t)
        self.tick()

    def tick(self) -> None:
        for column in self.columns:
            if getattr(column.replay, "restart", False):  # moved back: start over
                column.reset()
        snaps = self.group.tick()
        for column, snap in zip(self.columns, snaps, strict=True):
            column.update_from(snap)
            self._replay_ended_live_run(column)
        self.transport.setEnabled(self.group.live is None)
        baseline = self.group.baseline
        for column in self.columns:
            column.show_role(column.index == baseline, column.index == self.group.pinned)
        self.transport.update_from(self.group)
        text = "<br>".join(self.group.differences())
        if self.difference.text() != text:
            self.difference.setText(text)

    def _replay_ended_live_run(self, column: QtRunColumn) -> None:
        """A live run that has ended and written its recording: replay it from now on, so
        that the player moves every run."""
        session = column.replay
        recorder = getattr(session, "recorder", None)
        if recorder is None or session.phase not in FINAL or recorder.written is None:
            return
        session.stop()
        replay = ReplaySession(Recording.open(recorder.written))
        self.group.replace(column.index, replay)
        column.replay = replay
        column.reset()
        column.update_from(replay.tick())

    def refresh(self) -> None:
        """Every panel up to date and painted (before a capture)."""
        style.Turn.everyone = True
        try:
            self.tick()
        finally:
            style.Turn.everyone = False
        for _ in range(2):
            QtWidgets.QApplication.processEvents()

    def closeEvent(self, event) -> None:  # noqa: N802 (Qt's name)
        self._timer.stop()
        for session in self.group.sessions:
            session.stop()  # a live run's processes and segments go
        event.accept()
