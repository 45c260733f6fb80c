"""The engines' own waits end on time: a sleep is not left to end late."""

import os
import shutil
import tempfile

import pytest

from emu import engines
from emu.clock import SPIN_S
from emu.events import Ready
from emu.net import link
from tests.conftest import PATIENCE, config


def test_relay_sleeps_until_shortly_before_its_next_event_then_spins():
    # sleeping the whole wait, the link delivered a frame as late as the sleep ended
    assert link._sleep_for(1e-3) == pytest.approx(1e-3 - SPIN_S)
    assert link._sleep_for(SPIN_S / 2) == 0


@pytest.mark.skipif(not os.path.exists("/proc/self/timerslack_ns"),
                    reason="timer slack is Linux's (4.6 and later)")
def test_engine_children_run_with_a_one_microsecond_timer_slack():
    cfg = config()
    shared = engines.Shared(cfg, ("network",))
    folder = tempfile.mkdtemp(prefix="postcopy-emu-test-")
    child = None
    try:
        child = shared.spawn("network", cfg, f"unix:{folder}/link.sock",
                             f"unix:{folder}/dst.sock", folder, janitor=True)
        while not isinstance(child.recv(), Ready):
            assert child.conn.poll(PATIENCE)
        with open(f"/proc/{child.pid}/timerslack_ns") as slack:
            assert int(slack.read()) == 1000  # Linux's default: 50000
    finally:
        if child:
            engines.stop([child])
        shared.close()
        shutil.rmtree(folder, ignore_errors=True)
