import os
import signal

import pytest

from emu.config import load_config
from emu.controller import migrate

# Small, fast migrations: what matters is emulated time, which the link keeps exact.
BASE = {
    "guest.ram": "32MiB",
    "link.bandwidth": "1Gbit",
    "link.socket-buffer": "1MiB",
    "migration.switchover-after": "100ms",
    "emulator.time-scale": "0.25",
    "emulator.duration-limit": "20s",
}


def config(**sets):
    merged = {**BASE, **{k.replace("__", ".").replace("_", "-"): v for k, v in sets.items()}}
    return load_config(None, [f"{k}={v}" for k, v in merged.items()])


# Real seconds a test waits for something that is bound to happen: generous, because the
# machine may be loaded (2 cores shared by many runs); a test never asserts on how long it took.
PATIENCE = 60.0

# The signals a test sends to a program it starts (Ctrl-C, closing the terminal, kill).
TERMINAL_SIGNALS = (signal.SIGINT, signal.SIGHUP, signal.SIGTERM)


def as_from_a_terminal() -> None:
    """preexec_fn for a program a test signals: default dispositions and no blocked signals,
    as a program started from an interactive shell has them. A script's background job starts
    with SIGINT ignored (and Python then installs no KeyboardInterrupt handler), nohup with
    SIGHUP ignored; a test must not depend on the shell pytest was started from."""
    for sig in TERMINAL_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


@pytest.fixture
def run_migration():
    def run(**sets):
        return migrate(config(**sets))
    return run


@pytest.fixture(autouse=True)
def no_leftovers():
    """Every test leaves /dev/shm and the process table as it found them."""
    mine = f"pce_{os.getpid()}_"  # segments are named after the controller's pid
    yield
    leaked = [n for n in os.listdir("/dev/shm") if n.startswith(mine)]
    assert not leaked, f"leaked shared memory: {leaked}"
    import multiprocessing
    assert not multiprocessing.active_children()
