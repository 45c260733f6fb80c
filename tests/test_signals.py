"""Signals end every program cleanly: SIGINT, SIGTERM and SIGHUP as Ctrl-C, a second signal
during the clean-up waits for it, and kill -9 leaves the children to clean up. After each,
nothing is left: no process, no /dev/shm segment, no socket file, no temp dir, and no
resource-tracker warning.

Every program here runs in its own session with the signal dispositions set explicitly, so
that these tests hold when the suite itself runs where SIGINT is ignored (a script's
background job).
"""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from emu import signals
from emu.controller import Run
from emu.qmp.protocol import QmpClient
from tests.conftest import config
from tests.test_cleanup import _cmdline as cmdline
from tests.test_cleanup import alive, children, segments, wait_for

SLOW = ["--set", "emulator.time-scale=0.05", "--set", "guest.ram=32MiB"]


def default_dispositions() -> None:
    """In the child, before exec: the dispositions of an interactive shell's foreground job."""
    for sig in signals.STOP_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


class Program:
    """One `python -m emu.cli` program in its own session and temp dir, and its processes."""

    def __init__(self, tmp: str, *args: str) -> None:
        self.tmp = tmp
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "emu.cli", *args], stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, start_new_session=True, preexec_fn=default_dispositions,
            env={**os.environ, "TMPDIR": tmp})
        self.kids: set[int] = set()
        self.err = ""

    def wait_started(self, processes: int) -> None:
        """Until the program has its segments and `processes` children (the resource tracker
        counts): its signal handlers are in place by then."""
        assert wait_for(lambda: len(children(self.proc.pid)) >= processes
                        and segments(self.proc.pid)), "the program did not start"
        self.kids = set(children(self.proc.pid))

    def signal(self, sig: int, group: bool = False) -> None:
        """To the program, or to its whole process group as a terminal does."""
        if group:
            os.killpg(self.proc.pid, sig)
        else:
            os.kill(self.proc.pid, sig)

    def finish(self) -> int:
        """The exit code, once every process holding its stderr (children, resource tracker)
        is gone."""
        _, err = self.proc.communicate(timeout=60)
        self.err = err.decode(errors="replace")
        return self.proc.returncode

    def assert_nothing_left(self) -> None:
        assert wait_for(lambda: not any(alive(k) for k in self.kids)), \
            f"processes left behind\n{self.err}"
        assert not segments(self.proc.pid), f"segments left in /dev/shm\n{self.err}"
        assert os.listdir(self.tmp) == [], f"left in the temp dir\n{self.err}"
        assert "resource_tracker" not in self.err and "leaked" not in self.err, self.err

    def kill(self) -> None:
        """Whatever of the session is left when a test failed (a child stopped by the test)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.communicate()
        for name in segments(self.proc.pid):  # a failed test's leak, not the next test's
            os.unlink(f"/dev/shm/{name}")


@pytest.fixture
def tmp():
    """A temp dir of the test's own (TMPDIR of the programs), short enough for unix sockets."""
    path = tempfile.mkdtemp(prefix="psig")
    started: list[Program] = []

    def start(*args: str) -> Program:
        started.append(Program(path, *args))
        return started[-1]

    yield path, start
    for program in started:
        program.kill()
    shutil.rmtree(path)


def engine_of(program: Program) -> int:
    """The program's engine child (not the resource tracker, nor a destination's front), by
    the title it carries."""
    assert wait_for(lambda: [k for k in children(program.proc.pid)
                             if "postcopy-emu: destination" in cmdline(k)]), program.err
    return [k for k in children(program.proc.pid) if "postcopy-emu: destination" in cmdline(k)][0]


# ---- postcopy-emu run ----

@pytest.mark.parametrize("sig, group, rc, said", [
    (signal.SIGINT, True, 130, "interrupted; everything stopped"),
    (signal.SIGTERM, False, 143, "terminating on signal 15; everything stopped"),
    (signal.SIGTERM, True, 143, "terminating on signal 15; everything stopped"),
    (signal.SIGHUP, True, 129, "terminating on signal 1; everything stopped"),
], ids=["ctrl-c", "sigterm", "sigterm-group", "hangup"])
def test_a_signal_stops_a_run_and_nothing_is_left(tmp, sig, group, rc, said):
    run = tmp[1]("run", *SLOW)
    run.wait_started(4)  # network, destination, source, resource tracker
    run.signal(sig, group)
    assert run.finish() == rc, run.err
    assert said in run.err
    run.assert_nothing_left()


def test_a_second_signal_does_not_cut_the_clean_up_short(tmp):
    """Ctrl-C, then SIGTERM while stop() waits for a child that does not answer (stopped):
    stop() still ends it, unlinks everything and removes the socket directory."""
    run = tmp[1]("run", *SLOW)
    run.wait_started(4)
    os.kill(engine_of(run), signal.SIGSTOP)  # stop() waits 3 s for it, then kills it
    run.signal(signal.SIGINT, group=True)
    time.sleep(0.15)  # well inside those 3 s
    run.signal(signal.SIGTERM)
    run.signal(signal.SIGHUP, group=True)
    assert run.finish() == 130, run.err
    run.assert_nothing_left()


def test_a_killed_run_is_cleaned_up_by_its_children_without_a_warning(tmp):
    run = tmp[1]("run", *SLOW)
    run.wait_started(4)
    run.signal(signal.SIGKILL)
    assert run.finish() == -signal.SIGKILL
    run.assert_nothing_left()


def test_stop_is_idempotent():
    run = Run(config())
    run.start()
    procs = [child.proc for child in run.children.values()]
    run.stop()
    run.stop()
    assert not any(proc.is_alive() for proc in procs)
    assert not os.path.exists(run.tmpdir)


# ---- the standalone programs ----

def destination(tmp) -> tuple[Program, str, str]:
    path, start = tmp
    incoming, qmp = f"{path}/in.sock", f"{path}/d.qmp"
    program = start("destination", "--incoming", f"unix:{incoming}", "--qmp", f"unix:{qmp}",
                    *SLOW)
    program.wait_started(2)  # the engine child listening, and the resource tracker
    assert wait_for(lambda: os.path.exists(incoming) and os.path.exists(qmp))
    return program, incoming, qmp


@pytest.mark.parametrize("sig, group, rc, said", [
    (signal.SIGINT, True, 130, "interrupted; everything stopped"),
    (signal.SIGTERM, False, 0, "terminating on signal 15"),
    (signal.SIGHUP, True, 0, "terminating on signal 1"),
], ids=["ctrl-c", "sigterm", "hangup"])
def test_a_signal_stops_a_standalone_program_and_nothing_is_left(tmp, sig, group, rc, said):
    dst, _, _ = destination(tmp)
    dst.signal(sig, group)
    assert dst.finish() == rc, dst.err
    assert said in dst.err
    dst.assert_nothing_left()  # the migration and QMP sockets too


def test_sigterm_during_the_clean_up_after_quit(tmp):
    """quit, then SIGTERM 150 ms later, while the program waits for its engine to stop: the
    clean-up runs to the end, the migration socket goes with it."""
    dst, incoming, qmp = destination(tmp)
    os.kill(engine_of(dst), signal.SIGSTOP)  # the clean-up waits 3 s for it
    with QmpClient(f"unix:{qmp}", timeout=30) as client:
        client.cmd("quit")
    time.sleep(0.15)
    dst.signal(signal.SIGTERM)
    assert dst.finish() == 0, dst.err
    assert "terminating on signal 15" in dst.err
    assert not os.path.exists(incoming)
    dst.assert_nothing_left()


def test_a_killed_standalone_program_is_cleaned_up_by_its_engine_without_a_warning(tmp):
    dst, incoming, qmp = destination(tmp)
    dst.signal(signal.SIGKILL)
    assert dst.finish() == -signal.SIGKILL
    assert wait_for(lambda: not os.path.exists(incoming))  # the engine bound it: it removes it
    os.unlink(qmp)  # the killed program's own: nobody can remove it, as with QEMU
    dst.assert_nothing_left()


# ---- emu.signals itself, in this process ----

def test_held_defers_a_signal_until_the_block_is_done():
    seen = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    try:
        with signals.held():
            signal.raise_signal(signal.SIGTERM)
            with signals.held():  # nested: the outermost block delivers
                signal.raise_signal(signal.SIGTERM)
            assert seen == []
        assert seen == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.fixture
def interactive():
    """This process's dispositions as in an interactive shell, whatever the suite started
    with (a background job ignores SIGINT), and back afterwards."""
    previous = {sig: signal.getsignal(sig) for sig in signals.STOP_SIGNALS}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    yield
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def test_the_first_stop_signal_raises_and_later_ones_wait(interactive):
    previous = {sig: signal.getsignal(sig) for sig in signals.STOP_SIGNALS}
    with pytest.raises(signals.Stopped) as stop:
        with signals.stopping():
            try:
                signal.raise_signal(signal.SIGHUP)
            finally:
                signal.raise_signal(signal.SIGTERM)  # during the clean-up: noted only
                with signals.held():
                    pass
    assert stop.value.signum == signal.SIGHUP
    assert isinstance(stop.value, KeyboardInterrupt)  # handled like Ctrl-C
    assert {sig: signal.getsignal(sig) for sig in signals.STOP_SIGNALS} == previous


def test_an_ignored_signal_stays_ignored(interactive):
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as under nohup
    with signals.stopping():
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        signal.raise_signal(signal.SIGHUP)
        with signals.held():
            signal.raise_signal(signal.SIGHUP)
