"""A window for a lecture hall (issue 14 item 4): it fits a 1280 x 720 projector with nothing
cut, a presentation mode enlarges it, keys drive it, and its channel colours survive red-green
colour blindness. Against a made-up migration (gui.synthetic): no processes."""

import pytest
from PySide6 import QtCore, QtGui, QtWidgets

from emu.migration import ram as R
from gui import colourblind, pagemap
from gui._qt import style
from gui.synthetic import SyntheticSession
from tests.gui.conftest import small_config

PROJECTOR = (1280, 720)
DISTINCT = 20  # CIE76 Delta E: a difference read at a glance (2 is barely visible)


@pytest.fixture
def projected(make_window, qtbot):
    """projected(presentation) -> a window at 1280 x 720 showing a run with faults on both
    channels, laid out."""
    def make(presentation=False):
        cfg = small_config(migration__postcopy_preempt="true")
        window = make_window(cfg)
        window.latency.set_previous("postcopy-preempt, break-huge off", _one_fault(cfg))
        session = SyntheticSession(cfg)
        window.show_session(session, follow=False)
        if presentation:
            window.set_presentation(True)
        window.resize(*PROJECTOR)
        qtbot.waitExposed(window)
        session.block([10, 20])
        session.now = 0.3
        session.arrive(10, R.URGENT_MAIN)
        session.arrive(20, R.URGENT_PREEMPT)
        session.block([4001, 4002, 4003], at=0.29)  # the queue panel's longest lines
        session.queue(4001)
        session.send(4002, R.SENT_PREEMPT)
        session.send(4003, R.SENT_MAIN)  # on main already, in the background stream
        window.refresh()
        return window, session
    return make


def _one_fault(cfg):
    """The fault log of a finished run with one slow fault."""
    past = SyntheticSession(cfg)
    past.block(5, at=0.0)
    past.now = 0.03
    past.arrive(5, R.URGENT_MAIN)
    past.tick()
    return past.faults


def _needed_width(label: QtWidgets.QLabel) -> float:
    """The width *label*'s text takes on one line, rich text or plain."""
    doc = QtGui.QTextDocument()
    doc.setDefaultFont(label.font())
    doc.setDocumentMargin(0)
    if label.textFormat() == QtCore.Qt.TextFormat.RichText or "<" in label.text():
        doc.setHtml(label.text())
    else:
        doc.setPlainText(label.text())
    return doc.idealWidth()


def cut_texts(window) -> list[str]:
    """Every one-line text of the window that does not fit where it is drawn: labels, plot
    titles and axis titles."""
    cut = []
    for label in window.findChildren(QtWidgets.QLabel):
        if label.isVisibleTo(window) and not label.wordWrap() and label.text():
            if _needed_width(label) > label.contentsRect().width() + 1:
                cut.append(label.text())
    for widget in (window.latency.scatter, window.latency.histogram):
        plot = widget.getPlotItem()
        if plot.titleLabel.text and (plot.titleLabel.item.boundingRect().width()
                                     > plot.width() + 1):
            cut.append(plot.titleLabel.text)
        for side in ("left", "bottom"):
            axis = plot.getAxis(side)
            room = axis.height() if side == "left" else axis.width()
            if axis.label.boundingRect().width() > room + 1:
                cut.append(axis.labelText)
    return cut


def test_the_window_fits_a_1280x720_projector(projected):
    window, _ = projected()
    least = window.minimumSizeHint()
    assert least.width() <= PROJECTOR[0] and least.height() <= PROJECTOR[1]
    assert (window.width(), window.height()) == PROJECTOR
    assert cut_texts(window) == []


def test_presentation_mode_fits_and_has_larger_letters_and_marks(projected):
    window, _ = projected()
    title = window.findChild(QtWidgets.QLabel, "title")
    small = title.fontMetrics().height(), window.events.fontMetrics().height()
    banner = window.banner.height()
    window.set_presentation(True)
    window.refresh()
    assert window.presenting and style.scale == style.PRESENTATION_SCALE
    large = title.fontMetrics().height(), window.events.fontMetrics().height()
    assert large[0] > small[0] * 1.3 and large[1] > small[1] * 1.3
    assert len(window.latency._raster._shapes[1]) > 13  # radius 3: thicker dots
    assert not window.settings.isVisible()  # out of the way; F9 brings it back
    least = window.minimumSizeHint()
    assert least.width() <= PROJECTOR[0] and least.height() <= PROJECTOR[1]
    assert cut_texts(window) == []
    window.set_presentation(False)
    assert title.fontMetrics().height() == small[0] and window.settings.isVisible()
    assert window.banner.height() == banner  # as it was, not shorter


def test_open_in_presentation_mode_fits_too(projected):
    window, _ = projected(presentation=True)
    assert cut_texts(window) == []
    assert _bucket_labels_apart(window)


def _bucket_labels_apart(window) -> bool:
    """The histogram's bucket labels leave room between them (they overlapped at 1280)."""
    plot = window.latency.histogram.getPlotItem()
    axis = plot.getAxis("bottom")
    (x0, x1), _ = plot.getViewBox().viewRange()
    shown = [(n, text) for n, text in axis._tickLevels[0] if text and x0 <= n <= x1]
    labelled = [n for n, _ in shown]
    per_bucket = plot.getViewBox().width() / (x1 - x0)
    metrics = QtGui.QFontMetrics(axis.style["tickFont"] or window.font())
    widest = max(metrics.horizontalAdvance(text) for _, text in shown)
    return len(labelled) >= 3 and min(b - a for a, b in zip(labelled, labelled[1:],
                                                             strict=False)) * per_bucket > widest


def test_the_histogram_labels_do_not_overlap_at_1280x720(projected):
    window, _ = projected()
    assert _bucket_labels_apart(window)


def test_space_pauses_and_resumes_f11_goes_full_screen(projected, qtbot):
    window, session = projected()
    window.tick()  # the Pause button is enabled while the run runs
    qtbot.keyClick(window, QtCore.Qt.Key.Key_Space)
    assert session.paused and window.controls.pause.text() == "Resume"
    qtbot.keyClick(window, QtCore.Qt.Key.Key_Space)
    assert not session.paused and window.controls.pause.text() == "Pause"
    assert ("pause", True) in session.commands and ("pause", False) in session.commands
    qtbot.keyClick(window, QtCore.Qt.Key.Key_F11)
    assert window.windowState() & QtCore.Qt.WindowState.WindowFullScreen
    qtbot.keyClick(window, QtCore.Qt.Key.Key_F11)
    assert not window.windowState() & QtCore.Qt.WindowState.WindowFullScreen
    qtbot.keyClick(window, QtCore.Qt.Key.Key_F5)
    assert window.presenting
    qtbot.keyClick(window, QtCore.Qt.Key.Key_F5)
    assert not window.presenting


def test_arrow_keys_step_a_session_that_steps(projected, qtbot):
    window, session = projected()
    steps = []
    session.step = steps.append
    window.show_session(session, follow=False)  # the window looks for session.step again
    qtbot.keyClick(window, QtCore.Qt.Key.Key_Right)
    qtbot.keyClick(window, QtCore.Qt.Key.Key_Left)
    assert steps == [1, -1]


def test_the_shortcuts_are_listed():
    from gui._qt.window import shortcuts_text

    text = shortcuts_text()
    for key in ("Space", "Left", "Right", "F11", "F5", "F9", "Ctrl+E"):
        assert key in text
    assert "Pause / resume" in text and "Full screen" in text


@pytest.mark.parametrize("kind", sorted(colourblind.MACHADO))
def test_main_and_preempt_stay_apart_for_a_colour_blind_student(kind):
    colour = pagemap.COLOURS
    pairs = ((R.URGENT_MAIN, R.URGENT_PREEMPT), (R.INFLIGHT_MAIN, R.INFLIGHT_PREEMPT),
             (R.URGENT_MAIN, R.BACKGROUND), (R.URGENT_PREEMPT, R.BACKGROUND),
             (R.URGENT_MAIN, R.REQUESTED), (R.URGENT_PREEMPT, R.REQUESTED))
    for a, b in pairs:
        assert colourblind.delta_e(colour[a], colour[b], kind) > DISTINCT, (a, b)
    main, preempt = style.CHANNEL_COLOURS  # the scatter's and the histogram's too
    assert colourblind.delta_e(main, preempt, kind) > 5 * DISTINCT
    assert style.CHANNEL_SHAPES[0] != style.CHANNEL_SHAPES[1]  # and not by colour alone


def test_the_old_orange_and_green_fail_the_same_check():
    """The check sees what the issue saw: orange and green, one colour to a protanope."""
    assert colourblind.delta_e((255, 140, 0), (20, 160, 60), "protanopia") < DISTINCT
    assert colourblind.delta_e((255, 140, 0), (20, 160, 60)) > 4 * DISTINCT  # to the rest


def test_the_simulation_keeps_greys_and_moves_reds():
    grey = [[128, 128, 128]]
    for kind in colourblind.MACHADO:
        assert abs(colourblind.simulate(grey, kind).astype(int) - 128).max() <= 2
        assert colourblind.delta_e((220, 20, 60), (220, 20, 60), kind) == 0
    red, simulated = (255, 0, 0), colourblind.simulate([[255, 0, 0]], "protanopia")[0]
    assert colourblind.delta_e(red, simulated) > DISTINCT


def test_the_window_opens_at_a_size_that_fits_the_screen(projected):
    from gui._qt.app import WINDOW_SIZE, fit_size

    window, _ = projected()
    least = window.minimumSizeHint()
    least = (least.width(), least.height())
    opens = fit_size((1280, 690), least)  # a projector's screen, less a panel
    assert opens == (1216, 655) and opens[0] >= least[0] and opens[1] >= least[1]
    assert fit_size((2560, 1440), least) == WINDOW_SIZE  # a large screen: as before


def test_gui_size_takes_width_x_height():
    import argparse

    from emu import cli

    assert cli._window_size("1280x720") == (1280, 720)
    for bad in ("1280", "1280x", "0x720", "wide x tall"):
        with pytest.raises(argparse.ArgumentTypeError):
            cli._window_size(bad)


def test_a_screenshot_at_1280x720_in_presentation_mode(tmp_path):
    """`gui --screenshot --size 1280x720 --presentation`: the picture a lecturer checks."""
    import struct

    from tests.gui.test_display import bare_env, gui

    shot = tmp_path / "shot.png"
    proc, err = gui("--screenshot", str(shot), "--run-for", "0.5", "--size", "1280x720",
                    "--presentation", env=bare_env())
    assert proc.returncode == 0, err
    header = shot.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", header[16:24]) == PROJECTOR  # IHDR: width, height
