"""QtControls: scenario presets, the settings a run starts with, the time scale, and the
buttons that drive the migration (start, start postcopy now, pause, reset).

Settings are shown as their configuration keys would be written (emu.config.KEYS) and handed
back as `section.key=value` overrides; the engine's own checks judge them. Only the time scale
reaches a running migration; the rest says that it waits for the next run.
"""

from __future__ import annotations

from PySide6 import QtCore, QtWidgets

from emu.config import BREAK_HUGE, KEYS, Config, Key, scenario_names
from gui.designs import multifd_refused, removed
from gui.labels import SLIDER_END, scale_to_slider, slider_to_scale

DESIGN = "migration.design"
PREEMPT = "migration.postcopy-preempt"
MULTIFD, MULTIFD_CHANNELS = "migration.multifd", "migration.multifd-channels"
# The what-if of several preempt channels (issue 13 item 4) is another change's key: its spin
# box appears in the migration parameters once emu/config.py has the key.
PREEMPT_CHANNELS = "migration.x-preempt-channels"
# A check box and, in its row, the number it switches on (a spin box with this suffix).
PAIRED = {MULTIFD: (MULTIFD_CHANNELS, " channels")}

# (key, label, suggestions for the editable ones, or for check boxes what they do); bools
# become check boxes, keys with a fixed choice of values plain combo boxes, and integers spin
# boxes. A key this engine does not have is left out.
GROUPS = (
    ("Capabilities", (
        (DESIGN, "QEMU design", ()),
        (PREEMPT, "postcopy-preempt", "urgent pages on their own channel"),
        (BREAK_HUGE, "break-huge", "pause a huge page for an urgent one"),
        (MULTIFD, "multifd", ()),
    )),
    ("Migration parameters", (
        # ---- the what-if of several preempt channels: a spin box once the key exists ----
        (PREEMPT_CHANNELS, "preempt channels", ()),
        ("migration.switchover-after", "switchover after", ("100ms", "200ms", "500ms", "1s")),
        ("migration.max-postcopy-bandwidth", "background cap", ("0", "50MiB/s", "100MiB/s")),
    )),
    ("Link", (
        ("link.bandwidth", "bandwidth", ("100Mbit/s", "1Gbit/s", "10Gbit/s", "25Gbit/s")),
        ("link.rtt", "round-trip time", ("50us", "200us", "1ms", "10ms")),
        ("link.socket-buffer", "socket buffer", ("256KiB", "1MiB", "4MiB", "16MiB")),
    )),
    ("Guest", (
        ("guest.ram", "RAM", ("16MiB", "64MiB", "128MiB", "256MiB", "1GiB", "4GiB")),
        ("guest.page-size", "page size", ()),
        ("guest.vcpus", "vCPUs", ()),
        ("workload.pattern", "workload", ()),
    )),
)


class QtControls(QtWidgets.QWidget):
    preset_chosen = QtCore.Signal(str)
    settings_changed = QtCore.Signal()
    scale_changed = QtCore.Signal(float)
    start_clicked = QtCore.Signal()
    postcopy_clicked = QtCore.Signal()
    pause_toggled = QtCore.Signal(bool)
    reset_clicked = QtCore.Signal()

    def __init__(self, parent: QtWidgets.QWidget | None = None) -> None:
        super().__init__(parent)
        self._editors: dict[str, QtWidgets.QWidget] = {}
        layout = QtWidgets.QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        self.preset = QtWidgets.QComboBox()
        self.preset.addItems(scenario_names())
        self.preset.textActivated.connect(self.preset_chosen)
        layout.addWidget(_group("Scenario preset", [self.preset]))
        for title, fields in GROUPS:
            layout.addWidget(self._settings_group(title, fields))
        layout.addWidget(self._time_group())
        layout.addWidget(self._buttons())
        self.note = QtWidgets.QLabel()
        self.note.setObjectName("note")
        self.note.setWordWrap(True)
        layout.addWidget(self.note)
        layout.addStretch(1)
        self._postcopy = True  # the scenario's postcopy-ram (not a control): multifd's check
        for key, changed in ((PREEMPT, "toggled"), (MULTIFD, "toggled"),
                             (DESIGN, "currentTextChanged")):
            getattr(self._editors[key], changed).connect(self._allow)

    # ---- building ----

    def _settings_group(self, title: str, fields) -> QtWidgets.QGroupBox:
        box = QtWidgets.QGroupBox(title)
        form = QtWidgets.QFormLayout(box)
        form.setContentsMargins(6, 4, 6, 4)
        form.setVerticalSpacing(3)
        for key, label, extra in fields:
            if key not in KEYS:
                continue
            editor = self._editor(key, extra, label)
            self._editors[key] = editor
            if key in PAIRED:
                number, suffix = PAIRED[key]
                self._editors[number] = spin = self._editor(number, (), number)
                spin.setSuffix(suffix)
                form.addRow(editor, spin)
            elif isinstance(editor, QtWidgets.QCheckBox):
                hint = QtWidgets.QLabel(f"<span style='color:#666'>{extra}</span>")
                hint.setWordWrap(True)
                form.addRow(editor, hint)
            else:
                form.addRow(label, editor)
        return box

    def _editor(self, key: str, extra: tuple[str, ...] | str, label: str) -> QtWidgets.QWidget:
        """The editor of one key; *extra* is what a combo box suggests (a check box's hint
        is shown beside it instead)."""
        spec = KEYS[key]
        if spec.kind == "bool":
            editor = QtWidgets.QCheckBox(label)
            editor.toggled.connect(self.settings_changed)
        elif spec.kind == "int":
            editor = QtWidgets.QSpinBox()
            editor.setRange(spec.low, spec.high)
            editor.valueChanged.connect(self.settings_changed)
        else:
            editor = QtWidgets.QComboBox()
            editor.setEditable(not spec.choices)
            editor.addItems([spec.show(c) for c in spec.choices] or list(extra))
            editor.currentTextChanged.connect(lambda text, k=key: self._check(k, text))
        _mark(editor, key, None)
        return editor

    def _time_group(self) -> QtWidgets.QGroupBox:
        self.scale = QtWidgets.QSlider(QtCore.Qt.Orientation.Horizontal)
        self.scale.setRange(0, SLIDER_END)
        self.scale.setToolTip("emulator.time-scale: emulated seconds per real second; "
                              "changes a running migration at once")
        self.scale_label = QtWidgets.QLabel()
        self.scale.valueChanged.connect(self._scale_moved)
        return _group("Time scale (works while running)", [self.scale, self.scale_label])

    def _buttons(self) -> QtWidgets.QWidget:
        self.start = QtWidgets.QPushButton("Start migration")
        self.postcopy = QtWidgets.QPushButton("Start postcopy now")
        self.postcopy.setToolTip("migrate-start-postcopy: switch over before "
                                 "migration.switchover-after")
        self.pause = QtWidgets.QPushButton("Pause")
        self.pause.setCheckable(True)
        self.pause.setToolTip("Freeze emulated time (time scale 0); press again to resume")
        self.reset = QtWidgets.QPushButton("Reset")
        self.reset.setToolTip("Stop the migration, end its processes, clear the view")
        self.start.clicked.connect(self.start_clicked)
        self.postcopy.clicked.connect(self.postcopy_clicked)
        self.pause.toggled.connect(self._pause_toggled)
        self.reset.clicked.connect(self.reset_clicked)
        box = QtWidgets.QWidget()
        grid = QtWidgets.QGridLayout(box)
        grid.setContentsMargins(0, 0, 0, 0)
        for i, button in enumerate((self.start, self.postcopy, self.pause, self.reset)):
            grid.addWidget(button, i // 2, i % 2)
        return box

    # ---- settings in and out ----

    def show_config(self, cfg: Config, preset: str | None = None) -> None:
        """Show cfg's values (a preset was chosen, or the window opened)."""
        if preset is not None:
            if self.preset.findText(preset) < 0:  # a scenario file of the user's own
                self.preset.addItem(preset)
            self.preset.setCurrentText(preset)
        for key, editor in self._editors.items():
            with QtCore.QSignalBlocker(editor):
                _set_editor(editor, KEYS[key], cfg[key])
            _mark(editor, key, None)
        self._postcopy = cfg["migration.postcopy-ram"]
        self._allow()
        with QtCore.QSignalBlocker(self.scale):
            self.scale.setValue(scale_to_slider(cfg["emulator.time-scale"]))
        self._show_scale(cfg["emulator.time-scale"])
        self.settings_changed.emit()

    def overrides(self) -> list[str]:
        """Every setting as section.key=value, for Config.with_overrides; not a property the
        chosen design has removed (QEMU 8.0 refuses break-huge)."""
        design = self._editors[DESIGN].currentText()
        sets = [f"{key}={_editor_text(editor)}" for key, editor in self._editors.items()
                if removed(key, design) is None]
        return sets + [f"emulator.time-scale={self.time_scale()}"]

    def time_scale(self) -> float:
        return slider_to_scale(self.scale.value())

    def set_value(self, key: str, value: object) -> None:
        """Change one setting as a person would (for tests and scripts)."""
        _set_editor(self._editors[key], KEYS[key], value)

    def set_state(self, startable: bool, running: bool, can_postcopy: bool) -> None:
        self.start.setEnabled(startable)
        self.postcopy.setEnabled(can_postcopy)
        self.pause.setEnabled(running)
        if not running and self.pause.isChecked():
            with QtCore.QSignalBlocker(self.pause):
                self.pause.setChecked(False)
                self.pause.setText("Pause")

    # ---- reactions ----

    def _check(self, key: str, text: str) -> None:
        try:
            KEYS[key].parse(text)
            _mark(self._editors[key], key, None)
        except ValueError as err:
            _mark(self._editors[key], key, str(err))
        self.settings_changed.emit()

    def _allow(self, *_) -> None:
        """Switch off the controls the chosen combination has no use for or would refuse,
        saying why in their tooltips."""
        design = self._editors[DESIGN].currentText()
        preempt = self._editors[PREEMPT].isChecked()
        gone = removed(BREAK_HUGE, design)
        # break-huge only means something with a preempt channel, and only to QEMU 7.1
        self._offer(BREAK_HUGE, preempt and gone is None, gone)
        if PREEMPT_CHANNELS in self._editors:
            self._offer(PREEMPT_CHANNELS, preempt, None if preempt else "needs postcopy-preempt")
        refused = multifd_refused(design, self._postcopy)
        multifd = self._editors[MULTIFD]
        if refused and multifd.isChecked():
            multifd.setChecked(False)  # the engine would refuse the run: say why instead
        self._offer(MULTIFD, refused is None, refused)
        off = refused or (None if multifd.isChecked() else "multifd is off")
        self._offer(MULTIFD_CHANNELS, off is None, off)

    def _offer(self, key: str, enabled: bool, why: str | None) -> None:
        """Enable *key*'s editor, or disable it with *why* in its tooltip."""
        editor = self._editors[key]
        editor.setEnabled(enabled)
        editor.setToolTip(f"{key}: {why}" if why and not enabled else f"{key}: {KEYS[key].help}")

    def _scale_moved(self, position: int) -> None:
        scale = slider_to_scale(position)
        self._show_scale(scale)
        self.scale_changed.emit(scale)

    def _show_scale(self, scale: float) -> None:
        self.scale_label.setText(f"{scale:g}× : 1 real second = "
                                 f"{_seconds(scale)} emulated")

    def _pause_toggled(self, paused: bool) -> None:
        self.pause.setText("Resume" if paused else "Pause")
        self.pause_toggled.emit(paused)


def _group(title: str, widgets: list[QtWidgets.QWidget]) -> QtWidgets.QGroupBox:
    box = QtWidgets.QGroupBox(title)
    layout = QtWidgets.QVBoxLayout(box)
    layout.setContentsMargins(6, 4, 6, 4)
    for widget in widgets:
        layout.addWidget(widget)
    return box


def _set_editor(editor: QtWidgets.QWidget, spec: Key, value: object) -> None:
    if isinstance(editor, QtWidgets.QCheckBox):
        editor.setChecked(bool(value))
    elif isinstance(editor, QtWidgets.QSpinBox):
        editor.setValue(int(value))
    else:
        editor.setCurrentText(value if isinstance(value, str) else spec.show(value))


def _editor_text(editor: QtWidgets.QWidget) -> str:
    if isinstance(editor, QtWidgets.QCheckBox):
        return "true" if editor.isChecked() else "false"
    if isinstance(editor, QtWidgets.QSpinBox):
        return str(editor.value())
    return editor.currentText()


def _mark(editor: QtWidgets.QWidget, key: str, error: str | None) -> None:
    """The key and its help in the tooltip; a red frame and the reason for a value the engine
    would refuse."""
    editor.setStyleSheet("QComboBox { border: 2px solid #d00000; }" if error else "")
    editor.setToolTip(f"{key}: {error or KEYS[key].help}")


def _seconds(scale: float) -> str:
    return f"{scale:g} s" if scale >= 1 else f"{scale * 1e3:g} ms"
