"""Where the window can appear, decided before Qt is asked to.

Qt's platform plugin aborts the process when it cannot open the window (SIGABRT, rc 134), and
the xcb plugin of Qt 6.5 and later then names xcb-cursor0 whatever library is missing. So the
platform is chosen here, before any QApplication exists: offscreen for a screenshot, and for the
window a look first at the display and at the libraries Qt's xcb plugin loads, so that what is
missing is said in one line. No Qt import here: this must work when Qt's libraries do not load.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
from collections.abc import MutableMapping
from pathlib import Path

# The Debian/Ubuntu packages of the libraries the PySide6-Essentials wheel does not bring (ldd
# of libQt6Core/Gui/DBus/Widgets, of the xcb plugin libqxcb.so and its libQt6XcbQpa, reduced to
# what the others do not pull in): EGL, GL, fontconfig, glib and D-Bus for Qt itself (offscreen
# too), the rest for the window on X11. The README and .ci/run install the same list (a test
# checks that they do).
DEBIAN_PACKAGES = (
    "libegl1", "libgl1", "libfontconfig1", "libglib2.0-0", "libdbus-1-3",
    "libxkbcommon-x11-0", "libx11-xcb1", "libxcb-cursor0", "libxcb-icccm4", "libxcb-keysyms1",
    "libxcb-randr0", "libxcb-shape0", "libxcb-sync1", "libxcb-xfixes0",
)
APT_GET = "sudo apt-get install " + " ".join(DEBIAN_PACKAGES)
RUN_INSTEAD = "or run the migration on the command line with `postcopy-emu run`"
ELSE = "or save a picture with `postcopy-emu gui --screenshot PATH`, " + RUN_INSTEAD
NO_DISPLAY = ("no display to open the window on (neither DISPLAY nor WAYLAND_DISPLAY is set): "
              "give it one (`xvfb-run postcopy-emu gui` for a virtual one), " + ELSE)
_held: list = []  # the check's X connection, for release() to hang up


def choose_platform(screenshot: bool, env: MutableMapping[str, str] = os.environ) -> str | None:
    """Set QT_QPA_PLATFORM in *env* for the QApplication to come; return why the window cannot
    open, or None. A QT_QPA_PLATFORM the user set is theirs: it is left alone."""
    if env.get("QT_QPA_PLATFORM"):
        return None
    if screenshot:
        # the same picture with a display or without one, and no window flashing on screen
        env["QT_QPA_PLATFORM"] = "offscreen"
        return None
    if env.get("XDG_SESSION_TYPE") == "wayland" and env.get("WAYLAND_DISPLAY"):
        return None  # Qt tries its wayland plugin first there, and xcb only after it
    if not env.get("DISPLAY"):
        return None if env.get("WAYLAND_DISPLAY") else NO_DISPLAY  # Wayland alone: Qt's call
    return xcb_problem(env["DISPLAY"])


def xcb_problem(display: str, plugin: Path | None = None) -> str | None:
    """Why Qt's xcb platform plugin would abort on *display*, or None. The plugin is loaded
    as Qt would load it: the loader's error names the first library that is missing."""
    plugin = plugin or _qt_plugin("platforms/libqxcb.so")
    if plugin is None or not plugin.exists():
        return None  # not the PySide6 layout this knows: let Qt speak
    try:
        ctypes.CDLL(os.fspath(plugin))
    except OSError as err:
        return missing_libraries(f"Qt's xcb platform plugin does not load ({err})")
    if not _x_server_answers(display):
        return (f"the X server of DISPLAY={display} takes no connection (none there, or not "
                "for this user): start it or fix DISPLAY, " + ELSE)
    return None


def missing_libraries(what: str, instead: str = ELSE) -> str:
    """*what* went wrong loading Qt, what to install, and what works *instead*."""
    return f"{what}; on Debian/Ubuntu: {APT_GET}; {instead}"


def _qt_plugin(name: str) -> Path | None:
    spec = importlib.util.find_spec("PySide6")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)), "Qt", "plugins", name)


def _x_server_answers(display: str) -> bool:
    """Connect to *display*'s X server, as Qt's xcb plugin will."""
    xcb = ctypes.CDLL("libxcb.so.1")  # loaded already: the xcb plugin needs it
    xcb.xcb_connect.restype = ctypes.c_void_p
    xcb.xcb_connect.argtypes = (ctypes.c_char_p, ctypes.c_void_p)
    xcb.xcb_connection_has_error.argtypes = (ctypes.c_void_p,)
    xcb.xcb_disconnect.argtypes = (ctypes.c_void_p,)
    conn = xcb.xcb_connect(display.encode(), None)
    if xcb.xcb_connection_has_error(conn):
        xcb.xcb_disconnect(conn)  # also frees the error object a failed connect returns
        return False
    # An X server resets when its last client leaves (an Xvfb that xvfb-run just started has
    # no other), and a connection made during the reset fails (32 of 300 at once here): hang
    # up only when Qt has its own connection (release()).
    _held.append(lambda: xcb.xcb_disconnect(conn))
    return True


def release() -> None:
    """Hang up the connection the check made; call it once the QApplication exists."""
    while _held:
        _held.pop()()
