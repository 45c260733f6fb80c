"""The kernel path's own cost per fault, next to the emulated backend's (issue 15, item 4).

    python bench/uffd_cost.py [--faults 2000] [--huge-faults 64] [--reserve-huge] [--gil]

No network: a vCPU thread touches missing pages one after another, and a fault thread places
each page as soon as it hears of it. Latency is block to wake as the vCPU sees it
(perf_counter_ns around its access), in real microseconds.
- userfaultfd: the vCPU's load (ctypes.memmove, GIL released) faults in the kernel; the fault
  thread reads the uffd_msg (poll + read), places the page with UFFDIO_COPY, which wakes the
  vCPU. The fault thread in the vCPU's process (they share the GIL), or in a process of its own
  (the descriptor passed over SCM_RIGHTS). 4 KiB pages on a memfd; 2 MiB pages on hugetlbfs
  when huge pages are free (--reserve-huge, as root: reserved for the run, then given back).
- emulated: what the destination does today: DestMemory.first_missing() (a numpy check of the
  state array), a queue to the fault thread, Placer.request(), Placer.receive() placing the
  page with numpy and notify_all() on its Condition, the vCPU in Placer.wait_present().
Then what a touch costs when nothing faults, and (--gil) which ways of touching memory let the
other threads run while a vCPU sleeps in the kernel.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import multiprocessing
import os
import queue
import signal
import sys
import threading
import time
from multiprocessing import reduction
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this tree's emu

from emu import uffd as U  # noqa: E402
from emu.migration.fault_thread import DestMemory  # noqa: E402
from emu.migration.placement import MAIN, Placer  # noqa: E402
from emu.migration.wire import RamRecord  # noqa: E402

PAGE = U.PAGE
HUGE = 2 << 20
SPAWN = multiprocessing.get_context("spawn")


def summary(ns: list[int]) -> dict:
    us = np.asarray(ns, np.float64) / 1000
    return {"n": len(us), "median": float(np.median(us)), "mean": float(us.mean()),
            "p99": float(np.percentile(us, 99))}


def row(name: str, s: dict) -> None:
    print(f"  {name:52s} {s['n']:6d} {s['median']:10.3f} {s['mean']:10.3f} {s['p99']:10.3f}")


def header(title: str) -> None:
    print(f"\n{title}\n  {'':52s} {'n':>6s} {'median us':>10s} {'mean us':>10s} {'p99 us':>10s}")


# ---- userfaultfd ----

def _vcpu(region: U.Region, count: int, page: int) -> list[int]:
    """Touch `count` missing pages in order, each a fault; block-to-wake times in ns."""
    times, clock, load = [], time.perf_counter_ns, U.read
    for i in range(count):
        t0 = clock()
        load(region.addr + i * page)
        times.append(clock() - t0)
    return times


def _serve(ufd: U.Userfaultfd, page: int, stop, copies: list[int] | None = None) -> None:
    """The fault thread: read faults, UFFDIO_COPY each page from a temporary page."""
    tmp = np.full(page, 0x5A, np.uint8)
    src, clock = tmp.ctypes.data, time.perf_counter_ns
    while not stop.is_set():
        for fault in ufd.faults(0.05):
            t0 = clock()
            ufd.copy(fault.address & ~(page - 1), src, page)
            if copies is not None:
                copies.append(clock() - t0)


def _serve_process(conn, page: int, stop) -> None:
    with U.Userfaultfd.adopt(reduction.recv_handle(conn)) as ufd:
        conn.send("ready")
        _serve(ufd, page, stop)


def _region(page: int, count: int) -> U.Region:
    if page == PAGE:
        return U.Region.memfd(count * page)
    return U.Region.hugetlb(count * page, page)


def uffd_in_process(page: int, count: int) -> tuple[dict, dict]:
    feature = U.UFFD_FEATURE_MISSING_HUGETLBFS if page > PAGE else U.UFFD_FEATURE_MISSING_SHMEM
    with _region(page, count) as region, U.Userfaultfd(feature) as ufd:
        region.discard()
        region.register(ufd)
        stop, copies = threading.Event(), []
        server = threading.Thread(target=_serve, args=(ufd, page, stop, copies), daemon=True)
        server.start()
        times = _vcpu(region, count, page)
        stop.set()
        ufd.interrupt()
        server.join()
    return summary(times), summary(copies)


def uffd_other_process(page: int, count: int) -> dict:
    feature = U.UFFD_FEATURE_MISSING_HUGETLBFS if page > PAGE else U.UFFD_FEATURE_MISSING_SHMEM
    with _region(page, count) as region, U.Userfaultfd(feature) as ufd:
        region.discard()
        region.register(ufd)
        here, there = SPAWN.Pipe()
        stop = SPAWN.Event()
        proc = SPAWN.Process(target=_serve_process, args=(there, page, stop))
        proc.start()
        there.close()  # the child's end: if the child dies, recv() here ends
        try:
            reduction.send_handle(here, ufd.fd, proc.pid)
            if not here.poll(60) or here.recv() != "ready":
                raise RuntimeError("the fault process did not start")
            times = _vcpu(region, count, page)
        finally:
            stop.set()
            proc.join(30)
            here.close()
    return summary(times)


# ---- the emulated backend, as emu/migration/fault_thread.py and placement.py do it ----

def emulated(page: int, count: int) -> dict:
    tpp = page // PAGE
    states = np.zeros(count, np.uint8)
    ram = np.zeros((count * tpp, PAGE), np.uint8)
    placer = Placer(states, ram, page)
    placer.postcopy = True
    memory = SimpleNamespace(states=states, tpp=tpp)  # what DestMemory.first_missing reads
    faults: queue.SimpleQueue = queue.SimpleQueue()
    stop = threading.Event()
    data = memoryview(np.full(page, 0x5A, np.uint8))

    def fault_thread():  # FaultThread._run, placing at once instead of asking
        while (host := faults.get()) is not None:
            if placer.request(host):
                placer.receive(MAIN, RamRecord(host * page, tpp, 0, data))

    server = threading.Thread(target=fault_thread, daemon=True)
    server.start()
    times, clock = [], time.perf_counter_ns
    for host in range(count):
        t0 = clock()
        if DestMemory.first_missing(memory, np.array([host * tpp])) == 0:
            faults.put(host)  # FaultThread.fault()
            placer.wait_present(host, stop)
        times.append(clock() - t0)
    faults.put(None)
    server.join()
    return summary(times)


# ---- touches that do not fault ----

def present_costs(count: int = 4096, reps: int = 20) -> list[tuple[str, dict]]:
    region = U.Region.memfd(count * PAGE)
    ram = np.ndarray((count, PAGE), np.uint8, buffer=region.mm)
    ram[:] = 1  # every page present
    states = np.full(count, 3, np.uint8)
    memory = SimpleNamespace(states=states, tpp=1)
    pages = np.random.default_rng(1).integers(0, count, count)
    clock, out = time.perf_counter_ns, []

    def per_touch(fn) -> dict:
        samples = []
        for _ in range(reps):
            t0 = clock()
            fn()
            samples.append((clock() - t0) / count)
        return summary(samples)

    addrs = [region.addr + int(p) * PAGE for p in pages]
    out.append(("uffd: touch() (ctypes store, GIL released)",
                 per_touch(lambda: [U.touch(a, 2) for a in addrs])))
    out.append(("uffd: read() (ctypes load, GIL released)",
                 per_touch(lambda: [U.read(a) for a in addrs])))
    out.append(("emulated: first_missing, batch of 4096",
                 per_touch(lambda: DestMemory.first_missing(memory, pages))))
    one = [np.array([p]) for p in pages]
    out.append(("emulated: first_missing, batch of 1",
                 per_touch(lambda: [DestMemory.first_missing(memory, b) for b in one])))

    def ab() -> None:  # Workload._write of the ab pattern
        ram[pages, 0] += 1
    out.append(("emulated: numpy write, batch of 4096 (ab pattern)", per_touch(ab)))
    ram = None  # the view goes before its mapping  # noqa: F841
    region.close()
    return out


# ---- which accesses let the other threads run ----

ACCESSES = {
    "ctypes.memmove load (uffd.read)": lambda a, mm, o: U.read(a + o),
    "ctypes.memmove store (uffd.touch)": lambda a, mm, o: U.touch(a + o, 1),
    "ctypes.string_at": lambda a, mm, o: ctypes.string_at(a + o, 1),
    "ctypes.c_uint8.from_address().value":
        lambda a, mm, o: ctypes.c_uint8.from_address(a + o).value,
    "memoryview / mmap slice": lambda a, mm, o: mm[o:o + 1],
    "numpy scalar read": lambda a, mm, o: np.frombuffer(mm, np.uint8)[o],
    "numpy copy of 64 bytes": lambda a, mm, o: np.frombuffer(mm, np.uint8)[o:o + 64].copy(),
    "numpy copy of 4096 bytes": lambda a, mm, o: np.frombuffer(mm, np.uint8)[o:o + PAGE].copy(),
    "numpy fancy-index write (workload ab)":
        lambda a, mm, o: np.frombuffer(mm, np.uint8).reshape(-1, PAGE).__setitem__(
            ([o // PAGE], 0), 1),
    "numpy add.at (workload random)":
        lambda a, mm, o: np.add.at(np.frombuffer(mm, np.uint8).reshape(-1, PAGE)[:, 0],
                                   [o // PAGE], 1),
}
DEADLINE = 2.0  # seconds the handler waits for a word from the faulting process's main thread


def _resolver(conn, deadline: float) -> None:
    """Another process: on each fault, tell the faulting process and wait for its main thread
    to answer; place the page then (GIL free there), or at the deadline (GIL held)."""
    with U.Userfaultfd.adopt(reduction.recv_handle(conn)) as ufd:
        tmp = np.zeros(PAGE, np.uint8)
        for _ in ACCESSES:
            fault = ufd.faults(30)[0]
            conn.send("faulted")
            answered = conn.poll(deadline)
            if answered:
                conn.recv()
            ufd.copy(fault.address, tmp.ctypes.data, PAGE)
            conn.send(answered)
            if not answered:
                conn.recv()  # the word that came too late


def gil_survey() -> None:
    print("\nWhile a vCPU thread sleeps in the kernel on a missing page, can this process's other"
          "\nthreads run? (resolved by another process, once the main thread here answers)")
    with U.Region.memfd(len(ACCESSES) * 4 * PAGE) as region, U.Userfaultfd() as ufd:
        region.discard()
        region.register(ufd)
        here, there = SPAWN.Pipe()
        proc = SPAWN.Process(target=_resolver, args=(there, DEADLINE))
        proc.start()
        there.close()
        reduction.send_handle(here, ufd.fd, proc.pid)
        for i, (name, access) in enumerate(ACCESSES.items()):
            off = i * 4 * PAGE
            vcpu = threading.Thread(target=access, args=(region.addr, region.mm, off))
            vcpu.start()
            assert here.recv() == "faulted"
            here.send("running")  # only if this thread got the GIL while the vCPU sleeps
            free = here.recv()
            vcpu.join()
            print(f"  {name:42s} {'others run (GIL released)' if free else 'GIL HELD: all stop'}")
        proc.join(30)
        here.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faults", type=int, default=2000, help="4 KiB faults per measure")
    parser.add_argument("--huge-faults", type=int, default=64, help="2 MiB faults per measure")
    parser.add_argument("--reserve-huge", action="store_true",
                        help="as root, reserve the 2 MiB pages for the run (given back after)")
    parser.add_argument("--gil", action="store_true", help="also survey the ways of touching")
    args = parser.parse_args()
    # a kill (timeout(1), Ctrl-C) still gives back the huge pages reserved for the run
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    if why := U.probe():
        sys.exit(why)
    print(f"Linux {os.uname().release}, Python {sys.version.split()[0]}, numpy {np.__version__}, "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}")
    header("Per fault, block to wake, no network (4 KiB pages)")
    vcpu, copies = uffd_in_process(PAGE, args.faults)
    row("userfaultfd, fault thread in the vCPU's process", vcpu)
    row("  of which UFFDIO_COPY (the fault thread's ioctl)", copies)
    row("userfaultfd, fault thread in another process", uffd_other_process(PAGE, args.faults))
    row("emulated (state array + Condition)", emulated(PAGE, args.faults))
    huge(args)
    header("Per touch, page present (no fault)")
    for name, s in present_costs():
        row(name, s)
    if args.gil:
        gil_survey()


def huge(args) -> None:
    header("Per fault, block to wake, no network (2 MiB pages)")
    n = args.huge_faults
    if HUGE not in U.huge_page_sizes():
        print("  no 2 MiB huge pages on this machine")
        return
    try:
        if U.huge_pages_free(HUGE) >= n:
            reserved = contextlib.nullcontext()
        elif args.reserve_huge:
            reserved = U.reserved_huge_pages(n, HUGE)
        else:
            print(f"  skipped: {n} free 2 MiB pages needed, {U.huge_pages_free(HUGE)} free "
                  f"(--reserve-huge as root reserves them for the run)")
            return
        with reserved:
            vcpu, copies = uffd_in_process(HUGE, n)
            row("userfaultfd, fault thread in the vCPU's process", vcpu)
            row("  of which UFFDIO_COPY (the fault thread's ioctl)", copies)
            row("userfaultfd, fault thread in another process", uffd_other_process(HUGE, n))
    except U.HugePagesUnavailable as why:
        print(f"  {why}")
    row("emulated (state array + Condition)", emulated(HUGE, n))


if __name__ == "__main__":
    main()
