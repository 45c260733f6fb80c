"""emulator.backend=userfaultfd (issue 15): whole migrations whose destination vCPUs fault in
the kernel, as under QEMU; the same figures and checks as the emulated backend; the probe's
one line where the kernel refuses. Skipped, with the probe's reason, where it does."""

import multiprocessing
import os

import numpy as np
import pytest

from emu import cli
from emu import uffd as U
from emu.controller import migrate
from emu.faults import parse
from emu.migration import ram as R
from emu.migration import wire
from emu.migration.uffd_backend import Kernel
from tests.conftest import PATIENCE, config
from tests.test_device_state import UP_TO_LISTEN
from tests.test_migration import assert_postcopy
from tests.test_qmp_migration import where  # noqa: F401
from tests.test_recovery import assert_recovered, statuses
from tests.test_uffd import in_thread, next_fault, no_deadlock, pattern  # noqa: F401
from tests.wire_peer import closed, destination, peer

REASON = U.probe()
needs_uffd = pytest.mark.skipif(REASON is not None, reason=REASON or "")
KERNEL = {"emulator__backend": "userfaultfd"}
# what shows the pages went through the kernel: RAM dropped and registered at LISTEN
KERNEL_TRACES = ("postcopy_ram_discard_range", "postcopy_ram_enable_notify",
                 "postcopy_cleanup_range")


# ---- the destination's RAM under the kernel (emu/migration/uffd_backend.py) ----

@pytest.fixture
def kernel():
    """Eight pages of shared memory, pages 0 and 1 received in precopy, the rest not."""
    fds = set(os.listdir("/proc/self/fd"))
    region = U.Region.memfd(8 * U.PAGE)
    view = memoryview(region.mm)
    view[:] = b"\1" * len(view)  # every page in the file, as posix_fallocate and writes leave it
    k = Kernel(view, U.PAGE)
    states = np.array([R.PRECOPY] * 2 + [R.MISSING] * 6, np.uint8)
    k.listen(states)
    yield k, view
    k.close()
    view.release()
    region.close()
    assert set(os.listdir("/proc/self/fd")) == fds, "a descriptor left open"


@needs_uffd
@pytest.mark.usefixtures("no_deadlock")
def test_listen_drops_what_is_missing_and_placement_wakes(kernel):
    k, view = kernel
    assert U.read(k.address(1)) == 1  # received in precopy: still there, no fault
    _, _, done = in_thread(U.load, k.address(5), 8)
    fault = next_fault(k.uffd)
    assert k.page_of(fault.address) == 5 and not done.is_set()
    data = np.frombuffer(pattern(7, 3 * U.PAGE), np.uint8)
    k.place(4, np.array([False, True, False]), data)  # host page 5 only
    assert done.wait(PATIENCE)
    assert bytes(view[5 * U.PAGE:6 * U.PAGE]) == data[U.PAGE:2 * U.PAGE].tobytes()
    k.place(6, np.array([True]), None)  # UFFDIO_ZEROPAGE
    assert bytes(view[6 * U.PAGE:7 * U.PAGE]) == bytes(U.PAGE)


@needs_uffd
@pytest.mark.usefixtures("no_deadlock")
def test_release_wakes_a_vcpu_asleep_on_a_page_that_never_comes(kernel):
    """A failed migration: the destination stops with a vCPU asleep in the kernel; handing
    the range back wakes it (it reads zeros), so it can be joined."""
    k, _ = kernel
    vcpu, out, done = in_thread(U.read, k.address(3))
    next_fault(k.uffd)
    k.release()
    assert done.wait(PATIENCE)
    vcpu.join(PATIENCE)
    assert out["value"] == 0


@needs_uffd
def test_a_discard_after_listen_is_refused_with_registered_ram():
    """As QEMU ("CMD_POSTCOPY_RAM_DISCARD in wrong postcopy state"): dropping pages under
    registered RAM could pull one from under a vCPU writing it."""
    with U.Region.memfd(64 << 10) as region:
        ram = memoryview(region.mm)
        with destination(ram, guest__ram="64KiB", **KERNEL) as (dst, control, path):
            sock = peer(path, *UP_TO_LISTEN, wire.discard_ranges([(0, 4096)]))
            control.wait_state("failed")
            assert control.errors[0].endswith(
                "CMD_POSTCOPY_RAM_DISCARD in wrong postcopy state (3)"), control.errors
            assert not dst.placer.kernel.registered  # handed back as the guest stopped
            assert closed(sock)
        ram.release()


# ---- whole migrations ----

def run(faults=(), recover_after=0.05, **sets):
    return migrate(config(**{**KERNEL, **sets}), None, [parse(f) for f in faults],
                   recover_after, KERNEL_TRACES)


def traced(result, name):
    return [e for e in result["events"] if e.get("trace") == name]


def assert_through_the_kernel(result):
    """RAM was dropped (the pages the destination did not hold) and registered, and handed
    back at the end; the vCPUs faulted."""
    assert traced(result, "postcopy_ram_enable_notify")
    assert sum(e["fields"]["length"] for e in traced(result, "postcopy_ram_discard_range")) > 0
    assert traced(result, "postcopy_cleanup_range")
    assert result["latency"]["count"] > 0


@needs_uffd
@pytest.mark.parametrize("preempt", ["false", "true"])
def test_vanilla_and_preempt_with_the_kernel_backend(preempt):
    result = run(workload__pattern="random", migration__postcopy_preempt=preempt)
    assert_postcopy(result)
    assert_through_the_kernel(result)
    on_preempt = result["latency"]["by-channel"]["preempt"]["count"]
    assert on_preempt > 0 if preempt == "true" else on_preempt == 0


@needs_uffd
def test_sequential_checks_what_the_kernel_placed():
    """Every value a vCPU reads back is the one its previous pass wrote, across pages placed
    by UFFDIO_COPY, with two vCPUs faulting at once."""
    result = run(workload__pattern="sequential", guest__vcpus=2)
    assert_postcopy(result)
    assert result["integrity"]["bad-touches"] == 0
    assert all(v > 0 for v in result["blocktime-ms"]["per-vcpu"])


@needs_uffd
def test_zero_pages_are_placed_with_uffdio_zeropage():
    """A quarter populated guest: most pages asked for in postcopy are zero pages, placed
    with UFFDIO_ZEROPAGE, and read back as zeros."""
    result = run(guest__populated="0.25", workload__pattern="random")
    assert_postcopy(result)
    assert "content" in result["integrity"]["checked"]


@needs_uffd
def test_preempt_beats_vanilla_with_the_kernel_backend():
    """The same ordering as with the emulated backend (tests/test_migration.py)."""
    sets = dict(workload__pattern="random", link__socket_buffer="2MiB",
                emulator__time_scale="0.2")
    vanilla = run(**sets)
    preempt = run(migration__postcopy_preempt="true", **sets)
    for result in (vanilla, preempt):
        assert_postcopy(result)
        assert result["latency"]["count"] >= 10
    assert vanilla["latency"]["avg-us"] >= 5 * preempt["latency"]["avg-us"], (
        vanilla["latency"], preempt["latency"])


@needs_uffd
def test_recovery_wakes_the_vcpus_asleep_in_the_kernel():
    """The link breaks mid-postcopy: vCPUs on missing pages sleep in the kernel while paused,
    and the pages placed after the recovery wake them; nothing is lost."""
    records = {}
    result = migrate(config(workload__pattern="ab", **KERNEL), None,
                     [parse("cut main at 30ms")], 0.05, KERNEL_TRACES,
                     lambda r: records.update(faults=r.reports["destination"]["faults"]))
    assert_recovered(result)
    assert_through_the_kernel(result)
    times = [(s["status"], s["time"]) for s in result["states"]["destination"]]
    paused = next(t for status, t in times if status == "postcopy-paused")
    resumed = next(t for status, t in times if status == "postcopy-active" and t > paused)
    faults = records["faults"]
    # blocked before the resume (before the pause, or during it: the fault that was on
    # when the link broke may have had its page already on its way) and woken after it
    asleep = (faults["time"] < resumed) & (faults["time"] + faults["latency"] > resumed)
    assert asleep.any(), f"no vCPU asleep in the kernel while paused ({paused}-{resumed} s)"


@needs_uffd
def test_a_failed_migration_does_not_hang_vcpus_asleep_in_the_kernel():
    """No recovery: the run fails at its duration limit with vCPUs asleep on pages that never
    come; stopping unregisters the range, which wakes them, and every process ends."""
    result = run(["cut main at 20ms"], None, emulator__duration_limit="300ms")
    assert result["status"] == "failed"
    assert statuses(result, "source")[-1] == "postcopy-paused"
    assert not multiprocessing.active_children()


def test_a_refused_probe_is_one_line_and_exit_2(monkeypatch, capsys):
    """Before any process or segment exists: one line saying why and what to change."""
    why = ("Userfaultfd not available: Operation not permitted (uid 1000, "
           "vm.unprivileged_userfaultfd=0): run as root, or ...; or set "
           "emulator.backend=emulated")
    monkeypatch.setattr(U, "probe", lambda huge_page=0: why)
    before = set(os.listdir("/dev/shm"))
    code = cli.main(["run", "--json", "--set", "emulator.backend=userfaultfd",
                     "--set", "guest.ram=32MiB", "--set", "emulator.time-scale=0.25"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().splitlines() == [f"postcopy-emu: emulator.backend=userfaultfd: {why}"]
    assert set(os.listdir("/dev/shm")) <= before
    assert not multiprocessing.active_children()


@needs_uffd
def test_qmp_driven_preempt_with_the_kernel_backend(request, monkeypatch):
    """The standalone programs over QMP (tests/test_qmp_migration.py), their destination on
    userfaultfd: the same commands, states, figures and x-query-integrity."""
    from tests import test_qmp_migration as Q

    monkeypatch.setattr(Q, "SETS", [*Q.SETS, "emulator.backend=userfaultfd"])
    Q.test_the_same_qmp_script_with_or_without_a_link(request.getfixturevalue("where"), False)


def _run_refused(conn, argv) -> None:
    """`postcopy-emu run` where a seccomp filter refuses userfaultfd(2), as nobody (no
    /dev/userfaultfd either): what it returns and prints."""
    import contextlib
    import io

    import emu.controller  # noqa: F401  (imported before the user can no longer read it)
    from tests.test_uffd import _forbid_userfaultfd

    cli._parser()  # and what the command line needs (--version reads the package's metadata)
    _forbid_userfaultfd()
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = cli.main(argv)
    conn.send((code, err.getvalue(), sorted(os.listdir("/dev/shm"))))


@needs_uffd
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
def test_a_machine_that_refuses_userfaultfd_says_so_in_one_line():
    from tests.test_uffd import run_child

    before = set(os.listdir("/dev/shm"))
    code, err, after = run_child(_run_refused, ["run", "--json", "--set",
                                                "emulator.backend=userfaultfd"])
    assert code == 2
    [line] = err.strip().splitlines()
    assert line.startswith("postcopy-emu: emulator.backend=userfaultfd: Userfaultfd not "
                           "available: Operation not permitted"), line
    assert "seccomp" in line and "emulator.backend=emulated" in line
    assert set(after) <= before | set(os.listdir("/dev/shm"))  # nothing made for the run


def test_no_payload_is_refused_with_the_key_to_change():
    """(Huge pages are not: tests/test_uffd_hugepages.py.)"""
    from emu.config import load_config

    with pytest.raises(Exception) as err:
        load_config(None, ["emulator.backend=userfaultfd", "guest.ram=64MiB",
                           "emulator.payload=false"])
    assert str(err.value).startswith("emulator.backend: userfaultfd")
