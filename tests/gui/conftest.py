"""The window's tests: offscreen Qt, small guests, and nothing left behind.

QT_QPA_PLATFORM must be set before Qt is imported, so it is set here, first.
"""

import os

os.environ["QT_QPA_PLATFORM"] = "offscreen"

import pytest  # noqa: E402

from gui._qt.qtfix import guard_singletons  # noqa: E402
from tests.conftest import with_backend  # noqa: E402

guard_singletons()

# A guest small enough to migrate in a second or two of real time.
SMALL = {
    "guest.ram": "16MiB",
    "link.bandwidth": "1Gbit",
    "link.socket-buffer": "1MiB",
    "migration.switchover-after": "100ms",
    "emulator.time-scale": "0.5",
    "emulator.duration-limit": "20s",
}


def small_config(**sets: str):
    """SMALL with overrides given as section__key="value" (dashes as underscores), on the
    backend pytest --backend asks for (tests/conftest.py)."""
    return with_backend(SMALL, sets)


@pytest.fixture
def make_window(qtbot):
    """make_window(cfg) -> a shown QtMainWindow, closed (and its run stopped) afterwards."""
    from gui._qt.app import application
    from gui._qt.window import QtMainWindow

    application()  # the style the real window gets
    windows = []

    def make(cfg):
        window = QtMainWindow(cfg)
        qtbot.addWidget(window)
        window.resize(1400, 900)
        window.show()
        windows.append(window)
        return window

    yield make
    for window in windows:
        window.close()
