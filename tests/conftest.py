import os

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
