"""QtMainWindow: the panels around one migration, and the timer that feeds them.

The engine runs in its own processes; the window only reads what they publish, from a QTimer,
and never waits on them. Each tick asks the Session for a Snapshot and hands it to every panel;
each panel redraws only what changed.
"""

from __future__ import annotations

from PySide6 import QtCore, QtGui, QtWidgets

from emu.config import Config, ConfigError, load_config
from emu.faults import from_config as scenario_faults
from emu.figures import faultcsv, timescale
from emu.migration.ram import TARGET_PAGE
from gui._qt import export, style
from gui._qt.bitmap import QtPageBitmap
from gui._qt.controls import QtControls
from gui._qt.counters import QtCounters
from gui._qt.latency import QtLatencyPlots
from gui._qt.queue import QtUrgentQueue
from gui._qt.transport import QtTransport
from gui.designs import WINDOW_TRACE
from gui.record import numbered
from gui.session import COMPLETED, FINAL, IDLE, RUNNING, STARTING, Session

TICK_MS = 40  # 25 Hz: smooth enough to watch, cheap enough for a 2-core machine
# (menu, text, shortcut, method): the menus, and the keys a lecturer presses with the window
# full screen. A step exists only for a session that can step (a replay): the arrow keys do
# nothing otherwise, and reach the focused widget instead.
ACTIONS = (
    ("&File", "Export faults as &CSV...", "Ctrl+E", "ask_export_csv"),
    ("&File", "Export &latency plot (PNG, SVG)...", "", "ask_export_scatter"),
    ("&File", "Export &histogram (PNG, SVG)...", "", "ask_export_histogram"),
    ("&File", "Export page &bitmap (PNG, SVG)...", "", "ask_export_bitmap"),
    ("&File", "Save &window as PNG...", "Ctrl+S", "ask_export_window"),
    ("&File", "&Quit", "Ctrl+Q", "close"),
    ("&Migration", "&Start migration", "Ctrl+Return", "press_start"),
    ("&Migration", "Start &postcopy now", "Ctrl+P", "press_postcopy"),
    ("&Migration", "Pause / &resume", "Space", "press_pause"),
    ("&Migration", "Step &back", "Left", "step_back"),
    ("&Migration", "Step &forward", "Right", "step_forward"),
    ("&Migration", "R&eset", "Ctrl+R", "press_reset"),
    ("&View", "&Presentation mode (large fonts, thick marks)", "F5", "set_presentation"),
    ("&View", "&Full screen", "F11", "set_full_screen"),
    ("&View", "&Settings panel", "F9", "set_settings_shown"),
    ("&Help", "&Keyboard shortcuts", "F1", "show_shortcuts"),
)
CHECKABLE = ("set_presentation", "set_full_screen", "set_settings_shown")
STEPS = ("step_back", "step_forward")
EXPORTS = {"scatter": "latency plot", "histogram": "histogram", "bitmap": "page bitmap"}
SAME_RUN_KEYS_IGNORED = ("emulator.time-scale",)  # changes a running migration in place
BANNER_LINES = 2  # the scenario, then the run's state
BANNER_LINES_PRESENTING = 3.6  # in body-text lines: the scenario wraps, in larger letters
BANNER_MIN_PX = 44  # the first line is in title-sized letters
# Heights of the pictures and of the figures under them, as shares (presentation mode: more
# room for the plots, whose letters grew); the splitter between them moves them by hand.
SPLIT = {False: [650, 350], True: [780, 220]}


def mode_label(cfg: Config) -> str:
    """The migration mode in a few words: "vanilla postcopy", "postcopy-preempt", ..."""
    if not cfg["migration.postcopy-ram"]:
        label = "precopy only"
    elif not cfg["migration.postcopy-preempt"]:
        label = "vanilla postcopy"
    else:
        label = "postcopy-preempt"
        if cfg["migration.design"] != "7.1":  # the default goes unsaid
            label += f" ({cfg['migration.design']})"
        if (cfg.page_size > TARGET_PAGE and cfg["migration.design"] == "7.1"
                and not cfg["migration.x-postcopy-preempt-break-huge"]):
            label += ", break-huge off"
    if cfg.page_size > TARGET_PAGE:
        label += f", {style.size(cfg.page_size)} pages"
    return label


def watchable(cfg: Config) -> Config:
    """The slider needs a number: a scenario's `auto` becomes the rule's choice, with the last
    calibration if it is fresh (the window never waits for one)."""
    return timescale.resolve(cfg, measure=False)[0]


def describe_run(cfg: Config) -> str:
    return (f"{mode_label(cfg)} · guest {style.size(cfg['guest.ram'])}, "
            f"{cfg['guest.vcpus']} vCPU, {cfg['workload.pattern']} workload · link "
            f"{style.rate(cfg['link.bandwidth'])}, RTT {style.duration(cfg['link.rtt'])}, "
            f"socket buffer {style.size(cfg['link.socket-buffer'])}")


class QtMainWindow(QtWidgets.QMainWindow):
    def __init__(self, cfg: Config, preset: str | None = None, record: str | None = None) -> None:
        """record: a file each run started here is recorded in (numbered after the first)."""
        super().__init__()
        self.setWindowTitle("postcopy-emu: watch a postcopy live migration")
        cfg = watchable(cfg)
        self._base = cfg  # the scenario the controls start from (file or preset, + --set)
        self._record = record
        self._recorded = 0  # runs recorded so far
        self.session = Session(cfg)
        self._last = None  # the last Snapshot
        self._banner_turn = style.Turn("banner")
        self._build()
        self._menus()
        self._connect()
        self.controls.show_config(cfg, preset)
        self._reset_views(cfg)
        self._timer = QtCore.QTimer(self)
        self._timer.setInterval(TICK_MS)
        self._timer.timeout.connect(self.tick)
        self._timer.start()
        self.tick()

    # ---- building ----

    def _build(self) -> None:
        """Controls on the left; on the right the banner, the bitmap and the latency plots,
        and under them the urgent queue, the counters and the event log."""
        self.controls = QtControls()
        self.transport = QtTransport()  # the player, shown for a replay only
        self.transport.hide()
        self.bitmap = QtPageBitmap()
        self.latency = QtLatencyPlots()
        self.queue = QtUrgentQueue()
        self.counters = QtCounters()
        self.events = QtWidgets.QPlainTextEdit(readOnly=True)
        self.events.setMaximumBlockCount(2000)
        self.banner = QtWidgets.QLabel()
        self.banner.setTextFormat(QtCore.Qt.TextFormat.RichText)
        self.banner.setWordWrap(True)  # a long scenario line wraps instead of being cut
        style.fix_lines(self.banner, BANNER_LINES)
        self._fit_banner(False)
        # Top the pictures, under them the figures: a splitter between the two, and panels
        # that scroll when short, so that the window fits a 1280 x 720 projector.
        split = QtWidgets.QSplitter(QtCore.Qt.Orientation.Vertical)
        split.setChildrenCollapsible(False)
        split.addWidget(_row((self.bitmap, 11), (self.latency, 9)))
        split.addWidget(_row((_ScrollColumn(self.queue), 11), (_ScrollColumn(self.counters), 6),
                             (_titled("Event log (emulated time)", self.events), 4)))
        split.setStretchFactor(0, 7)
        split.setStretchFactor(1, 3)
        self._split = split
        split.setSizes(SPLIT[False])
        main = QtWidgets.QWidget()
        column = QtWidgets.QVBoxLayout(main)
        column.setContentsMargins(4, 4, 4, 4)
        column.addWidget(self.banner)
        column.addWidget(self.transport)
        column.addWidget(split, 1)
        central = QtWidgets.QWidget()
        layout = QtWidgets.QHBoxLayout(central)
        layout.setContentsMargins(4, 4, 4, 4)
        self.settings = _ScrollColumn(self.controls, fixed=True)
        layout.addWidget(self.settings)
        layout.addWidget(main, 1)
        self.setCentralWidget(central)

    def _menus(self) -> None:
        """The menu bar (ACTIONS), and a corner button that lists the shortcuts."""
        menus: dict[str, QtWidgets.QMenu] = {}
        actions = self._actions = {}
        for menu, text, keys, method in ACTIONS:
            if menu not in menus:
                menus[menu] = self.menuBar().addMenu(menu)
            action = menus[menu].addAction(text)
            action.setShortcut(QtGui.QKeySequence(keys))
            action.setCheckable(method in CHECKABLE)
            signal = action.toggled if method in CHECKABLE else action.triggered
            signal.connect(getattr(self, method))
            actions[method] = action
        actions["set_settings_shown"].setChecked(True)
        keys = QtWidgets.QToolButton(text="Keyboard shortcuts")
        keys.setAutoRaise(True)
        keys.setToolTip(shortcuts_text())
        keys.clicked.connect(self.show_shortcuts)
        self.menuBar().setCornerWidget(keys)

    def _connect(self) -> None:
        c = self.controls
        c.start_clicked.connect(self.start_migration)
        c.postcopy_clicked.connect(self.start_postcopy)
        c.pause_toggled.connect(self.pause)
        c.reset_clicked.connect(self.reset)
        c.scale_changed.connect(self.set_scale)
        c.preset_chosen.connect(self.load_preset)
        c.settings_changed.connect(self._settings_changed)
        self.transport.changed.connect(self.tick)

    # ---- commands ----

    def config(self) -> Config | None:
        """The run the controls describe, or None (the reason goes to the note)."""
        try:
            cfg = self._base.with_overrides(self.controls.overrides())
            scenario_faults(cfg)  # a bad [[faults]] entry stops here, not in the run
            return cfg
        except ConfigError as err:
            self.controls.note.setText(str(err))
            return None

    def start_migration(self) -> None:
        cfg = self.config()
        if cfg is None:
            return
        self._retire()
        record = None
        if self._record is not None:
            self._recorded += 1
            record = numbered(self._record, self._recorded)
        # the design's decisions in the event log, a few lines per 100 ms at most
        self.session = Session(cfg, record=record, trace=WINDOW_TRACE)
        self._reset_views(cfg)
        self.session.start()
        if record is not None:
            self.events.appendPlainText(f"recording this run in {record}")
        self._settings_changed()
        self.tick()

    def start_postcopy(self) -> None:
        self.session.start_postcopy()

    def pause(self, paused: bool) -> None:
        self.session.pause(paused)

    def set_scale(self, scale: float) -> None:
        self.session.set_scale(scale)

    def reset(self) -> None:
        """Stop the migration, end its processes, and show an empty guest again."""
        self._retire()
        self.session = Session(self.config() or self.session.cfg)
        self._reset_views(self.session.cfg)
        self._settings_changed()
        self.tick()

    def load_preset(self, name: str) -> None:
        try:
            self._base = watchable(load_config(name))
        except ConfigError as err:
            self.controls.note.setText(str(err))
            return
        self.controls.show_config(self._base, name)
        self.set_scale(self.controls.time_scale())  # the slider shows the preset's scale
        if self.session.phase == IDLE:
            self.reset()  # an idle window shows the guest it would migrate

    def show_session(self, session, follow: bool = True) -> None:
        """Show *session* from now on: one that makes its migration up, without processes
        (gui.synthetic), for the panel tests and the benchmark. follow=False stops the timer:
        the caller calls tick() itself."""
        self._retire()
        self.session = session
        self._reset_views(session.cfg)
        if not follow:
            self._timer.stop()
        self.tick()

    def show_replay(self, replay, name: str) -> None:
        """Show a recorded run (gui.replay.ReplaySession) with the player above the panels;
        the controls show the recorded settings and stay disabled: nothing runs."""
        self.setWindowTitle(f"postcopy-emu: replay of {name}")
        self.controls.show_config(replay.cfg)
        self.controls.setEnabled(False)
        self.controls.note.setText(f"Replay of {name}: the settings it was recorded with.")
        self.transport.bind(replay)
        self.transport.show()
        self.show_session(replay)

    def select_telling_page(self) -> int | None:
        """Pin the page with the most to tell: the one a vCPU has waited for longest, else
        the last one a vCPU waited for. Used before a screenshot."""
        snap = self._last
        urgent = snap.urgent.queued + snap.urgent.in_flight if snap else []
        records = self.session.faults.records
        page = None
        if urgent:
            page = max(urgent, key=lambda entry: entry[1])[0]
        elif snap is not None and len(snap.waiting):
            page = int(snap.waiting[0])
        elif len(records):
            page = int(records["page"][-1])
        self.bitmap.select(page)
        return page

    def urgent_pages(self) -> int:
        """How many requests the source holds or serves on the link, as of the last tick
        (not counting pages that were already on their way in the background stream)."""
        if self._last is None:
            return 0
        urgent = self._last.urgent
        return len(urgent.queued) + len(urgent.main) + len(urgent.preempt)

    def _retire(self) -> None:
        """End the current session; a completed run stays as the grey overlay, unless its
        figures were distorted (the emulator fell behind): the comparison keeps the last
        faithful one."""
        old = self.session
        old.stop()
        if old.phase == COMPLETED and old.distorted is None:
            self.latency.set_previous(mode_label(old.cfg), old.faults,
                                      (old.report or {}).get("progress"))

    def _reset_views(self, cfg: Config) -> None:
        self.bitmap.reset(cfg.npages, cfg.page_size, self.session.describe,
                          preempt=cfg["migration.postcopy-preempt"])
        for name in STEPS:  # the arrow keys only for a session that can step
            self._actions[name].setEnabled(callable(getattr(self.session, "step", None)))
        self.latency.reset(mode_label(cfg))
        self.queue.reset(cfg)
        self.counters.reset()
        self.events.clear()
        self.latency.set_warning(None)
        self._fidelity_logged = False

    # ---- keys, presentation, full screen ----

    def press_start(self) -> None:
        self._press(self.controls.start)

    def press_postcopy(self) -> None:
        self._press(self.controls.postcopy)

    def press_pause(self) -> None:
        """Space: the Pause button, so that it shows Pause or Resume as a click would."""
        self._press(self.controls.pause)

    def press_reset(self) -> None:
        self._press(self.controls.reset)

    @staticmethod
    def _press(button: QtWidgets.QAbstractButton) -> None:
        if button.isEnabled():
            button.click()

    def step_back(self) -> None:
        self._step(-1)

    def step_forward(self) -> None:
        self._step(1)

    def _step(self, direction: int) -> None:
        """One step back or forward, for a session that has steps (session.step)."""
        step = getattr(self.session, "step", None)
        if callable(step):
            step(direction)
            self.tick()

    def set_full_screen(self, on: bool) -> None:
        if on:
            self.showFullScreen()
        else:
            self.showNormal()
        _quietly(self._actions["set_full_screen"], on)

    def set_settings_shown(self, on: bool) -> None:
        self.settings.setVisible(on)
        _quietly(self._actions["set_settings_shown"], on)

    def set_presentation(self, on: bool) -> None:
        """Presentation mode: fonts PRESENTATION_SCALE times larger, thicker marks and
        lines, and the settings out of the way (F9 brings them back; the Migration menu and
        its keys drive the run meanwhile)."""
        if on == (style.scale != 1.0):
            return
        app = QtWidgets.QApplication.instance()
        if on:
            style.BASE_POINT_SIZE = app.font().pointSizeF()  # to go back to
        style.scale = style.PRESENTATION_SCALE if on else 1.0
        font = app.font()
        font.setPointSizeF(style.BASE_POINT_SIZE * style.scale)
        app.setFont(font)
        app.setStyleSheet(style.style_sheet())
        style.refit_lines()
        self._fit_banner(on)
        self._split.setSizes(SPLIT[on])
        self.bitmap.set_presentation(on)
        self.latency.set_presentation(on)
        self.queue.set_presentation(on)
        self.set_settings_shown(not on)
        _quietly(self._actions["set_presentation"], on)
        if self._last is not None:
            self._show_banner(self._last)

    def _fit_banner(self, on: bool) -> None:
        """Room for the banner's title-sized first line, and in presentation mode for that
        line wrapping (the scenario is longer than 1280 pixels at 1.5 times the letters)."""
        lines = BANNER_LINES_PRESENTING if on else BANNER_LINES
        height = round(self.banner.fontMetrics().lineSpacing() * lines + 4)
        self.banner.setFixedHeight(max(BANNER_MIN_PX, height))

    @property
    def presenting(self) -> bool:
        return style.scale != 1.0

    def show_shortcuts(self) -> None:
        box = QtWidgets.QMessageBox(QtWidgets.QMessageBox.Icon.Information, "Keyboard shortcuts",
                                    shortcuts_text(), parent=self)
        box.open()  # not modal: the run goes on behind it

    # ---- export ----

    def export_csv(self, path: str) -> int:
        """The current run's faults as CSV (emu.figures.faultcsv); returns how many."""
        snap = self._last
        pages = None
        if snap is not None and snap.dst is not None:
            pages = (snap.dst, snap.src, snap.arrival)
        return faultcsv.write(path, self.session.faults.records, self.session.cfg.page_size,
                              pages)

    def export_picture(self, what: str, path: str) -> None:
        """One panel's picture, PNG or SVG by the suffix: scatter, histogram or bitmap."""
        self.refresh()
        item = {"scatter": self.latency.scatter.getPlotItem(),
                "histogram": self.latency.histogram.getPlotItem(),
                "bitmap": self.bitmap.view_box}[what]
        export.save_item(item, path)

    def export_window(self, path: str) -> None:
        self.refresh()
        export.save_widget(self, path)

    def ask_export_csv(self) -> None:
        path = self._ask_path("Export faults as CSV", "faults.csv", "CSV (*.csv)")
        if path:
            self._exported(path, lambda: f"{self.export_csv(path):,} faults")

    def ask_export_scatter(self) -> None:
        self._ask_picture("scatter")

    def ask_export_histogram(self) -> None:
        self._ask_picture("histogram")

    def ask_export_bitmap(self) -> None:
        self._ask_picture("bitmap")

    def ask_export_window(self) -> None:
        path = self._ask_path("Save the window", "window.png", "PNG (*.png)")
        if path:
            self._exported(path, lambda: self.export_window(path) or "the window")

    def _ask_picture(self, what: str) -> None:
        name = EXPORTS[what]
        path = self._ask_path(f"Export the {name}", what + ".png", "PNG (*.png);;SVG (*.svg)")
        if path:
            self._exported(path, lambda: self.export_picture(what, path) or f"the {name}")

    def _ask_path(self, title: str, name: str, filters: str) -> str:
        path, chosen = QtWidgets.QFileDialog.getSaveFileName(self, title, name, filters)
        if path and not path.lower().endswith(export.FORMATS + (".csv",)):
            path += "." + chosen.split("*.")[-1].rstrip(")")  # the filter's suffix
        return path

    def _exported(self, path: str, write) -> None:
        """Write, and say in the event log what went where (or why not)."""
        try:
            what = write()
        except (OSError, ValueError) as err:
            self.events.appendPlainText(f"export failed: {err}")
            return
        self.events.appendPlainText(f"exported {what} to {path}")

    def closeEvent(self, event: QtGui.QCloseEvent) -> None:  # noqa: N802 (Qt's name)
        self.set_presentation(False)  # the application's fonts as they were
        self._timer.stop()
        self.session.stop()  # every process ends, every shared-memory segment goes
        event.accept()

    # ---- the timer ----

    def refresh(self) -> None:
        """One frame that brings every panel up to date, then paints it (before a capture:
        the panels that refresh a few times a second may be a few frames behind)."""
        style.Turn.everyone = True
        try:
            self.tick()
        finally:
            style.Turn.everyone = False
        for _ in range(2):  # plots paint on the event loop's next pass
            QtWidgets.QApplication.processEvents()

    def tick(self) -> None:
        """One frame: read the session, update every panel."""
        session = self.session
        if getattr(session, "restart", False):  # a replay moved back: start the panels over
            self._reset_views(session.cfg)
        snap = session.tick()
        self._last = snap
        if self.transport.replay is session:
            self.transport.update_from(session)
        self.bitmap.update_from(snap)
        self.latency.update_from(snap, session.faults, session.switchover)
        self.queue.update_from(snap)
        self.counters.update_from(snap, session.cfg, session.faults,
                                  session.report if snap.phase in FINAL else None,
                                  session.integrity)
        for line in snap.events:
            self.events.appendPlainText(line)
        self._show_fidelity(session, snap)
        self.controls.set_state(startable=snap.phase not in (STARTING, RUNNING),
                                running=snap.phase == RUNNING,
                                can_postcopy=session.can_start_postcopy)
        if self._banner_turn.due() or snap.phase != RUNNING:
            self._show_banner(snap)

    def _show_banner(self, snap) -> None:
        cfg = self.session.cfg
        if snap.phase == IDLE:
            state = "ready: press <b>Start migration</b>"
        elif snap.phase == STARTING:
            state = "starting the source, destination and network processes"
        else:
            paused = " · <b>paused</b>" if self.session.paused else ""
            state = (f"source <b>{snap.status['source']}</b>, destination "
                     f"<b>{snap.status['destination']}</b> at {snap.now:.3f} s emulated "
                     f"(time-scale {self.session.scale:g}){paused}")
            if snap.phase in FINAL:
                state = f"run <b>{snap.phase}</b>{_marked(self.session)}: " + state
        text = (f"<span style='font-size:{style.px(15)}px'><b>{describe_run(cfg)}</b></span>"
                f"<br>{state}")
        if self.banner.text() != text:
            self.banner.setText(text)

    def _show_fidelity(self, session, snap) -> None:
        """Beside the figures: distorted now (while running) or at its worst (once ended),
        and the speed that is faithful; the event log says it once when the run ends."""
        shown = session.distorted if snap.phase in FINAL else session.fidelity.now
        self.latency.set_warning(shown.text() if shown else None)
        if snap.phase in FINAL and shown and not self._fidelity_logged:
            self._fidelity_logged = True
            self.events.appendPlainText(f"{shown.text()}; not kept as the grey comparison")

    def _settings_changed(self) -> None:
        """Say so when the settings shown are not the ones of the run on screen."""
        cfg = self.config()
        if cfg is None:
            return
        if self.session.phase == IDLE:
            self.controls.note.setText("")
            return
        differs = [k for k in cfg if k not in SAME_RUN_KEYS_IGNORED
                   and cfg[k] != self.session.cfg[k]]
        self.controls.note.setText(
            "Changed settings apply to the next run: press Start migration." if differs else "")


def _marked(session) -> str:
    """The status line's word on a distorted run: it did complete, but not faithfully."""
    if session.distorted is None:
        return ""
    return " · <b style='color:#b00000'>figures distorted</b> (the emulator fell behind)"


def _titled(title: str, widget: QtWidgets.QWidget) -> QtWidgets.QWidget:
    box = QtWidgets.QWidget()
    layout = QtWidgets.QVBoxLayout(box)
    layout.setContentsMargins(0, 0, 0, 0)
    label = QtWidgets.QLabel(title)
    label.setObjectName("title")
    layout.addWidget(label)
    layout.addWidget(widget)
    return box


class _ScrollColumn(QtWidgets.QScrollArea):
    """A panel that scrolls up and down when the window is short, never sideways: as wide as
    its content needs (at the font in force), as short as a few lines. fixed: no wider
    either (the settings column)."""

    SHORTEST = 80

    def __init__(self, widget: QtWidgets.QWidget, fixed: bool = False) -> None:
        super().__init__()
        self.setWidget(widget)
        self.setWidgetResizable(True)
        self.setHorizontalScrollBarPolicy(QtCore.Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.setFrameShape(QtWidgets.QFrame.Shape.NoFrame)
        if fixed:
            self.setSizePolicy(QtWidgets.QSizePolicy.Policy.Fixed,
                               QtWidgets.QSizePolicy.Policy.Preferred)
        self._fixed = fixed

    def _width(self) -> int:
        content = self.widget()
        need = content.sizeHint() if self._fixed else content.minimumSizeHint()
        return need.width() + self.verticalScrollBar().sizeHint().width() + 2

    def minimumSizeHint(self) -> QtCore.QSize:  # noqa: N802 (Qt's name)
        return QtCore.QSize(self._width(), self.SHORTEST)

    def sizeHint(self) -> QtCore.QSize:  # noqa: N802 (Qt's name)
        return QtCore.QSize(self._width(), self.widget().sizeHint().height())


def _quietly(action: QtGui.QAction, checked: bool) -> None:
    """Tick a menu entry without triggering it again."""
    with QtCore.QSignalBlocker(action):
        action.setChecked(checked)


def shortcuts_text() -> str:
    """The shortcuts, one a line, for the tooltip and Help > Keyboard shortcuts."""
    return "\n".join(f"{QtGui.QKeySequence(keys).toString(QtGui.QKeySequence.NativeText):<12}"
                     f"{text.replace('&', '').removesuffix('...')}"
                     for _, text, keys, _ in ACTIONS if keys)


def _row(*widgets: tuple[QtWidgets.QWidget, int]) -> QtWidgets.QWidget:
    row = QtWidgets.QWidget()
    layout = QtWidgets.QHBoxLayout(row)
    layout.setContentsMargins(0, 0, 0, 0)
    layout.setSpacing(14)
    for widget, stretch in widgets:
        layout.addWidget(widget, stretch)
    return row
