"""`postcopy-emu gui`: the QApplication, the window, and the headless screenshot mode."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from PySide6 import QtCore, QtWidgets

from emu.config import SCENARIO_DIR, Config, ConfigError, load_config, scenario_names
from gui import display
from gui._qt.qtfix import guard_singletons
from gui._qt.style import style_sheet
from gui._qt.window import QtMainWindow

# The window opens on this preset when no scenario is given: slow enough to watch.
WINDOW_PRESET = "classroom"
WINDOW_SIZE = (1600, 1000)  # at most, and a screenshot's unless --size says otherwise
SCREEN_SHARE = 0.95  # of the screen's free area a window opens on
CATCH_S = 1.0  # real seconds a screenshot may wait for a request to be on its way


def main(cfg: Config, args) -> int:
    """Open the window on *cfg* (args: the `gui` command's scenario, set, screenshot,
    run_for); returns the exit code."""
    try:
        cfg, preset = _scenario(cfg, args)
    except ConfigError as err:
        print(f"postcopy-emu: {err}", file=sys.stderr)
        return 2
    problem = display.choose_platform(bool(args.screenshot))  # before the QApplication
    if problem:
        print(f"postcopy-emu: {problem}", file=sys.stderr)
        return 2
    app = application()
    display.release()
    if getattr(args, "compare", None):
        return compare_live(app, cfg, args)
    window = QtMainWindow(cfg, preset, getattr(args, "record", None))
    if args.presentation:
        window.set_presentation(True)
    window.resize(*(args.size or (WINDOW_SIZE if args.screenshot else fitting(window))))
    window.show()
    # Ctrl-C in the terminal closes the window (and so stops the run) instead of being
    # swallowed by Qt's event loop; the window's timer gives Python a chance to see it.
    signal.signal(signal.SIGINT, lambda *_: window.close())
    if args.screenshot:
        return screenshot(app, window, args.screenshot, args.run_for)
    return app.exec()


def replay_main(recordings, at: float | None, path: str | None) -> int:
    """`postcopy-emu replay FILE...`: the window on one recording, or on several side by
    side, at emulated time *at* (None: the end); with *path*, a PNG of that instant instead."""
    from gui._qt.compare import QtCompareWindow
    from gui.replay import ReplaySession

    problem = display.choose_platform(bool(path))
    if problem:
        print(f"postcopy-emu: {problem}", file=sys.stderr)
        return 2
    app = application()
    display.release()
    replays = [ReplaySession(recording) for recording in recordings]
    start = min(r.start_time for r in replays)
    end = max(r.end_time for r in replays)
    if at is not None and not start <= at <= end:
        print(f"postcopy-emu: --at {at:g}s is outside the recording "
              f"({start:.3f} s to {end:.3f} s): showing the nearest frame", file=sys.stderr)
    at = end if at is None else at
    if len(replays) == 1:
        window = QtMainWindow(recordings[0].cfg)
        window.show_replay(replays[0], recordings[0].path.name)
        replays[0].seek(at)
    else:
        window = QtCompareWindow(replays, [r.path.name for r in recordings])
        window.seek(at)
    window.resize(*WINDOW_SIZE)
    window.show()
    signal.signal(signal.SIGINT, lambda *_: window.close())
    if path:
        return capture(window, path)
    return app.exec()


def compare_live(app: QtWidgets.QApplication, cfg: Config, args) -> int:
    """`gui --compare A.pcr ...`: the migration of *cfg* starts at once next to the
    recordings; it records in --record FILE, or in a temporary file removed afterwards."""
    import shutil
    import tempfile

    from gui._qt.compare import QtCompareWindow
    from gui.replay import ReplaySession
    from gui.session import Session

    tmpdir = None if args.record else tempfile.mkdtemp(prefix="postcopy-emu-live-")
    path = args.record or os.path.join(tmpdir, "live.pcr")
    live = Session(cfg, record=path)
    replays = [ReplaySession(recording) for recording in args.compare]
    try:
        live.start()
        window = QtCompareWindow([live, *replays],
                                 ["live run", *(r.path.name for r in args.compare)])
        window.resize(*WINDOW_SIZE)
        window.show()
        signal.signal(signal.SIGINT, lambda *_: window.close())
        results = []
        if args.screenshot:
            QtCore.QTimer.singleShot(round(args.run_for * 1000),
                                     lambda: results.append(capture(window, args.screenshot)))
        code = app.exec()
        return results[0] if results else code
    finally:
        live.stop()
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)  # the directory this made, by its path


def capture(window: QtWidgets.QMainWindow, path: str) -> int:
    """Save the window as it shows now, every panel brought up to date, as PNG."""
    window.refresh()
    if hasattr(window, "select_telling_page"):
        window.select_telling_page()
    saved = window.grab().save(os.fspath(path), "PNG")
    window.close()
    if not saved:
        print(f"postcopy-emu: could not save {path}", file=sys.stderr)
        return 1
    print(f"postcopy-emu: saved {path}", file=sys.stderr)
    return 0


def fitting(window: QtWidgets.QWidget) -> tuple[int, int]:
    """The size *window* opens at on its screen (fit_size)."""
    free, least = window.screen().availableGeometry(), window.minimumSizeHint()
    return fit_size((free.width(), free.height()), (least.width(), least.height()))


def fit_size(free: tuple[int, int], least: tuple[int, int]) -> tuple[int, int]:
    """WINDOW_SIZE, or less on a smaller screen of *free* pixels (a 1280 x 720 projector),
    never under what the layout needs (*least*)."""
    return tuple(max(need, min(most, int(room * SCREEN_SHARE)))
                 for most, room, need in zip(WINDOW_SIZE, free, least, strict=True))


def application() -> QtWidgets.QApplication:
    """The process's QApplication, made or found, with the window's look."""
    guard_singletons()
    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication([sys.argv[0]])
    app.setStyle("Fusion")  # the same look on every platform, offscreen included
    app.setStyleSheet(style_sheet())
    return app


def _scenario(cfg: Config, args) -> tuple[Config, str | None]:
    """The configuration and the preset name the controls show."""
    if args.scenario is None:
        if WINDOW_PRESET in scenario_names():
            return load_config(WINDOW_PRESET, args.set), WINDOW_PRESET
        return cfg, None
    path = Path(args.scenario)
    if args.scenario in scenario_names():
        return cfg, args.scenario
    if path.resolve().parent == SCENARIO_DIR and path.stem in scenario_names():
        return cfg, path.stem
    return cfg, args.scenario


def screenshot(app: QtWidgets.QApplication, window: QtMainWindow, path: str,
               run_for: float) -> int:
    """Start the migration, let it run for *run_for* real seconds, save the window as PNG.

    The capture waits up to CATCH_S more for a frame with a request in the source's queue or
    on the link, so the picture shows a waiting request as well as the pages that came on
    demand.
    """
    saved = []
    deadline = time.monotonic() + run_for + CATCH_S

    def capture() -> None:
        if window.urgent_pages() == 0 and time.monotonic() < deadline:
            return  # try again at the next tick
        watch.stop()
        window.refresh()
        window.select_telling_page()
        saved.append(window.grab().save(os.fspath(path), "PNG"))
        window.close()

    watch = QtCore.QTimer(window)
    watch.setInterval(5)
    watch.timeout.connect(capture)
    window.start_migration()
    QtCore.QTimer.singleShot(round(run_for * 1000), watch.start)
    app.exec()
    if not saved:
        print("postcopy-emu: the window closed before the screenshot", file=sys.stderr)
        return 1
    if not saved[0]:
        print(f"postcopy-emu: could not save {path}", file=sys.stderr)
        return 1
    print(f"postcopy-emu: saved {path}", file=sys.stderr)
    return 0
