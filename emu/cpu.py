"""The CPU time of QEMU's threads, in emulated time (the cpu.* keys; docs/concepts.md, "CPU
time as physics").

Each of QEMU's migration threads is a serial server: the migration thread spends time on every
page it finds and saves and on every writev, the destination's listen and preempt threads on
every host page they place, the fault thread on every request, the return-path thread on every
message. In the emulator that time would be Python's own, which shrinks with
emulator.time-scale; here it is charged in emulated time instead, whatever the scale.

A charge moves the thread's busy-until mark; the debt is waited out (settle) right before the
thread's next act another thread can see: a socket write, a placement the vCPUs see, a request
sent, a request queued. So work queued behind a busy thread waits for it, work on another thread
does not, and the emulator sleeps once per act, never once per tiny charge (a real sleep
overshoots by 50-100 us; Clock.sleep_until spins below 200 us).

A charge starts when the thread charges it, or when its earlier work is done, or, for a thread
that reads a channel, when the frame it works on arrived (mark): the emulator's own work on the
frame then overlaps the charged time, and shows only where it is longer. Elsewhere the
emulator's own work adds to the charge, x time-scale, as the model's software term says. The
run's report compares the two per fault and says when the emulator's own cost is not small next
to what was charged.
"""

from __future__ import annotations

from dataclasses import dataclass

from emu.board import Board
from emu.clock import Clock
from emu.config import Config
from emu.migration.ram import TARGET_PAGE

# QEMUFile writes its iovecs with one writev per MAX_IOV_SIZE = 64 of them: a header and a page
# each, so one writev per 32 target pages (qemu-file.c's add_to_iovec / qemu_fflush)
PAGES_PER_WRITEV = 32
STATS = ("busy", "acts")


def fields(threads: tuple[str, ...]) -> tuple[str, ...]:
    """The board fields the CpuThreads of `threads` publish: seconds charged, acts settled."""
    return tuple(f"cpu-{t}-{s}" for t in threads for s in STATS)


@dataclass(frozen=True)
class Costs:
    """The cpu.* keys, in seconds (per byte for the -byte ones)."""

    save_page: float = 0.0
    write: float = 0.0
    write_byte: float = 0.0
    zero_check: float = 0.0
    place_page: float = 0.0
    place_byte: float = 0.0
    place_zero_page: float = 0.0
    fault_request: float = 0.0
    return_path_message: float = 0.0

    @classmethod
    def from_config(cls, cfg: Config) -> Costs:
        return cls(**{name: cfg["cpu." + name.replace("_", "-")] for name in cls.__annotations__})

    def save(self, pages: int, nbytes: int, zero_pages: int = 0) -> float:
        """The migration thread's time for one record of `pages` target pages, `nbytes` on the
        wire: per page found and saved, one writev per PAGES_PER_WRITEV pages, per byte; and
        the whole-page zero check of the `zero_pages` among them that are all zeros (a zero
        page's record is its header: pass only those bytes in nbytes)."""
        writes = -(-pages // PAGES_PER_WRITEV)
        return (pages * self.save_page + writes * self.write + nbytes * self.write_byte
                + zero_pages * self.zero_check)

    def place(self, count: int, page_size: int) -> float:
        """The listen or preempt thread's time to place `count` host pages of `page_size`:
        one UFFDIO_COPY each, its fixed part and its bytes (read off the socket, copied)."""
        return count * (self.place_page + page_size * self.place_byte)

    def place_zero(self, count: int, page_size: int) -> float:
        """The same threads' time to place `count` zero host pages: UFFDIO_ZEROPAGE for small
        pages; a huge zero page is copied whole, as any other (postcopy_place_page_zero)."""
        if page_size == TARGET_PAGE:
            return count * self.place_zero_page
        return self.place(count, page_size)

    def save_record(self, page_size: int, chunk: int) -> float:
        """save() of one record of a host page (the first of it for a huge page)."""
        pages = min(page_size, chunk) // TARGET_PAGE
        return self.save(pages, pages * TARGET_PAGE)


class CpuThread:
    """One of QEMU's threads as a serial server in emulated time."""

    def __init__(self, name: str, clock: Clock, board: Board | None = None) -> None:
        self.name = name
        self.clock = clock
        self.free_at = 0.0  # emulated time at which the work charged so far is done
        self.busy = 0.0
        self.acts = 0
        self._pending = False  # charged since the last settle
        self._since: float | None = None  # the input of the next charge came then (mark)
        self._board = board if board is not None and f"cpu-{name}-busy" in board.fields \
            else None
        self._busy, self._acts = f"cpu-{name}-busy", f"cpu-{name}-acts"  # its board fields

    def charge(self, seconds: float) -> None:
        """Work of `seconds` starting now, or when the work before it is done."""
        if seconds <= 0:
            return
        start = self.clock.now() if self._since is None else self._since
        self._since = None
        self.free_at = max(self.free_at, start) + seconds
        self.busy += seconds
        self._pending = True
        if self._board is not None:
            self._board.add(self._busy, seconds)

    def mark(self, t: float) -> None:
        """The input of the next charge (a frame read off a channel) was there at emulated
        time t: the work on it starts then, or when the thread is free."""
        self._since = t

    def settle(self) -> None:
        """Before an act others see: wait until the work charged so far is done."""
        if not self._pending:  # nothing charged since the last act (every cpu.* key 0: as before)
            return
        self._pending = False
        if not self.clock.started:  # a clock no controller runs (parts tested on their own)
            return
        while not self.clock.sleep_until(self.free_at):
            pass
        self.acts += 1
        if self._board is not None:
            self._board.add(self._acts, 1)

    def ready(self) -> float:
        """When this thread can next take work in (for the lag meter: a frame read late
        because the thread was busy is not the emulator falling behind)."""
        return self.free_at
