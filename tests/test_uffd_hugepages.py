"""emulator.backend=userfaultfd on huge pages (issue 15 item 2): the destination's guest RAM is
a hugetlb memfd, faults and placements are whole huge pages, zero pages are copies of a zero
huge page; where the machine has too few huge pages free, one line says how many are needed
and how to reserve them, exit 2, before anything exists.

The migrations need 2 MiB pages free: the fixture reserves what is missing (as root, if the
kernel finds them: memory may be too fragmented) and puts nr_hugepages back afterwards."""

import errno
import multiprocessing
import os

import numpy as np
import pytest

from emu import cli, engines, shm
from emu import uffd as U
from emu.config import ConfigError
from emu.controller import migrate
from emu.migration import ram as R
from emu.migration.uffd_backend import Kernel
from tests.conftest import PATIENCE, config
from tests.test_cleanup import SLOW, alive, own_tmpdir, segments, start_cli, wait_for  # noqa: F401
from tests.test_migration import assert_postcopy
from tests.test_qmp_migration import where  # noqa: F401
from tests.test_uffd import in_thread, next_fault, no_deadlock, pattern  # noqa: F401
from tests.test_uffd_backend import (
    KERNEL,
    KERNEL_TRACES,
    assert_through_the_kernel,
    needs_uffd,
    traced,
)

HUGE = 2 << 20
GUEST = 32 << 20  # 16 huge pages
HUGE_SETS = {"guest__page_size": "2MiB", "guest__ram": "32MiB"}


def _free_pages() -> int:
    """free_hugepages itself (not less the reserved ones): what is not in any file."""
    with open(f"{U.HUGEPAGES}/hugepages-{HUGE >> 10}kB/free_hugepages") as f:
        return int(f.read())


@pytest.fixture
def huge_pages():
    """GUEST's worth of 2 MiB pages free for the test, reserved if need be and given back."""
    if HUGE not in U.huge_page_sizes():
        pytest.skip("no 2 MiB huge pages on this machine")
    need = GUEST // HUGE
    if U.huge_pages_free(HUGE) < need and os.geteuid() != 0:
        pytest.skip(f"{need} free 2 MiB pages needed, and only root may reserve them")
    if shm.room()[1] < 8 * GUEST:
        pytest.skip("too little memory available to reserve huge pages")
    reserve = U.reserved_huge_pages(need, HUGE)
    try:
        reserve.__enter__()
    except U.HugePagesUnavailable as err:  # put back already, by the context manager
        pytest.skip(str(err))
    try:
        yield
    finally:
        reserve.__exit__(None, None, None)


# ---- the destination's RAM on huge pages (emu/migration/uffd_backend.py) ----

@needs_uffd
@pytest.mark.usefixtures("huge_pages", "no_deadlock")
def test_listen_drops_discarded_huge_pages_and_places_them_whole():
    """Four huge pages, 0 received in precopy, 2 received and discarded, 1 and 3 never
    received (holes in the file, as the memfd starts): at LISTEN page 2 is punched out and
    1 and 3 keep the reservations their mapping holds; a load in page 2 faults at the huge
    page's start, a UFFDIO_COPY of the whole page wakes it, and a zero page is a copy of the
    zero huge page (hugetlbfs has no UFFDIO_ZEROPAGE)."""
    with U.Region.hugetlb(4 * HUGE, HUGE) as region:
        view = memoryview(region.mm)
        for page in (0, 2):  # received in precopy
            view[page * HUGE:(page + 1) * HUGE] = b"\1" * HUGE
        k = Kernel(view, HUGE)
        try:
            available = U.huge_pages_free(HUGE)
            k.listen(np.array([R.PRECOPY, R.MISSING, R.DISCARDED, R.MISSING], np.uint8))
            assert U.huge_pages_free(HUGE) == available + 1  # page 2's, and only it
            assert U.read(k.address(0) + HUGE - 1) == 1  # kept: no fault
            _, out, done = in_thread(U.load, k.address(2) + HUGE - 8, 8)
            fault = next_fault(k.uffd)
            assert fault.address == k.address(2) and not done.is_set()
            data = np.frombuffer(pattern(5, 2 * HUGE), np.uint8)
            k.place(1, np.array([False, True]), data)  # host page 2 only, whole
            assert done.wait(PATIENCE) and out["value"] == data[-8:].tobytes()
            k.place(3, np.array([True]), None)
            assert bytes(view[3 * HUGE:]) == bytes(HUGE)
            _, out, done = in_thread(U.load, k.address(1), 8)  # a hole faults as well
            assert next_fault(k.uffd).address == k.address(1)
            k.place(1, np.array([True]), data[:HUGE])
            assert done.wait(PATIENCE) and out["value"] == data[:8].tobytes()
        finally:
            k.close()
            view.release()


@needs_uffd
@pytest.mark.usefixtures("huge_pages")
def test_zero_huge_pages_need_no_spare_page_from_the_pool():
    """Guest RAM holding every free huge page, page 0 received then discarded (punched out at
    LISTEN, its reservation gone with it), each placed as a zero page: the zero page is in
    memory (written), so UFFDIO_COPY needs no temporary huge page from the pool (ENOMEM when
    guest RAM holds every free one)."""
    count = U.huge_pages_free(HUGE)
    with U.Region.hugetlb(count * HUGE, HUGE) as region:
        view = memoryview(region.mm)
        view[:HUGE] = b"\1" * HUGE
        k = Kernel(view, HUGE)
        try:
            states = np.full(count, R.MISSING, np.uint8)
            states[0] = R.DISCARDED
            k.listen(states)
            assert U.huge_pages_free(HUGE) == 1  # page 0's, free and no longer reserved
            k.place(0, np.ones(count, bool), None)
            assert not np.frombuffer(view, np.uint8).any()
        finally:
            k.close()
            view.release()


@needs_uffd
def test_the_probe_needs_one_free_gigantic_page_only():
    """A 1 GiB guest on one free 1 GiB page: the probe's UFFDIO_COPY source is written whole,
    so the kernel needs no second page to copy through (it would here: ENOMEM)."""
    giant = 1 << 30
    if giant not in U.huge_page_sizes() or os.geteuid() != 0 or shm.room()[1] < 4 * giant:
        pytest.skip("no 1 GiB pages here, or not root, or too little memory to reserve one")
    if U.huge_pages_free(giant) > 1:
        pytest.skip("more than one 1 GiB page free: the probe would find a second")
    try:
        with U.reserved_huge_pages(1, giant):
            assert U.probe(giant) is None
    except U.HugePagesUnavailable as err:
        pytest.skip(str(err))


# ---- whole migrations ----

def _run_on_huge_pages(**sets):
    """A migration on 2 MiB pages through the kernel, and how many huge pages were in guest
    RAM at its end, before its processes went."""
    before = _free_pages()
    used = []
    result = migrate(config(**{**KERNEL, **HUGE_SETS, **sets}), None, (), 0.05, KERNEL_TRACES,
                     lambda _run: used.append(before - _free_pages()))
    assert _free_pages() == before, "huge pages still held after the run"
    return result, used[0]


@needs_uffd
@pytest.mark.usefixtures("huge_pages")
@pytest.mark.parametrize("preempt", ["false", "true"])
def test_vanilla_and_preempt_on_huge_pages(preempt):
    result, used = _run_on_huge_pages(workload__pattern="random",
                                      migration__postcopy_preempt=preempt)
    assert_postcopy(result)
    assert_through_the_kernel(result)
    assert used == GUEST // HUGE  # the destination's RAM was the hugetlb file, all placed
    assert all(e["fields"]["length"] % HUGE == 0
               for e in traced(result, "postcopy_ram_discard_range"))
    assert result["integrity"]["ok"] and "content" in result["integrity"]["checked"]
    on_preempt = result["latency"]["by-channel"]["preempt"]["count"]
    assert on_preempt > 0 if preempt == "true" else on_preempt == 0


@needs_uffd
@pytest.mark.usefixtures("huge_pages")
def test_zero_huge_pages_are_copies_of_a_zero_page():
    """A quarter populated guest: most huge pages are all zeros, placed as copies of the zero
    huge page, and read back as zeros by the memory check."""
    result, _ = _run_on_huge_pages(guest__populated="0.25", workload__pattern="random")
    assert_postcopy(result)
    assert result["integrity"]["ok"] and "content" in result["integrity"]["checked"]


@needs_uffd
@pytest.mark.usefixtures("huge_pages")
def test_a_killed_controller_leaves_no_huge_pages_held(own_tmpdir):  # noqa: F811
    """kill -9 of `postcopy-emu run` on huge pages: its children go (the janitor unlinks the
    /dev/shm segments; the memfd has no name to unlink), and with the last of them every huge
    page of guest RAM, reserved or placed, is back in the pool."""
    available = U.huge_pages_free(HUGE)
    proc, kids = start_cli(*SLOW, "--set", "emulator.backend=userfaultfd",
                           "--set", "guest.page-size=2MiB", "--set", "guest.ram=32MiB",
                           env={**os.environ, "TMPDIR": own_tmpdir})
    assert U.huge_pages_free(HUGE) == available - GUEST // HUGE  # reserved by the mapping
    proc.kill()
    proc.communicate(timeout=PATIENCE)
    assert wait_for(lambda: not any(alive(k) for k in kids)), "orphaned emulator processes"
    assert wait_for(lambda: not segments(proc.pid)), "segments left in /dev/shm"
    assert wait_for(lambda: U.huge_pages_free(HUGE) == available), "huge pages still held"


# ---- too few huge pages: one line, before anything exists ----

def _left_behind(before: set[str]) -> list[str]:
    """/dev/shm segments and files on hugetlbfs mounts that were not there before."""
    found = set(os.listdir(shm.SHM_DIR))
    with open("/proc/mounts") as f:
        for line in f:
            where, kind = line.split()[1:3]
            if kind == "hugetlbfs" and os.path.isdir(where):
                found |= {os.path.join(where, n) for n in os.listdir(where)}
    return sorted(n for n in found - before if n.startswith(("pce_", "/")))


@needs_uffd
@pytest.mark.parametrize("page, ram, counter", [
    ("2MiB", "32MiB", "/proc/sys/vm/nr_hugepages"),
    ("1GiB", "1GiB", "/sys/kernel/mm/hugepages/hugepages-1048576kB/nr_hugepages")])
def test_too_few_huge_pages_is_one_line_and_exit_2(monkeypatch, capsys, page, ram, counter):
    size = {"2MiB": HUGE, "1GiB": 1 << 30}[page]
    if size not in U.huge_page_sizes():
        pytest.skip(f"no {page} huge pages on this machine")
    monkeypatch.setattr(U, "huge_pages_free", lambda page_size: 3 if page == "2MiB" else 0)
    with open(counter) as f:
        total = int(f.read())
    need = (32 if page == "2MiB" else 1024) // {"2MiB": 2, "1GiB": 1024}[page]
    before = _left_behind(set())
    code = cli.main(["run", "--json", "--set", "emulator.backend=userfaultfd",
                     "--set", f"guest.page-size={page}", "--set", f"guest.ram={ram}",
                     "--set", "emulator.time-scale=0.25"])
    [line] = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    free = 3 if page == "2MiB" else 0
    assert line.startswith("postcopy-emu: emulator.backend=userfaultfd: guest RAM of "), line
    assert f"needs {need} free, {free} are" in line, line
    assert f"`echo {total + need - free} > {counter}`" in line, line
    assert _left_behind(set(before)) == []
    assert not multiprocessing.active_children()


@needs_uffd
def test_huge_pages_taken_meanwhile_fail_in_one_line_with_nothing_left(monkeypatch):
    """The pages counted free are gone when guest RAM is made (another program took them):
    the mapping's reservation fails, and Shared says so as a setting would, having unlinked
    the segments it had made."""
    if HUGE not in U.huge_page_sizes() or U.huge_pages_free(HUGE) > 0 or \
            open("/proc/sys/vm/nr_overcommit_hugepages").read().strip() != "0":
        pytest.skip("2 MiB pages free (or overcommitted) here: the reservation would work")
    monkeypatch.setattr(engines, "check_backend", lambda cfg, roles: None)
    before = _left_behind(set())
    cfg = config(emulator__backend="userfaultfd", **HUGE_SETS)
    with pytest.raises(ConfigError) as err:
        engines.Shared(cfg, engines.ROLES)
    assert str(err.value).startswith("emulator.backend=userfaultfd: guest RAM of 32 MiB")
    assert "\n" not in str(err.value)
    assert _left_behind(set(before)) == []


def test_no_hugetlb_memfd_and_no_mount_says_how_to_mount_one(monkeypatch):
    """A kernel before 4.14 (memfd_create refuses MFD_HUGETLB with EINVAL) and no hugetlbfs
    mounted: one line with the mount command."""
    if HUGE not in U.huge_page_sizes():
        pytest.skip("no 2 MiB huge pages on this machine")

    def refused(*args):
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(os, "memfd_create", refused)
    monkeypatch.setattr(U, "hugetlbfs_mount", lambda page_size: None)
    with pytest.raises(U.HugePagesUnavailable) as err:
        U.Region.hugetlb(HUGE, HUGE)
    assert "mount -t hugetlbfs -o pagesize=2048K none /dev/hugepages" in str(err.value)
    assert "\n" not in str(err.value)


def test_huge_pages_are_a_setting_userfaultfd_takes():
    """Only the machine can refuse them (when a run starts); the configuration does not."""
    cfg = config(emulator__backend="userfaultfd", **HUGE_SETS)
    assert engines.huge_page(cfg) == HUGE
    emulated = config(emulator__backend="emulated", **HUGE_SETS)
    assert engines.huge_page(emulated) == 0  # RAM in /dev/shm


@needs_uffd
@pytest.mark.usefixtures("huge_pages")
def test_qmp_driven_preempt_on_huge_pages(where, monkeypatch):  # noqa: F811
    """The standalone programs over QMP, the destination program's RAM a hugetlb memfd its
    child opens by the program's /proc path: the same commands, x-query-integrity."""
    from tests import test_qmp_migration as Q

    monkeypatch.setattr(Q, "SETS", [*Q.SETS, "emulator.backend=userfaultfd",
                                     "guest.page-size=2MiB"])
    incoming = f"unix:{where[0]}/mig.sock"
    src, dst, _ = Q.pair(where, incoming, via_link=False)
    s, d = src.client, dst.client
    d.cmd("migrate-incoming", uri=incoming)
    s.cmd("migrate", uri=incoming)
    assert Q.statuses(s, "active") == ["setup", "active"]
    s.cmd("migrate-start-postcopy")
    assert Q.statuses(s, "completed") == ["device", "postcopy-active", "completed"]
    assert Q.statuses(d, "completed")[-2:] == ["postcopy-active", "completed"]
    assert d.cmd("x-query-integrity")["ok"], d.cmd("x-query-integrity")
    assert s.cmd("query-migrate")["ram"]["postcopy-requests"] > 0
    Q.finish(where, where[1])
