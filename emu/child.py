"""What every child process of a run shares: start-up, the control connection, and dying well.

The control connection is also the lifeline: when the controller goes away (even by SIGKILL),
the child's read on it fails and it exits at once; one child of each run, the janitor,
first unlinks the run's segments by the names the controller gave it, so nothing outlives its
run. Ctrl-C and the terminal's
SIGHUP reach the whole process group; children ignore them and let the controller stop them.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
import traceback
from collections.abc import Callable, Iterable

from emu import shm, signals, trace
from emu.clock import Clock
from emu.events import Error, Event, Exit, Ready, Trace


def start_thread(name: str, target, *args) -> threading.Thread:
    """A daemon thread named as QEMU names its threads (migration, return-path, listen, ...)."""
    thread = threading.Thread(target=target, name=name, args=args, daemon=True)
    thread.start()
    return thread


class Control:
    """A child's end of the control connection: thread-safe events out, commands in."""

    def __init__(self, conn, role: str, segments: dict[str, str]) -> None:
        self.conn = conn
        self.role = role
        self.segments = segments  # what to unlink if orphaned, by the names the controller made
        self._lock = threading.Lock()
        self.on_orphan: Callable[[], None] = lambda: None  # last words before exiting

    def orphaned(self) -> None:
        """The controller is gone (killed): clean up what only it would have, then exit."""
        self.on_orphan()
        shm.unlink_all(self.segments)
        os._exit(1)

    def emit(self, event: Event) -> None:
        """Send an event (emu/events.py) to the controller."""
        with self._lock:
            try:
                self.conn.send(event)
            except OSError:
                self.orphaned()

    def fail(self, message: str) -> None:
        """Say that this side failed, in one line."""
        self.emit(Error.of(self.role, message))

    def crashed(self) -> None:
        """Say what the exception being handled was, with its traceback: a bug, not a
        failure the engine knows."""
        self.emit(Error.of(self.role, traceback.format_exc()))

    def trace_to_controller(self, clock: Clock, patterns: Iterable[str]) -> None:
        """Switch on the trace points matching QEMU-style `patterns` and send each one that
        fires as a Trace event, stamped with this run's emulated time. No pattern: every
        point stays off, and nothing is sent."""
        trace.enable(patterns)
        trace.set_sink(lambda name, fields: self.emit(Trace(self.role, name, clock.now(),
                                                            fields)))

    def serve(self, handlers: dict[str, Callable[..., None]]) -> None:
        """Say ready, then run commands until "quit"; exit if the controller disappears."""
        self.emit(Ready(self.role))
        while True:
            try:
                command, *args = self.conn.recv()
            except (EOFError, OSError):
                self.orphaned()
            if command == "quit":
                return
            try:
                handlers[command](*args)
            except Exception:  # a bad command must not take the process down silently
                self.crashed()


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt() parameters


def keep_freed_memory() -> None:
    """Let malloc reuse the memory of freed frames instead of handing it back to the kernel:
    a process that allocates and frees a frame buffer per record would otherwise take a fresh
    page fault on every 4 KiB of every frame, which costs more than copying the bytes."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)  # frames up to 32 MiB come from the heap
        libc.mallopt(M_TRIM_THRESHOLD, 64 << 20)  # which keeps up to 64 MiB free
    except (OSError, AttributeError):
        pass  # not glibc: slower, not wrong


PR_SET_TIMERSLACK = 29  # prctl(): how late the kernel may end this thread's timed waits
TIMER_SLACK_NS = 1000


def precise_timers() -> None:
    """End timed waits (sleep, select, a lock's timeout) within a microsecond of their time,
    for this thread and those it starts. Linux lets a thread's timers fire up to 50 us late by
    default, to batch wake-ups: on the 2-core dev VM a 200 us sleep then ended 77 us late
    (median) instead of 22, and every wait that paces the emulation (Clock.sleep_until, the
    link's schedule, the GIL's own hand-over) paid for it in spinning or in lateness."""
    try:
        ctypes.CDLL(None).prctl(PR_SET_TIMERSLACK, TIMER_SLACK_NS, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: its default slack, slower, not wrong


PR_SET_NAME = 15  # prctl(): the calling thread's name, the process's comm for the main thread
COMM_LEN = 15  # TASK_COMM_LEN less the NUL


def set_title(role: str) -> None:
    """Name this process after its role, so that ps tells the three apart: the command line
    (ps -o args, /proc/PID/cmdline) says "postcopy-emu: destination", and comm (ps -o comm,
    top, pgrep) "pce-destination". Best effort: a process without either keeps its name."""
    title = f"postcopy-emu: {role}".encode()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_NAME, ctypes.c_char_p(f"pce-{role}".encode()[:COMM_LEN]), 0, 0, 0)
        _rewrite_argv(title)
    except (OSError, AttributeError, ValueError, IndexError):
        pass


def _rewrite_argv(title: bytes) -> None:
    """Write the title over the process's own argv strings, where the kernel reads
    /proc/PID/cmdline (arg_start..arg_end in /proc/self/stat, fields 48 and 49). Python has
    copied argv at start-up, so nothing reads these bytes any more. The title is cut to the
    space there is and NUL-filled to its end, as PostgreSQL does (ps shows the title alone);
    the environment after it stays as it is."""
    with open("/proc/self/stat", "rb") as stat:
        fields = stat.read().rsplit(b")", 1)[1].split()  # comm may hold spaces and ")"
    start, end = int(fields[45]), int(fields[46])  # fields 48, 49; the list starts at 3
    if not 0 < start < end:
        return
    text = title[:end - start - 1]
    ctypes.memmove(start, text + bytes(end - start - len(text)), end - start)


def child_main(role: str, body: Callable, conn, names: dict[str, str], *args,
               janitor: bool = False, trace_patterns: tuple[str, ...] = ()) -> None:
    """Entry point of a spawned child: attach the run's segments and run `body`. The janitor
    unlinks them if the controller is killed: one child only, so that a sibling still starting
    up does not find them gone (the network child of a run, which also removes its socket
    directory). trace_patterns: the trace points to send to the controller (QEMU's -trace)."""
    set_title(role)
    signals.ignore_terminal()
    # Threads here wait on each other (a vCPU on the listen thread, the migration thread on
    # the return path): hand the GIL over every 0.1 ms instead of 5 ms, or every hand-over
    # adds up to 5 ms of real time to a page request.
    sys.setswitchinterval(1e-4)
    precise_timers()
    keep_freed_memory()
    control = Control(conn, role, names if janitor else {})
    try:
        segments = shm.attach_all(names)
    except FileNotFoundError:  # the controller was killed: the janitor unlinks what is left
        control.orphaned()  # (a HugeSegment's /proc path goes with it, its /dev/shm ones stay)
    bufs = {k: s.buf for k, s in segments.items()}
    control.trace_to_controller(Clock(bufs[shm.CLOCK]), trace_patterns)
    try:
        body(control, bufs, *args)
    except Exception:
        control.crashed()
    finally:
        control.emit(Exit(role))
        os._exit(0)  # numpy views into the segments would make a clean close() fail
