"""Memory before allocation: a run that does not fit stops before anything exists, with one
line; an allocation that fails says so and leaves nothing (never SIGBUS); every quantity in
the configuration has an upper bound."""

import errno
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from emu import shm
from emu.config import KEYS, ConfigError, load_config
from emu.controller import Run
from tests.conftest import config
from tests.test_cleanup import segments

QUANTITIES = [name for name, key in KEYS.items()
              if key.kind in ("size", "rate", "duration", "int", "float") and not key.choices]


def test_every_quantity_has_an_upper_bound():
    assert [name for name in QUANTITIES if KEYS[name].high is None] == []


@pytest.mark.parametrize("name, value", [
    (name, value) for name in QUANTITIES for value in ("1e30", "1e400", "1e9999999")
    if KEYS[name].kind in ("size", "rate", "duration") or value == "1e30"])
def test_a_huge_value_names_the_key_and_its_range(name, value):
    if KEYS[name].kind == "int":
        value = str(10**30)  # "1e30" is not a whole number, which it says
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"{name}={value}"])
    text = str(err.value)
    assert text.startswith(f"{name}: must be {KEYS[name].allowed()}"), text
    assert "\n" not in text


def cli(*args: str, tmp: str) -> subprocess.CompletedProcess:
    """A program's result, once it has been checked to leave no segment in /dev/shm."""
    proc = subprocess.Popen([sys.executable, "-m", "emu.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "TMPDIR": tmp})
    out, err = proc.communicate(timeout=30)
    assert not segments(proc.pid)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.fixture
def tmp():
    path = tempfile.mkdtemp(prefix="pmem")
    yield path
    shutil.rmtree(path)


@pytest.mark.parametrize("args, said", [
    (["run", "--set", "guest.ram=1TiB"],
     "guest.ram: two guest RAMs of 1TiB and their page arrays need 2 TiB of shared memory, "
     "but /dev/shm has "),  # and "... free and ... of memory is available"
    (["run", "--set", "guest.ram=1e30"], "guest.ram: must be > 0 and <= 16TiB"),
    (["destination", "--incoming", "defer", "--set", "guest.ram=16TiB"],
     "guest.ram: a guest RAM of 16TiB and its page arrays need 16 TiB of shared memory"),
], ids=["run-1TiB", "run-1e30", "destination-16TiB"])
def test_a_guest_that_does_not_fit_stops_before_anything_exists(tmp, args, said):
    if args[0] != "run":
        args += ["--qmp", f"unix:{tmp}/qmp.sock"]
    out = cli(*args, tmp=tmp)
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith(f"postcopy-emu: {said}"), out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert not out.stdout
    assert os.listdir(tmp) == []  # no socket directory, no QMP socket


def test_the_check_counts_what_the_run_writes(monkeypatch):
    """Both guest RAMs, the page arrays, boards and the fault ring (1.8 MiB), rounded to whole
    pages; checked against the smaller of /dev/shm's free space and the available memory."""
    cfg = config(guest__ram="32MiB")
    seen = []
    monkeypatch.setattr(shm, "room", lambda: seen.append(1) or (64 << 20, 1 << 40))
    run = Run(cfg)
    try:
        with pytest.raises(shm.NoRoom, match=r"need 65.9 MiB .* /dev/shm has 64 MiB free"):
            run.start()
        assert seen and not run.children and not segments(os.getpid())
    finally:
        run.stop()
    assert not os.path.exists(run.tmpdir)


def test_a_failing_allocation_says_so_and_leaves_nothing(monkeypatch):
    """/dev/shm fills up between the check and the allocation (another program): the
    allocation fails with a message, and what was made so far is unlinked."""
    made = []

    def fallocate(fd, offset, length):
        made.append(length)
        if len(made) == 3:  # after the clock and the source's RAM
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", fallocate)
    run = Run(config(guest__ram="32MiB"))
    with pytest.raises(shm.NoRoom) as err:
        run.start()
    assert str(err.value).startswith("guest.ram: can not allocate the 8 KiB of src-states "
                                     "in /dev/shm (No space left on device; ")
    assert not run.children and not segments(os.getpid())
    assert not os.path.exists(run.tmpdir)


def _can_mount_tmpfs() -> bool:
    try:
        return subprocess.run(["unshare", "--mount", "true"], capture_output=True,
                              timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


# A /dev/shm of its own (a mount namespace with a small tmpfs), too small for two 32 MiB
# guests; with the free-space probe fooled, the allocation itself finds it full. A fixed time
# scale: auto's calibration run would need room of its own.
IN_A_SMALL_SHM = """
set -e
mount -t tmpfs -o size=48m tmpfs /dev/shm
python -m emu.cli run --set guest.ram=32MiB --set emulator.time-scale=1 \
    && echo "rc=0" || echo "rc=$?"
python -c 'import sys; import emu.shm as shm; shm.room = lambda: (1 << 40, 1 << 40)
from emu.cli import main
sys.exit(main(["run", "--set", "guest.ram=32MiB", "--set", "emulator.time-scale=1"]))' \
    && echo "rc=0" || echo "rc=$?"
echo "left: $(ls /dev/shm | wc -l)"
"""


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs root to mount a tmpfs of its own")
def test_a_short_dev_shm_is_a_message_never_sigbus(tmp):
    out = subprocess.run(["unshare", "--mount", "sh", "-c", IN_A_SMALL_SHM],
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, "TMPDIR": tmp}, cwd=os.getcwd())
    said = out.stderr.strip().splitlines()
    assert out.stdout.split() == ["rc=2", "rc=2", "left:", "0"], out.stderr
    assert said[0].startswith("postcopy-emu: guest.ram: two guest RAMs of 32MiB and their "
                              "page arrays need 65.9 MiB of shared memory, but /dev/shm has "
                              "48 MiB free"), said
    assert said[1].startswith("postcopy-emu: guest.ram: can not allocate the 32 MiB of "
                              "dst-ram in /dev/shm (No space left on device"), said
    assert len(said) == 2
    assert os.listdir(tmp) == []
