"""One postcopy migration on real QEMU: two qemu-system-x86_64 over loopback, driven by QMP.

The destination starts with `-incoming defer`, the source boots the bench's guest (guest.py)
and once the guest has walked its region twice the source migrates to the destination,
switches to postcopy after `precopy` seconds and both wait for `completed`. Both trace their
own events (traces.py) into a private directory; the destination is then stopped and its
memory checked against what the guest wrote.

    result = run(Scenario(pattern="stride", mode="preempt", max_postcopy_bandwidth=10e6))
    result.summary()  # {"count": ..., "median-ms": ..., ...}

Every QEMU started here is killed on every way out of run(), and also if this process dies
(PR_SET_PDEATHSIG); the private directory is removed by its path.
"""

from __future__ import annotations

import bisect
import ctypes
import mmap
import os
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterable
from contextlib import ExitStack
from dataclasses import dataclass, field

import numpy as np

from emu.figures.metrics import summarize
from emu.qemu import guest, traces
from emu.qemu.env import QEMU, available, memory_shortfall
from emu.qmp.protocol import QmpClient, QmpError

MODES = ("vanilla", "preempt", "preempt-no-break-huge")
MACHINE = "pc"
BOOT_PASSES = 2  # source passes done before migrating: every page of the region is written
START_TIMEOUT = 30.0  # real seconds for a QEMU to open its monitor, and the guest to run
QMP_TIMEOUT = 60.0  # a pmemsave of the whole region takes a while on a loaded disk
QUIT_TIMEOUT = 5.0
# MigrationStatus values after which nothing more happens by itself (postcopy-paused waits
# for a migrate-recover that this harness never sends).
ENDED = ("completed", "failed", "cancelled", "postcopy-paused")
BANDWIDTH_WINDOW_MS = 100  # migration.c BUFFER_DELAY: QEMU's bandwidth and rate-limit window
# Result.phases(): a request that reaches the source this fast and then stays queued this long
# waited for something at the source (under a postcopy cap: the next rate-limit window).
WINDOW_FAST = 1e-3
WINDOW_WAIT = 10e-3


class HarnessError(RuntimeError):
    """The migration could not be run or did not complete; the message says where."""


@dataclass(frozen=True)
class Scenario:
    pattern: str = "stride"  # the guest's walk: ascending, stride, random
    mode: str = "vanilla"  # one of MODES
    ram: int = 256 << 20  # guest RAM, bytes
    max_bandwidth: int = 0  # bytes/s in precopy; 0 = unlimited (QEMU's default is 32 MiB/s)
    max_postcopy_bandwidth: int = 0  # bytes/s in postcopy; 0 = unlimited
    precopy: float = 1.0  # seconds from migrate to migrate-start-postcopy
    # The source's downtime-limit (ms): 1 so that precopy never completes by itself on
    # loopback (QEMU's 300 ms lets a 256 MiB guest finish in precopy at ~1 GB/s).
    downtime_limit: int = 1
    hugetlbfs: str | None = None  # a hugetlbfs mount to back guest RAM with (its page size)
    # Trace migration_rate_limit_pre/post too: under a postcopy cap the migration thread
    # spins through them (millions of lines) while an urgent request waits for the window.
    trace_rate_limit: bool = False
    accel: str = "tcg"
    timeout: float = 120.0  # real seconds for the migration, from migrate to completed
    verify: bool = True  # check the destination's memory image afterwards

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        guest.Walk.for_ram(self.pattern, self.ram)  # raises for a bad pattern or size

    @property
    def host_page(self) -> int:
        """The page size backing guest RAM: hugetlbfs reports its own as the block size."""
        return guest.PAGE if self.hugetlbfs is None else os.statvfs(self.hugetlbfs).f_bsize

    def capabilities(self, destination: bool) -> list[dict]:
        names = ["postcopy-ram", "events"]
        if self.mode != "vanilla":
            names.append("postcopy-preempt")
        if destination:
            names.append("postcopy-blocktime")
        return [{"capability": name, "state": True} for name in names]

    def parameters(self) -> dict:
        return {"downtime-limit": self.downtime_limit, "max-bandwidth": int(self.max_bandwidth),
                "max-postcopy-bandwidth": int(self.max_postcopy_bandwidth)}


@dataclass
class Result:
    scenario: Scenario
    version: str  # QEMU's, as its QMP greeting gives it
    trace: traces.Trace
    blocktime_ms: int | None  # the destination's query-migrate postcopy-blocktime
    touches: int | None  # guest touches on the destination from RESUME to its last fault
    window: float | None  # seconds from RESUME to that fault
    start: guest.Status  # the guest's status when the source stopped for postcopy
    end: guest.Status  # and when the destination was stopped after completion
    source: dict = field(default_factory=dict)  # the source's query-migrate at the end
    destination: dict = field(default_factory=dict)
    verified: bool = False

    @property
    def latencies(self) -> list[float]:
        """Per request, seconds from the fault thread's request to the vCPU's wake-up."""
        return self.trace.latencies()

    @property
    def progress(self) -> float | None:
        """Guest touches per second while pages were still missing."""
        if not self.touches or not self.window:
            return None
        return self.touches / self.window

    def phases(self) -> dict:
        """Where requests spend their time (medians, ms): fault thread to the source's
        return-path thread, queued at the source until the migration thread takes the page,
        and from there to the vCPU's wake-up. `waited-at-source` counts the requests that
        reached the source within WINDOW_FAST but stayed queued WINDOW_WAIT or more;
        `silent-ms` is the median, over them, of how long the destination had placed no page
        at all when the page was finally taken (the end of the wait). `already-sent` counts
        the requests the source found sent by the background stream (not in the phases)."""
        sent = sum(1 for r in self.trace.requests if r.already_sent is not None)
        reqs = [r for r in self.trace.requests if r.latency is not None
                and r.at_source is not None and r.unqueued is not None]
        if not reqs:
            return {"requests": 0, "already-sent": sent}
        waited = [r for r in reqs if r.at_source - r.fault < WINDOW_FAST
                  and r.unqueued - r.at_source >= WINDOW_WAIT]
        return {"requests": len(reqs), "already-sent": sent,
                "to-source-ms": _median_ms(r.at_source - r.fault for r in reqs),
                "queued-ms": _median_ms(r.unqueued - r.at_source for r in reqs),
                "to-woken-ms": _median_ms(r.woken - r.unqueued for r in reqs),
                "waited-at-source": len(waited),
                "waited-median-ms": _median_ms(r.unqueued - r.at_source for r in waited),
                "silent-ms": _median_ms(self._silent(r) for r in waited)}

    def _silent(self, request: traces.Request) -> float:
        """Seconds before `request` left the queue during which no page was placed."""
        placed = self.trace.placed  # in time order
        i = bisect.bisect_left(placed, request.unqueued)
        last = placed[i - 1] if i else request.at_source
        return request.unqueued - max(last, request.at_source)

    def summary(self) -> dict:
        """The bench's figures: count, median, mean, p99 (ms), blocktime (ms), progress."""
        stats = summarize(np.asarray(self.latencies))
        return {"count": stats["count"],
                "median-ms": round(stats["p50-us"] / 1e3, 3),
                "mean-ms": round(stats["avg-us"] / 1e3, 3),
                "p99-ms": round(stats["p99-us"] / 1e3, 3),
                "blocktime-ms": self.blocktime_ms,
                "progress": None if self.progress is None else round(self.progress)}


def _median_ms(values: Iterable[float]) -> float | None:
    values = list(values)
    return round(statistics.median(values) * 1e3, 3) if values else None


def run(scenario: Scenario, keep_traces: str | None = None) -> Result:
    """Run one migration; raise HarnessError if QEMU cannot run it here or it fails.
    With `keep_traces` (an existing directory), both QEMUs' trace logs are copied there as
    source.trace and destination.trace, replacing files of those names."""
    if (why := available()) is not None:
        raise HarnessError(why)
    if (why := memory_shortfall(scenario.ram, scenario.hugetlbfs)) is not None:
        raise HarnessError(why)
    walk = guest.Walk.for_ram(scenario.pattern, scenario.ram)
    with ExitStack() as stack:
        workdir = tempfile.mkdtemp(prefix="pce-qemu-")
        stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        image = os.path.join(workdir, "guest.elf")
        guest.write_image(walk, image)
        dst = stack.enter_context(Qemu("destination", scenario, image, workdir,
                                        ["-incoming", "defer"], traces.DESTINATION_EVENTS))
        events = traces.SOURCE_EVENTS + (traces.RATE_LIMIT_EVENTS if scenario.trace_rate_limit
                                         else ())
        src = stack.enter_context(Qemu("source", scenario, image, workdir,
                                        _source_options(scenario), events))
        try:
            return _migrate(scenario, walk, src, dst)
        except (QmpError, OSError) as e:  # a refused command, or a QEMU gone or hung
            raise HarnessError(_failure(e, src, dst)) from e
        finally:
            if keep_traces is not None:
                for side in (src, dst):
                    side.quit()
                    if os.path.exists(side.log):
                        shutil.copy(side.log, os.path.join(keep_traces, f"{side.name}.trace"))


def _failure(error: Exception, *sides: Qemu) -> str:
    text = f"{type(error).__name__}: {error}"
    for side in sides:
        if side.process.poll() is not None:
            text += f"; {side.name} QEMU exited ({side.process.returncode}): {side.stderr_tail()}"
    return text


def _source_options(scenario: Scenario) -> list[str]:
    if scenario.mode == "vanilla":
        return []
    on = "off" if scenario.mode == "preempt-no-break-huge" else "on"
    return ["-global", f"migration.x-postcopy-preempt-break-huge={on}"]


def _migrate(scenario: Scenario, walk: guest.Walk, src: Qemu, dst: Qemu) -> Result:
    for side in (src, dst):
        side.qmp.cmd("migrate-set-capabilities",
                     capabilities=scenario.capabilities(side is dst))
    src.qmp.cmd("migrate-set-parameters", **scenario.parameters())
    src.wait_guest(BOOT_PASSES)

    dst.qmp.cmd("migrate-incoming", uri="tcp:127.0.0.1:0")
    port = dst.qmp.cmd("query-migrate")["socket-address"][0]["port"]
    src.qmp.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    deadline = time.monotonic() + scenario.timeout
    if src.wait_status(ENDED, time.monotonic() + scenario.precopy):
        raise HarnessError(_ended_in_precopy(src.qmp.cmd("query-migrate")))
    src.qmp.cmd("migrate-start-postcopy")
    for side in (src, dst):
        status = side.wait_status(ENDED, deadline)
        if status != "completed":
            raise HarnessError(f"{side.name}: migration {status or 'not completed'} within "
                               f"{scenario.timeout} s: {side.qmp.cmd('query-migrate')}")
    dst.qmp.cmd("stop")
    end = dst.status()
    verified = False
    if scenario.verify:
        dst.verify(walk, end)
        verified = True
    start = src.status()  # the source stopped at the switch to postcopy
    vcpu = dst.qmp.cmd("query-cpus-fast")[0]["thread-id"]
    info = {side.name: side.qmp.cmd("query-migrate") for side in (src, dst)}
    version = _version(src.qmp.greeting)
    resumed = dst.event_time("RESUME")
    src.quit()
    dst.quit()
    trace = traces.assemble(traces.read(dst.log), traces.read(src.log))
    touches, window = _progress(trace, walk, start.touches, vcpu, resumed, scenario.host_page)
    if touches is not None and start.touches + touches > end.touches:
        raise HarnessError(f"guest progress from the faults ({touches} touches after "
                           f"{start.touches}) passes the guest's own count ({end.touches})")
    return Result(scenario, version, trace, info["destination"].get("postcopy-blocktime"),
                  touches, window, start, end, info["source"], info["destination"], verified)


def _ended_in_precopy(info: dict) -> str:
    text = f"migration {info.get('status')} in precopy: {info}"
    syncs = info.get("ram", {}).get("dirty-sync-count", 0)
    if info.get("status") == "completed" and syncs <= 2:
        # migration.c: threshold_size is 0 until migration_update_counters first runs, a
        # BUFFER_DELAY after the start; a first pass over RAM that ends before it leaves
        # nothing pending and the migration completes without another bitmap sync.
        text += (f" (the first pass over RAM ended within QEMU's first {BANDWIDTH_WINDOW_MS}"
                 " ms, before it knew the bandwidth: set a max-bandwidth or more RAM)")
    elif info.get("status") == "completed":
        text += " (precopy converged: the guest dirtied pages more slowly than they went out)"
    return text


def _version(greeting: dict | None) -> str:
    qemu = (greeting or {}).get("QMP", {}).get("version", {})
    number = "{major}.{minor}.{micro}".format(**qemu.get("qemu", {"major": 0, "minor": 0,
                                                                   "micro": 0}))
    package = qemu.get("package", "").strip()
    return f"{number} ({package})" if package else number


def _progress(trace: traces.Trace, walk: guest.Walk, start: int, vcpu: int,
              resumed: float | None, host_page: int = guest.PAGE,
              ) -> tuple[int | None, float | None]:
    """Guest touches from the destination's RESUME to the vCPU's last fault in the region.

    The guest's order is known, so the host page a fault is on says how far the guest got:
    the touch that faulted is the first touch of any of that host page's target pages after
    the previous fault (they were all missing until then). Two faults are less than a pass
    apart, since the page of the later one was missing all the time in between, so counting
    positions modulo a pass is exact."""
    if trace.block_base is None or resumed is None:
        return None, None
    n = walk.npages
    positions: dict[int, list[int]] = {}  # host page number -> its pages' positions, sorted
    for i, page in enumerate(walk.order()):
        positions.setdefault((walk.base + page * guest.PAGE) // host_page, []).append(i)
    done, last = start, None
    for fault in trace.faults:
        mine = positions.get((fault.hva - trace.block_base) // host_page)
        if fault.pid != vcpu or mine is None or fault.time < resumed:
            continue
        here = done % n
        j = bisect.bisect_left(mine, here)
        done += (mine[j] if j < len(mine) else mine[0] + n) - here
        last = fault.time
    if last is None:
        return None, None
    return done - start, last - resumed


class Qemu:
    """One qemu-system-x86_64 running `image` as `scenario` says, its QMP monitor on a unix
    socket in `workdir` (which it writes its files into), traced with `events`; a context
    manager that kills it on the way out."""

    def __init__(self, name: str, scenario: Scenario, image: str, workdir: str,
                 options: list[str], events: tuple[str, ...]) -> None:
        self.name = name
        self.npages = guest.Walk.for_ram(scenario.pattern, scenario.ram).npages
        self.workdir = workdir
        self.socket = os.path.join(workdir, f"{name}.qmp")
        self.log = os.path.join(workdir, f"{name}.trace")
        self.stderr = os.path.join(workdir, f"{name}.stderr")
        events_file = os.path.join(workdir, f"{name}.events")
        with open(events_file, "w") as out:
            out.write("".join(f"{event}\n" for event in events))
        self.argv = [QEMU, "-nodefaults", "-no-user-config", "-display", "none",
                     "-accel", scenario.accel, *_memory_options(scenario), "-smp", "1",
                     "-kernel", image, "-qmp", f"unix:{self.socket},server=on,wait=off",
                     "-msg", "timestamp=on", "-trace", f"events={events_file}",
                     "-D", self.log, *options]
        self.process: subprocess.Popen | None = None
        self.qmp = QmpClient(f"unix:{self.socket}", timeout=QMP_TIMEOUT)
        self.events: list[dict] = []

    def __enter__(self) -> Qemu:
        with open(self.stderr, "w") as err:
            self.process = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL,
                                            stdout=err, stderr=err, preexec_fn=_die_with_parent)
        try:
            self._connect()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.qmp.close()
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
        if self.process is not None:
            self.process.wait()

    def _connect(self) -> None:
        """Connect to the monitor once QEMU has opened it; QEMU may open it and still exit
        (a bad option found later), so a refused connection is retried while it runs."""
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.process.poll() is not None:
                raise HarnessError(f"{self.name} QEMU exited ({self.process.returncode}): "
                                   f"{self.stderr_tail()}")
            if os.path.exists(self.socket):
                try:
                    self.qmp.connect()
                    return
                except OSError:
                    self.qmp.close()
            if time.monotonic() > deadline:
                raise HarnessError(f"{self.name} QEMU opened no monitor in {START_TIMEOUT} s")
            time.sleep(0.02)

    def stderr_tail(self) -> str:
        with open(self.stderr, errors="replace") as err:
            return err.read()[-2000:].strip()

    def quit(self) -> None:
        """Ask QEMU to quit and wait for it; kill it if it does not."""
        if self.process.poll() is not None:
            return
        self.qmp.timeout = QUIT_TIMEOUT
        try:
            self.qmp.cmd("quit")
        except OSError:  # ConnectionError, TimeoutError: it is going anyway
            pass
        try:
            self.process.wait(QUIT_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def read(self, address: int, size: int) -> bytes:
        """Guest physical memory, through pmemsave into the private dir."""
        path = os.path.join(self.workdir, f"{self.name}.mem")
        self.qmp.cmd("pmemsave", val=address, size=size, filename=path)
        try:
            with open(path, "rb") as f:
                return f.read()
        finally:
            os.unlink(path)

    def status(self) -> guest.Status:
        return guest.Status.parse(self.read(guest.STATUS_ADDRESS, guest.STATUS_SIZE),
                                  self.npages)

    def verify(self, walk: guest.Walk, status: guest.Status) -> None:
        path = os.path.join(self.workdir, f"{self.name}.region")
        self.qmp.cmd("pmemsave", val=walk.base, size=walk.npages * guest.PAGE, filename=path)
        try:
            with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                guest.verify(walk, status, m)
        except guest.GuestError as e:
            raise HarnessError(f"{self.name}: memory image after migration: {e}") from e
        finally:
            os.unlink(path)

    def wait_guest(self, passes: int) -> None:
        """Wait until the guest runs and has finished `passes` passes over its region."""
        deadline = time.monotonic() + START_TIMEOUT
        while (status := self.status()).passes <= passes:
            if status.state == 2:
                raise HarnessError(f"{self.name}: the guest refused to run (error "
                                   f"{status.error}: region outside RAM or not multiboot)")
            if time.monotonic() > deadline:
                raise HarnessError(f"{self.name}: the guest did not run within "
                                   f"{START_TIMEOUT} s: {status}")
            time.sleep(0.05)

    def wait_status(self, statuses: tuple[str, ...], deadline: float) -> str | None:
        """Wait for a MIGRATION event with one of `statuses` until `deadline` (monotonic);
        return it, or None at the deadline."""
        while (left := deadline - time.monotonic()) > 0:
            for event in self.qmp.events(wait=min(left, 0.5)):
                self.events.append(event)
                status = event.get("data", {}).get("status")
                if event["event"] == "MIGRATION" and status in statuses:
                    return status
        return None

    def event_time(self, name: str) -> float | None:
        """The timestamp of the first `name` event seen, seconds since the epoch."""
        self.events.extend(self.qmp.events())
        for event in self.events:
            if event["event"] == name:
                stamp = event["timestamp"]
                return stamp["seconds"] + stamp["microseconds"] / 1e6
        return None


def _memory_options(scenario: Scenario) -> list[str]:
    size = f"{scenario.ram >> 20}M"
    if scenario.hugetlbfs is None:
        return ["-machine", MACHINE, "-m", size]
    return ["-object", f"memory-backend-file,id=ram0,size={size},mem-path={scenario.hugetlbfs},"
                       "share=on,prealloc=off",
            "-machine", f"{MACHINE},memory-backend=ram0", "-m", size]


_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the parent dies, so no QEMU outlives it."""
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
