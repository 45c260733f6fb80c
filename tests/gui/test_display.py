"""The first command on a fresh machine: `postcopy-emu gui` with no display, with a display
nobody serves, with a library missing; `--screenshot` with no display and no QT_QPA_PLATFORM.
Each program is a real `python -m emu.cli gui` in an environment without those variables."""

import os
import re
import subprocess
import sys
from pathlib import Path

from gui import display
from tests.conftest import PATIENCE
from tests.test_cleanup import segments

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["--set", "guest.ram=16MiB"]


def bare_env(**extra: str) -> dict[str, str]:
    """This environment without a display and without a Qt platform, as on a server."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM", "XDG_SESSION_TYPE")}
    return {**env, **extra}


def gui(*args: str, env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "emu.cli", "gui", *SMALL, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=ROOT)
    _, err = proc.communicate(timeout=PATIENCE)
    return proc, err


def one_line_and_exit_2(proc: subprocess.Popen, err: str) -> str:
    assert proc.returncode == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not segments(proc.pid)
    return err


def test_a_screenshot_needs_no_display_and_no_qt_platform(tmp_path):
    shot = tmp_path / "shot.png"
    proc, err = gui("--screenshot", str(shot), "--run-for", "0.5", env=bare_env())
    assert proc.returncode == 0, err
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not segments(proc.pid)


def test_the_window_without_a_display_says_so_in_one_line():
    err = one_line_and_exit_2(*gui(env=bare_env()))
    assert "no display" in err and "--screenshot" in err and "postcopy-emu run" in err


def test_a_display_nobody_serves_is_one_line_too():
    number = next(n for n in range(97, 200) if not os.path.exists(f"/tmp/.X11-unix/X{n}"))
    err = one_line_and_exit_2(*gui(env=bare_env(DISPLAY=f":{number}")))
    # without the xcb libraries the plugin's loader speaks first, else the X server's silence
    assert f"DISPLAY=:{number} takes no connection" in err or "apt-get install" in err, err


def test_a_missing_library_is_named_not_xcb_cursor(tmp_path):
    """Qt says `xcb-cursor0 or libxcb-cursor0 is needed` whatever is missing; the check names
    the library the loader did not find. A copy of the plugin that needs one that is nowhere."""
    real = display._qt_plugin("platforms/libqxcb.so")
    (tmp_path / "lib").symlink_to(real.parents[2] / "lib")  # the copy's $ORIGIN/../../lib
    copy = tmp_path / "plugins" / "platforms" / real.name
    copy.parent.mkdir(parents=True)
    data = real.read_bytes()
    assert data.count(b"libxcb-icccm.so.4\0") == 1
    copy.write_bytes(data.replace(b"libxcb-icccm.so.4\0", b"libpce-nosuch.so4\0"))
    problem = display.xcb_problem(":0", copy)
    assert "libpce-nosuch.so4" in problem and display.APT_GET in problem


def test_qt_itself_not_loading_is_one_line_too(tmp_path):
    """A libEGL.so.1 that is no library stands for one that is missing: libQt6Gui needs it."""
    (tmp_path / "libEGL.so.1").write_bytes(b"")
    env = bare_env(LD_LIBRARY_PATH=str(tmp_path))
    err = one_line_and_exit_2(*gui("--screenshot", str(tmp_path / "shot.png"), env=env))
    assert "libEGL.so.1" in err and display.APT_GET in err and "--screenshot" not in err
    assert not (tmp_path / "shot.png").exists()


def test_the_readme_and_ci_install_the_packages_the_check_names():
    for doc in ("README.md", ".ci/run"):
        text = (ROOT / doc).read_text()
        line = re.search(r"apt-get install (?:-\S+ )*((?:[\w.+-]+ ?(?:\\\n\s*)?)+)", text)
        assert line, doc
        assert set(line.group(1).replace("\\", " ").split()) == set(display.DEBIAN_PACKAGES), doc


def test_a_platform_the_user_chose_is_theirs():
    env = {"QT_QPA_PLATFORM": "vnc"}
    assert display.choose_platform(True, env) is None and env == {"QT_QPA_PLATFORM": "vnc"}
    env = {}
    assert display.choose_platform(True, env) is None and env == {"QT_QPA_PLATFORM": "offscreen"}
