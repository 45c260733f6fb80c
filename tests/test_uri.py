"""Addresses and listeners: nothing of anyone else's replaced or removed.

The programs delete only what they created, by the exact path they created.
"""

import os
import shutil
import signal
import subprocess
import sys
import tempfile

from tests.test_cleanup import alive, children, wait_for


def user_file(path: str) -> str:
    with open(path, "w") as f:
        f.write("the user's work")
    return path


def intact(path: str) -> bool:
    with open(path) as f:
        return f.read() == "the user's work"


def test_a_killed_link_leaves_the_users_folder_alone():
    """kill -9 of `postcopy-emu link` listening in a folder named like the controller's run
    directory: its network process removes nothing of the user's."""
    folder = tempfile.mkdtemp(prefix="postcopy-emu-")
    try:
        work = user_file(f"{folder}/work.txt")
        link = subprocess.Popen(
            [sys.executable, "-m", "emu.cli", "link", "--listen", f"unix:{folder}/link.sock",
             "--connect", f"unix:{folder}/in.sock", "--qmp", f"unix:{folder}/q"],
            stderr=subprocess.PIPE, text=True, start_new_session=True)
        assert "relaying" in link.stderr.readline()
        kids = children(link.pid)
        link.send_signal(signal.SIGKILL)
        link.wait()
        assert wait_for(lambda: not any(alive(k) for k in kids)), "orphaned network process"
        assert os.path.isdir(folder) and intact(work)
    finally:
        link.stderr.close()
        shutil.rmtree(folder, ignore_errors=True)
