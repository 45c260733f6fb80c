"""emu.qemu.hugepages: the pool raised BY what a run lacks and lowered BY what the kernel gave
(whatever others did meanwhile), on every way out, a SIGTERM included; a private hugetlbfs
mount unmounted and removed afterwards; the one-line reasons where the machine cannot."""

import os
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager

import pytest

from emu import signals
from emu.figures import qemu_bench
from emu.qemu import available, hugepages

root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting hugetlbfs needs root")


class FakePool:
    """A sysfs pool directory whose nr_hugepages behaves as the kernel's: a write allocates
    or frees pages (as many as `kernel_can_find` allows) and moves free_hugepages with it."""

    def __init__(self, tmp_path, monkeypatch, nr=10, free=4, resv=2, kernel_can_find=1000):
        self.dir = tmp_path / "hugepages-2048kB"
        self.dir.mkdir()
        self.kernel_can_find = kernel_can_find
        self.set(nr=nr, free=free, resv=resv)
        monkeypatch.setattr(hugepages, "POOLS", str(tmp_path))
        monkeypatch.setattr(os, "geteuid", lambda: 0)
        real_write = hugepages._write

        def write(path, value):
            assert path == str(self.dir / "nr_hugepages")
            delta = min(value - self.get("nr"), self.kernel_can_find)
            self.writes.append(value)
            self.set(nr=self.get("nr") + delta, free=self.get("free") + delta)
            real_write(path + ".written", value)

        self.writes = []
        monkeypatch.setattr(hugepages, "_write", write)

    def _path(self, name):
        return self.dir / {"nr": "nr_hugepages", "free": "free_hugepages",
                           "resv": "resv_hugepages"}[name]

    def get(self, name):
        return int(self._path(name).read_text())

    def set(self, **values):
        for name, value in values.items():
            self._path(name).write_text(f"{value}\n")

    def another_process_adds(self, pages):
        self.set(nr=self.get("nr") + pages, free=self.get("free") + pages)


def test_the_pool_is_raised_by_what_is_lacking_and_lowered_by_the_same(tmp_path, monkeypatch):
    pool = FakePool(tmp_path, monkeypatch, nr=10, free=4, resv=2)  # 2 available
    with hugepages.reserved(64) as added:
        assert added == 62 and pool.get("nr") == 72 and hugepages.available() == 64
        pool.another_process_adds(5)  # e.g. the emulator's userfaultfd backend, meanwhile
    assert pool.get("nr") == 15  # its 5 stay: lowered by 62, not set back to 10
    assert pool.writes == [72, 15]


def test_enough_free_pages_leave_the_pool_alone(tmp_path, monkeypatch):
    pool = FakePool(tmp_path, monkeypatch, nr=100, free=80, resv=10)
    with hugepages.reserved(64) as added:
        assert added == 0
    assert pool.writes == [] and pool.get("nr") == 100


def test_reserved_pages_of_other_mappings_are_not_counted_free(tmp_path, monkeypatch):
    # HugePages_Free counts pages a mapping has reserved and not touched yet
    pool = FakePool(tmp_path, monkeypatch, nr=32, free=32, resv=32)
    with hugepages.reserved(4) as added:
        assert added == 4 and pool.get("nr") == 36
    assert pool.get("nr") == 32


def test_a_fragmented_kernel_is_one_line_and_what_it_gave_is_given_back(tmp_path, monkeypatch):
    pool = FakePool(tmp_path, monkeypatch, nr=10, free=0, resv=0, kernel_can_find=3)
    with pytest.raises(hugepages.HugepagesError, match="it found 3; .*fragmented") as e:
        with hugepages.reserved(64):
            pytest.fail("ran without its pages")
    assert "\n" not in str(e.value) and pool.get("nr") == 10 and pool.writes == [74, 10]


def test_an_error_in_the_run_gives_the_pages_back(tmp_path, monkeypatch):
    pool = FakePool(tmp_path, monkeypatch, nr=0, free=0, resv=0)
    with pytest.raises(RuntimeError, match="QEMU failed"), hugepages.reserved(8):
        raise RuntimeError("QEMU failed")
    assert pool.get("nr") == 0


def test_a_sigterm_during_the_run_gives_the_pages_back(tmp_path, monkeypatch):
    pool = FakePool(tmp_path, monkeypatch, nr=6, free=0, resv=0)
    with pytest.raises(signals.Stopped), signals.stopping(), hugepages.reserved(8):
        assert pool.get("nr") == 14
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises here, in the block
        pytest.fail("SIGTERM did not stop the run")
    assert pool.get("nr") == 6


def test_without_root_it_says_so_and_touches_nothing(tmp_path, monkeypatch):
    pool = FakePool(tmp_path, monkeypatch, nr=0, free=0, resv=0)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(hugepages.HugepagesError, match="needs root"), hugepages.reserved(8):
        pass
    assert pool.writes == []


def test_a_kernel_without_2mib_pages_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(hugepages, "POOLS", str(tmp_path))
    with pytest.raises(hugepages.HugepagesError, match="no 2 MiB huge pages"):
        with hugepages.hugetlbfs(64 << 20):
            pass


def test_an_existing_writable_mount_of_2mib_pages_is_used(tmp_path, monkeypatch):
    mounts = tmp_path / "mounts"
    huge, giant = tmp_path / "huge pages", tmp_path / "giant"
    huge.mkdir(), giant.mkdir()
    mounts.write_text(f"none {giant} hugetlbfs rw,pagesize=1024M 0 0\n"
                      f"tmpfs /dev/shm tmpfs rw 0 0\n"
                      f"hugetlbfs {str(huge).replace(' ', chr(92) + '040')} hugetlbfs "
                      "rw,relatime,pagesize=2M 0 0\n")
    monkeypatch.setattr(hugepages, "MOUNTS", str(mounts))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    assert hugepages.existing_mount() == str(huge)
    assert hugepages.existing_mount(1 << 30) == str(giant)


def test_another_program_s_private_mount_is_not_borrowed(tmp_path, monkeypatch):
    private = tmp_path / "pce-hugetlbfs-x"  # tmp_path is in the temporary directory
    private.mkdir()
    mounts = tmp_path / "mounts"
    mounts.write_text(f"none {private} hugetlbfs rw,pagesize=2M 0 0\n")
    monkeypatch.setattr(hugepages, "MOUNTS", str(mounts))
    assert hugepages.existing_mount() is None


@root
def test_a_private_mount_is_made_and_undone(monkeypatch):
    monkeypatch.setattr(hugepages, "existing_mount", lambda size: None)
    with hugepages.mounted() as mount:
        assert hugepages.is_mounted(mount) and os.statvfs(mount).f_bsize == 2 << 20
    assert not hugepages.is_mounted(mount) and not os.path.exists(mount)


@root
def test_a_sigterm_unmounts_the_private_mount(monkeypatch):
    monkeypatch.setattr(hugepages, "existing_mount", lambda size: None)
    with pytest.raises(signals.Stopped), signals.stopping(), hugepages.mounted() as mount:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
    assert not hugepages.is_mounted(mount) and not os.path.exists(mount)


def _fake_run_one(ran):
    def run_one(case, mode, hugetlbfs=None, cost=None, budget=None):
        ran.append((case.name, mode, hugetlbfs))
        side = dict.fromkeys(qemu_bench.FIELDS, 1)
        scale = {"scale": 0.1, "limit": "cost", "own-share": 0.01, "real-time-s": 1.0}
        return {"name": case.name, "mode": mode, "qemu": side, "emulator": side,
                "time-scale": scale}, "7.2.22"
    return run_one


def test_bench_qemu_skips_the_2mib_scenarios_in_one_line_where_it_cannot(monkeypatch, capsys):
    monkeypatch.setattr(qemu_bench, "available", lambda: None)
    ran = []

    def no_mount(size=hugepages.SIZE):
        raise hugepages.HugepagesError("no writable hugetlbfs mount of 2 MiB pages, and "
                                       "mounting one needs root")

    monkeypatch.setattr(qemu_bench, "run_one", _fake_run_one(ran))
    monkeypatch.setattr(qemu_bench.timescale, "machine_cost", lambda: None)  # no calibration
    monkeypatch.setattr(hugepages, "mounted", no_mount)
    assert qemu_bench.main(quick=True, as_json=False) == 0
    out, err = capsys.readouterr()
    assert ran and all(" 2M " not in name for name, _, _ in ran)
    assert err.splitlines()[-1] == ("2 MiB huge pages: no writable hugetlbfs mount of 2 MiB "
                                    "pages, and mounting one needs root; their scenarios "
                                    "skipped")
    assert out.rstrip().endswith("their scenarios skipped")


def test_each_2mib_run_has_its_pages_and_those_done_stay_if_the_pool_runs_out(
        tmp_path, monkeypatch):
    pool = FakePool(tmp_path, monkeypatch, nr=0, free=0, resv=0, kernel_can_find=64)
    ran, case = [], qemu_bench.Case("stride", 64 << 20, 0, page_size=2 << 20)

    @contextmanager
    def mount(size=hugepages.SIZE):
        yield "/mnt/huge"

    def run_one(case, mode, hugetlbfs=None, cost=None, budget=None):
        assert hugepages.available() == 64  # two QEMUs' 64 MiB, added for this run
        pool.kernel_can_find = 0  # and then the machine has no more
        return _fake_run_one(ran)(case, mode, hugetlbfs)

    monkeypatch.setattr(hugepages, "mounted", mount)
    monkeypatch.setattr(qemu_bench, "run_one", run_one)
    scenarios, version, skipped = qemu_bench.run_huge([case])
    assert [s["mode"] for s in scenarios] == ["vanilla"] and version == "7.2.22"
    assert ran == [(case.name, "vanilla", "/mnt/huge")] and "it found 0" in skipped
    assert pool.get("nr") == 0


def _our_mounts() -> set[str]:
    with open(hugepages.MOUNTS) as f:
        return {line.split()[1] for line in f if "pce-hugetlbfs-" in line}


@root
@pytest.mark.skipif(available() is not None, reason=str(available()))
@pytest.mark.timeout(60)
def test_sigterm_during_a_2mib_migration_undoes_the_mount_and_the_pool():
    counter = f"{hugepages.pool()}/nr_hugepages"
    before, mounts = int(open(counter).read()), _our_mounts()
    child = subprocess.Popen([sys.executable, "-m", "emu.qemu", "--hugepages", "--ram", "32MiB",
                              "--bandwidth", "50MB/s", "--mode", "preempt"],
                             cwd=os.path.dirname(os.path.dirname(__file__)),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while _our_mounts() == mounts and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(1.0)  # its pages added and both QEMUs started, in the migration
    child.send_signal(signal.SIGTERM)
    out, err = child.communicate(timeout=30)
    assert child.returncode == 128 + signal.SIGTERM, err
    assert "everything undone" in err
    assert _our_mounts() == mounts and int(open(counter).read()) == before
