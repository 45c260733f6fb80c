"""Nothing is left behind: no process, no shared-memory segment, whatever way a run ends."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from emu.controller import Run
from tests.conftest import PATIENCE, as_from_a_terminal, config

SLOW = ["--set", "emulator.time-scale=0.05", "--set", "guest.ram=64MiB"]


def segments(pid: int) -> list[str]:
    return [n for n in os.listdir("/dev/shm") if n.startswith(f"pce_{pid}_")]


def children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return [int(x) for x in out.stdout.split()]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purpose
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_for(predicate, timeout=PATIENCE):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def start_cli(*args, env=None):
    proc = subprocess.Popen([sys.executable, "-m", "emu.cli", "run", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            start_new_session=True, preexec_fn=as_from_a_terminal)
    assert wait_for(lambda: len(children(proc.pid)) >= 3 and segments(proc.pid)), \
        "the run did not start"
    # the emulator's processes: the controller's children other than the resource tracker
    kids = [k for k in children(proc.pid) if "resource_tracker" not in _cmdline(k)]
    return proc, kids


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().decode(errors="replace")
    except FileNotFoundError:
        return ""


def test_ctrl_c_stops_everything():
    proc, kids = start_cli(*SLOW)
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
    _, err = proc.communicate(timeout=PATIENCE)
    assert proc.returncode == 130, err
    assert b"interrupted" in err
    assert not segments(proc.pid)
    assert wait_for(lambda: not any(alive(k) for k in kids))


def socket_dirs(where: str | None = None) -> set[str]:
    return {n for n in os.listdir(where or tempfile.gettempdir())
            if n.startswith("postcopy-emu-")}


@pytest.fixture
def own_tmpdir():
    """A TMPDIR for the program under test alone: other runs on a busy machine make and remove
    their own socket directories in /tmp meanwhile. Short, as unix socket paths must be."""
    where = tempfile.mkdtemp(prefix="pce")
    yield where
    shutil.rmtree(where)


def test_killed_controller_takes_its_children_with_it(own_tmpdir):
    proc, kids = start_cli(*SLOW, env={**os.environ, "TMPDIR": own_tmpdir})
    assert socket_dirs(own_tmpdir)
    proc.kill()
    proc.communicate(timeout=PATIENCE)
    assert wait_for(lambda: not any(alive(k) for k in kids)), "orphaned emulator processes"
    assert wait_for(lambda: not segments(proc.pid)), "segments left in /dev/shm"
    assert wait_for(lambda: not socket_dirs(own_tmpdir)), "socket directory left in TMPDIR"


SURVIVOR = {"destination": "source", "source": "destination", "network": "source"}
# phase: (migration.switchover-after, the status both sides are in when the victim dies);
# waiting for the statuses, not for an emulated time, holds however late a loaded machine
# lets a side get there
PHASES = {"precopy": ("10s", "active"), "postcopy": ("50ms", "postcopy-active")}


def poll_until(run: Run, predicate, timeout: float = PATIENCE) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, (run.status, run.errors)
        run.poll()


@pytest.mark.parametrize("phase", ["precopy", "postcopy"])
@pytest.mark.parametrize("victim", ["destination", "source", "network"])
def test_a_killed_child_fails_the_run_and_nothing_is_left(victim, phase):
    switchover, status = PHASES[phase]
    run = Run(config(emulator__time_scale="0.1", guest__ram="64MiB",
                     migration__switchover_after=switchover), recover_after=None)
    try:
        run.start()
        poll_until(run, lambda: all(s == status for s in run.status.values()))
        os.kill(run.children[victim].pid, signal.SIGKILL)
        poll_until(run, lambda: run.finished)
        assert any(f"{victim} process died" in e for e in run.errors), run.errors
        assert not run.ok
        # the other side says what the loss did to it, as QEMU would
        survivor = run.status[SURVIVOR[victim]]
        assert survivor == ("failed" if phase == "precopy" else "postcopy-paused"), run.states
        message = "keeps running on the source" if phase == "precopy" else "cannot be saved"
        if victim == "destination" or (victim == "source" and phase == "postcopy"):
            assert any(message in e for e in run.errors), run.errors
        procs = [child.proc for child in run.children.values()]
    finally:
        run.stop()
    assert not any(p.is_alive() for p in procs)


def test_a_failing_run_reports_and_cleans_up(run_migration):
    result = run_migration(migration__switchover_after="10s", emulator__duration_limit="50ms")
    assert result["status"] == "failed"
    assert any("duration-limit" in e for e in result["errors"])
    assert not result["integrity"]["ok"]


@pytest.mark.parametrize("setting, message", [
    (["guest.page-size=8KiB"], "guest.page-size: must be one of 4KiB, 2MiB, 1GiB"),
    (["guest.page-size=2MiB", "guest.ram=3MiB"],
     "guest.ram: must be a multiple of guest.page-size"),
    (["link.bandwidth=0"], "link.bandwidth: must be > 0"),
    (["link.bandwith=1Gbit"], "did you mean link.bandwidth"),
    (["migration.postcopy-ram=false", "migration.postcopy-preempt=true"],
     "requires migration.postcopy-ram"),
])
def test_invalid_settings_stop_before_any_process_starts(setting, message):
    sets = [arg for s in setting for arg in ("--set", s)]
    out = subprocess.run([sys.executable, "-m", "emu.cli", "run", *sets],
                         capture_output=True, text=True, timeout=PATIENCE)
    assert out.returncode == 2
    assert message in out.stderr and len(out.stderr.strip().splitlines()) == 1
