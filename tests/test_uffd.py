"""userfaultfd on shared memory (emu/uffd.py): the probe, and faults raised by real loads and
stores, read by a fault thread and resolved with UFFDIO_COPY / UFFDIO_ZEROPAGE, in one process
and across two, as the destination's vCPUs and fault thread will use them."""

import ctypes
import errno
import faulthandler
import mmap
import multiprocessing
import os
import threading
from multiprocessing import reduction

import numpy as np
import pytest

from emu import shm
from emu import uffd as U
from tests.conftest import PATIENCE

PAGE = U.PAGE
HUGE = 2 << 20
REASON = U.probe()
needs_uffd = pytest.mark.skipif(REASON is not None, reason=REASON or "")
SPAWN = multiprocessing.get_context("spawn")


@pytest.fixture
def no_deadlock():
    """A fault taken with the interpreter lock held would stop every thread here, pytest's
    timeout too: faulthandler's watchdog is a C thread, and ends the run with the stacks."""
    faulthandler.dump_traceback_later(PATIENCE, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture
def ram():
    """Eight missing pages of shared memory registered with a userfaultfd."""
    fds = set(os.listdir("/proc/self/fd"))
    region = U.Region.memfd(8 * PAGE)
    region.discard()
    ufd = U.Userfaultfd()
    region.register(ufd)
    yield region, ufd
    ufd.close()
    region.close()
    assert set(os.listdir("/proc/self/fd")) == fds, "a descriptor left open"


def next_fault(ufd: U.Userfaultfd) -> U.Fault:
    for _ in range(int(PATIENCE)):
        if found := ufd.faults(1.0):
            return found[0]
    raise AssertionError("no fault came")


def in_thread(fn, *args):
    """Run fn in a thread of its own (a vCPU); returns (thread, results, done event)."""
    out, done = {}, threading.Event()

    def run():
        out["tid"] = threading.get_native_id()
        out["value"] = fn(*args)
        done.set()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out, done


def pattern(seed: int, size: int = PAGE) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size, np.uint8).tobytes()


# ---- the interface ----

def test_ioctl_numbers_are_the_kernel_headers():
    """As <linux/userfaultfd.h> defines them (printed by a C program on x86_64)."""
    assert (U.UFFDIO_API, U.UFFDIO_REGISTER, U.UFFDIO_UNREGISTER, U.UFFDIO_WAKE,
            U.UFFDIO_COPY, U.UFFDIO_ZEROPAGE, U.USERFAULTFD_IOC_NEW) == (
        0xC018AA3F, 0xC020AA00, 0x8010AA01, 0x8010AA02, 0xC028AA03, 0xC020AA04, 0xAA00)
    assert U.MSG.size == 32


@needs_uffd
def test_probe_passes_and_says_nothing():
    fds = set(os.listdir("/proc/self/fd"))
    assert U.probe() is None
    assert set(os.listdir("/proc/self/fd")) == fds, "the probe left a descriptor open"
    with U.Userfaultfd() as ufd:
        assert ufd.features & U.UFFD_FEATURE_MISSING_SHMEM
        if os.geteuid() == 0:
            assert ufd.how == "userfaultfd(2)"


def test_refusals_are_one_line_saying_what_to_change(monkeypatch):
    def refuse(code, user_mode_code=None):
        def call(flags):
            if flags & U.UFFD_USER_MODE_ONLY and user_mode_code:
                code_now = user_mode_code
            else:
                code_now = code
            raise OSError(code_now, f"userfaultfd(2): {os.strerror(code_now)}")
        return call
    monkeypatch.setattr(U, "_syscall", refuse(errno.ENOSYS))
    why = U.probe()
    assert why.startswith("Userfaultfd not available: Function not implemented")
    assert "CONFIG_USERFAULTFD" in why and "emulator.backend=emulated" in why
    # not root, a kernel before 5.11 (no UFFD_USER_MODE_ONLY), /dev/userfaultfd root's
    monkeypatch.setattr(U, "_syscall", refuse(errno.EPERM, errno.EINVAL))
    monkeypatch.setattr(U, "_device", refuse(errno.EACCES))
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    why = U.probe()
    assert why.startswith("Userfaultfd not available: Operation not permitted (uid 1000")
    assert "vm.unprivileged_userfaultfd=" in why and U.DEVICE in why and "root" in why
    # refused even in user mode only: a seccomp filter
    monkeypatch.setattr(U, "_syscall", refuse(errno.EPERM))
    assert "seccomp" in U.probe()
    for why in (U.probe(), U._refusal(OSError(errno.EINVAL, "userfaultfd(2): x"))):
        assert "\n" not in why and "emulator.backend=emulated" in why


def _forbid_userfaultfd() -> None:
    """A seccomp filter like a container's default profile: userfaultfd(2) fails with EPERM."""
    class SockFilter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                    ("k", ctypes.c_uint32)]

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(SockFilter))]

    prog = (SockFilter * 4)(SockFilter(0x20, 0, 0, 0),  # A = seccomp_data.nr
                            SockFilter(0x15, 0, 1, U.NR_USERFAULTFD),  # A == userfaultfd?
                            SockFilter(0x06, 0, 0, 0x00050000 | errno.EPERM),  # ERRNO(EPERM)
                            SockFilter(0x06, 0, 0, 0x7FFF0000))  # else ALLOW
    fprog = SockFprog(len(prog), prog)
    libc = ctypes.CDLL(None, use_errno=True)
    ulong = ctypes.c_ulong
    assert libc.prctl(38, ulong(1), ulong(0), ulong(0), ulong(0)) == 0  # PR_SET_NO_NEW_PRIVS
    assert libc.prctl(22, ulong(2), ctypes.byref(fprog), ulong(0), ulong(0)) == 0  # FILTER


def _probe_refused(conn) -> None:
    _forbid_userfaultfd()
    results = [U.probe()]
    if results[0] is None:
        with U.Userfaultfd() as ufd:
            results.append(ufd.how)
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)  # nobody: no /dev/userfaultfd (mode 0600), no CAP_SYS_PTRACE
    results.append(U.probe())
    conn.send(results)


def _probe_as_nobody(conn) -> None:
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
    results = [U.probe()]
    if results[0] is None:
        with U.Userfaultfd() as ufd:
            results.append(ufd.how)
    conn.send(results)


def run_child(target, *args):
    parent, child = SPAWN.Pipe()
    proc = SPAWN.Process(target=target, args=(child, *args))
    proc.start()
    child.close()  # ours: a child that dies then ends recv() here at once
    try:
        assert parent.poll(PATIENCE), "the child said nothing"
        return parent.recv()
    finally:
        proc.join(PATIENCE)
        parent.close()


@needs_uffd
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
def test_falls_back_to_the_device_then_refuses_in_one_line():
    """userfaultfd(2) refused (EPERM, as a container's seccomp profile does): root opens
    /dev/userfaultfd instead; an ordinary user, refused both, gets one line saying so."""
    results = run_child(_probe_refused)
    if os.access(U.DEVICE, os.R_OK | os.W_OK):
        assert results[:2] == [None, U.DEVICE]
    why = results[-1]
    assert why.startswith("Userfaultfd not available: Operation not permitted")
    assert "seccomp" in why and U.DEVICE in why and "\n" not in why


@needs_uffd
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
def test_an_ordinary_user_gets_user_mode_only():
    """With vm.unprivileged_userfaultfd=0 and /dev/userfaultfd root's, an ordinary user still has
    UFFD_USER_MODE_ONLY (Linux 5.11), enough for vCPUs that fault in user mode."""
    results = run_child(_probe_as_nobody)
    assert results[0] is None
    if U._sysctl() == "0" and not os.stat(U.DEVICE).st_mode & 0o006:
        assert results[1] == "userfaultfd(2) user mode only"


# ---- one process: a vCPU thread and a fault thread ----

@needs_uffd
def test_a_populated_page_never_faults_until_dropped(no_deadlock):
    with U.Region.memfd(2 * PAGE) as region, U.Userfaultfd() as ufd:
        U.store(region.addr, b"old")  # placed before registering: the page is in the file
        other = mmap.mmap(region.fd, region.size)  # a mapping nobody registered (a controller's)
        assert other[PAGE] == 0  # even a read through it puts a page in the file
        other.close()
        region.register(ufd)
        assert U.load(region.addr, 3) == b"old" and U.read(region.addr + PAGE) == 0
        assert ufd.faults(0) == []  # neither faulted
        region.discard(0, PAGE)  # fallocate(PUNCH_HOLE): missing again
        _, out, done = in_thread(U.load, region.addr, 3)
        fault = next_fault(ufd)
        assert fault.address == region.addr and not done.is_set()
        ufd.copy(fault.address, U.address(pattern(1)), PAGE)
        assert done.wait(PATIENCE) and out["value"] == pattern(1)[:3]
        region.remove(PAGE, PAGE)  # so does MADV_REMOVE
        _, out, done = in_thread(U.read, region.addr + PAGE + 5)
        fault = next_fault(ufd)
        assert fault.address == region.addr + PAGE
        ufd.zeropage(fault.address, PAGE)
        assert done.wait(PATIENCE) and out["value"] == 0


@needs_uffd
def test_a_vcpu_blocked_in_the_kernel_leaves_the_others_running(ram, no_deadlock):
    """The vCPU's load sleeps in the kernel with the interpreter lock released: this thread
    reads the fault, does Python work while the vCPU still sleeps, places the page, and the
    vCPU wakes with its bytes. A write fault and a zero page likewise."""
    region, ufd = ram
    data = pattern(2)
    _, out, done = in_thread(U.load, region.addr + 3 * PAGE + 100, 16)
    fault = next_fault(ufd)
    assert (fault.address, fault.write) == (region.addr + 3 * PAGE, False)
    assert fault.ptid == out["tid"]  # UFFD_FEATURE_THREAD_ID: which vCPU
    work = sum(i * i for i in range(100_000))  # Python runs while the vCPU sleeps
    assert work and not done.is_set()
    assert ufd.copy(fault.address, U.address(data), PAGE) == PAGE
    assert done.wait(PATIENCE) and out["value"] == data[100:116]

    _, out, done = in_thread(U.touch, region.addr + 5 * PAGE + 8, 0xDEADBEEF, 4)
    fault = next_fault(ufd)
    assert (fault.address, fault.write) == (region.addr + 5 * PAGE, True)
    assert ufd.zeropage(fault.address, PAGE) == PAGE
    assert done.wait(PATIENCE)
    assert U.read(region.addr + 5 * PAGE + 8, 4) == 0xDEADBEEF
    assert U.load(region.addr + 5 * PAGE, 8) == bytes(8)


@needs_uffd
def test_several_vcpus_on_one_page_each_fault_and_one_copy_wakes_all(ram, no_deadlock):
    region, ufd = ram
    vcpus = [in_thread(U.read, region.addr + 2 * PAGE + i, 1) for i in range(3)]
    seen = []
    while len(seen) < 3:  # one message per faulting thread: the fault thread de-duplicates
        seen += ufd.faults(PATIENCE)
    assert {f.address for f in seen} == {region.addr + 2 * PAGE}
    assert {f.ptid for f in seen} == {out["tid"] for _, out, _ in vcpus}
    data = pattern(3)
    assert ufd.copy(region.addr + 2 * PAGE, U.address(data), PAGE) == PAGE
    for i, (_, out, done) in enumerate(vcpus):
        assert done.wait(PATIENCE) and out["value"] == data[i]


@needs_uffd
def test_eexist_is_already_placed(ram, no_deadlock):
    region, ufd = ram
    first, second = pattern(4), pattern(5, 3 * PAGE)
    assert ufd.copy(region.addr + PAGE, U.address(first), PAGE) == PAGE
    assert ufd.copy(region.addr + PAGE, U.address(second), PAGE) == 0  # EEXIST
    assert ufd.zeropage(region.addr + PAGE, PAGE) == 0
    # three pages, the middle one present: the other two placed, the middle one left alone
    assert ufd.copy(region.addr, U.address(second), 3 * PAGE, page=PAGE) == 2 * PAGE
    assert U.load(region.addr, 3 * PAGE) == second[:PAGE] + first + second[2 * PAGE:]


@needs_uffd
def test_placing_without_waking_then_uffdio_wake(ram, no_deadlock):
    region, ufd = ram
    _, out, done = in_thread(U.read, region.addr + 4 * PAGE, 1)
    fault = next_fault(ufd)
    ufd.copy(fault.address, U.address(b"\x07" * PAGE), PAGE, wake=False)
    assert not done.wait(0.2), "woken although placed with UFFDIO_COPY_MODE_DONTWAKE"
    ufd.wake(fault.address, PAGE)
    assert done.wait(PATIENCE) and out["value"] == 7


@needs_uffd
def test_unregistered_ram_faults_no_more(ram, no_deadlock):
    region, ufd = ram
    ufd.unregister(region.addr, region.size)
    assert U.read(region.addr + 6 * PAGE) == 0  # shared memory fills a missing page with zeros
    assert ufd.faults(0) == []


@needs_uffd
def test_interrupt_ends_a_waiting_fault_reader(ram):
    _, ufd = ram
    _, out, done = in_thread(ufd.faults, None)
    ufd.interrupt()
    assert done.wait(PATIENCE) and out["value"] == []


# ---- two processes: vCPUs in one, the fault thread in the other ----

def _vcpu_process(conn, name: str, page: int) -> None:
    """Register this process's mapping of the segment, hand the userfaultfd over, touch."""
    region = U.Region.shm(name)
    with U.Userfaultfd() as ufd:
        region.register(ufd)
        reduction.send_handle(conn, ufd.fd, os.getppid())
        conn.send((region.addr, threading.get_native_id()))
        conn.send(U.load(region.addr + page * PAGE, 16))  # sleeps until the other places it
        U.touch(region.addr + (page + 1) * PAGE, 0x5A)  # a write fault
        conn.send("stored")
    region.close()


@pytest.fixture
def segment():
    seg = shm.create(8 * PAGE)
    U.Region.shm(seg.name).close()  # (a Region opens and closes it as a child will)
    yield seg
    seg.close()
    seg.unlink()


@needs_uffd
def test_a_fault_in_another_process_resolved_here(segment, no_deadlock):
    """The vCPU process's userfaultfd comes here over a unix socket (SCM_RIGHTS); its faults
    are read here, and UFFDIO_COPY maps pages from a buffer here into that process."""
    parent, child = SPAWN.Pipe()
    proc = SPAWN.Process(target=_vcpu_process, args=(child, segment.name, 2))
    proc.start()
    child.close()  # ours: a child that dies then ends recv() here at once
    try:
        with U.Userfaultfd.adopt(reduction.recv_handle(parent)) as ufd:
            base, tid = parent.recv()
            fault = next_fault(ufd)
            assert (fault.address, fault.write, fault.ptid) == (base + 2 * PAGE, False, tid)
            data = pattern(6)
            assert ufd.copy(fault.address, U.address(data), PAGE) == PAGE
            assert parent.recv() == data[:16]
            fault = next_fault(ufd)
            assert (fault.address, fault.write) == (base + 3 * PAGE, True)
            ufd.zeropage(fault.address, PAGE)
            assert parent.recv() == "stored"
        proc.join(PATIENCE)
        assert proc.exitcode == 0
        view = np.ndarray((8, PAGE), np.uint8, buffer=segment.buf)
        assert bytes(view[2]) == data and view[3, 0] == 0x5A  # in the segment for everyone
        del view
    finally:
        proc.join(PATIENCE)
        parent.close()


@needs_uffd
def test_placed_through_our_mapping_woken_through_theirs(segment, no_deadlock):
    """QEMU's way with a process sharing guest RAM (vhost-user, postcopy_wake_shared()): place
    the page in our own registered mapping, then UFFDIO_WAKE the other's waiter."""
    ours = U.Region.shm(segment.name)
    parent, child = SPAWN.Pipe()
    proc = SPAWN.Process(target=_vcpu_process, args=(child, segment.name, 6))
    proc.start()
    child.close()  # ours: a child that dies then ends recv() here at once
    try:
        with U.Userfaultfd() as mine, U.Userfaultfd.adopt(reduction.recv_handle(parent)) as theirs:
            ours.register(mine)
            base, _ = parent.recv()
            assert next_fault(theirs).address == base + 6 * PAGE
            data = pattern(7)
            assert mine.copy(ours.addr + 6 * PAGE, U.address(data), PAGE) == PAGE
            theirs.wake(base + 6 * PAGE, PAGE)
            assert parent.recv() == data[:16]
            assert next_fault(theirs).address == base + 7 * PAGE
            assert mine.zeropage(ours.addr + 7 * PAGE, PAGE) == PAGE
            theirs.wake(base + 7 * PAGE, PAGE)
            assert parent.recv() == "stored"
            assert U.read(ours.addr + 7 * PAGE) == 0x5A
    finally:
        proc.join(PATIENCE)
        parent.close()
        ours.close()
    assert proc.exitcode == 0


# ---- huge pages ----

def test_huge_pages_that_cannot_be_reserved_say_so():
    free = U.huge_pages_free(HUGE) if HUGE in U.huge_page_sizes() else 0
    if free > 16:
        pytest.skip(f"{free} huge pages free: reserving more than that would take them")
    with pytest.raises(U.HugePagesUnavailable) as err:
        U.Region.hugetlb((free + 1) * HUGE, HUGE)
    assert "nr_hugepages" in str(err.value) and "\n" not in str(err.value)


@pytest.fixture
def huge_page():
    """One free 2 MiB page: there already, or (PCE_RESERVE_HUGEPAGES=1, as root) reserved for
    this test and given back after it."""
    if HUGE not in U.huge_page_sizes():
        pytest.skip("no 2 MiB huge pages on this machine")
    if U.huge_pages_free(HUGE) >= 1:
        yield
    elif os.environ.get("PCE_RESERVE_HUGEPAGES") == "1" and os.geteuid() == 0:
        with U.reserved_huge_pages(1, HUGE):
            yield
    else:
        pytest.skip("no free 2 MiB huge page (echo 1 > /proc/sys/vm/nr_hugepages, or run "
                    "with PCE_RESERVE_HUGEPAGES=1 as root)")


@needs_uffd
def test_a_huge_page_fault_resolved_whole(huge_page, no_deadlock):
    assert U.probe(HUGE) is None
    with U.Region.hugetlb(HUGE, HUGE) as region, \
            U.Userfaultfd(U.UFFD_FEATURE_MISSING_HUGETLBFS) as ufd:
        assert region.huge
        region.discard()
        ioctls = region.register(ufd)
        assert not ioctls >> U._UFFDIO_ZEROPAGE & 1  # hugetlbfs: zero pages are copied
        _, out, done = in_thread(U.load, region.addr + HUGE - 8, 8)
        fault = next_fault(ufd)
        assert fault.address == region.addr  # the huge page's start (QEMU aligns it anyway)
        data = pattern(8, HUGE)
        assert ufd.copy(fault.address, U.address(data), HUGE) == HUGE
        assert done.wait(PATIENCE) and out["value"] == data[-8:]
        assert U.load(region.addr, PAGE) == data[:PAGE]
