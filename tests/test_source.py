"""The source's parts in-process with fake channels: the migration thread's recovery
handshake."""

import threading
import time

from emu.board import Board
from emu.clock import Clock
from emu.migration import wire
from emu.migration.page_requests import PageRequestQueue
from emu.migration.source import FIELDS, Source
from emu.net.channel import ChannelError
from tests.conftest import PATIENCE, config

HUGE = {"guest__page_size": "2MiB", "emulator__chunk": "512KiB",  # 4 records a host page
        "emulator__payload": "false"}


class FakeEndpoint:
    """Keeps the RAM records sent as (offset, target pages) and the commands; `on_send` runs
    after each message, `incoming` is what recv() returns."""

    def __init__(self, name: str, on_send=None, incoming=()) -> None:
        self.name = name
        self.records: list[tuple[int, int]] = []
        self.commands: list[int] = []
        self.on_send = on_send
        self.incoming = list(incoming)

    def send(self, parts, virt: int = 0, more: bool = False) -> None:
        msg = wire.decode_main(b"".join(bytes(p) for p in parts), payload=False)
        if isinstance(msg, wire.RamRecord):
            self.records.append((msg.offset, msg.npages))
        elif isinstance(msg, wire.Command):
            self.commands.append(msg.cmd)
        if self.on_send:
            self.on_send()

    def flush(self) -> None:
        pass

    def recv(self) -> bytes:
        if not self.incoming:
            raise ChannelError(f"{self.name}: connection closed")
        return self.incoming.pop(0)


class Control:
    def emit(self, event) -> None:
        pass

    def fail(self, message: str) -> None:
        raise AssertionError(message)


def source() -> Source:
    cfg = config(**HUGE)
    bufs = {"clock": bytearray(Clock.NBYTES), "src-board": bytearray(Board.nbytes(FIELDS)),
            "src-ram": bytearray(), "src-states": bytearray(cfg.npages),
            "src-queue": bytearray(PageRequestQueue.nbytes())}
    src = Source(Control(), bufs, cfg)
    src.clock.start(1.0)
    src.main, src.preempt = FakeEndpoint("main"), FakeEndpoint("preempt")
    return src


def go_to(src: Source, *statuses: str) -> None:
    for old, new in zip(("none", *statuses), statuses, strict=False):
        assert src.state.set(old, new)


POSTCOPY = ("setup", "active", "device", "postcopy-active")


def test_the_recovery_waits_for_the_migration_thread_to_park():
    """QEMU's migration thread runs the recovery handshake itself, once parked in
    postcopy_pause(): a page it claimed after the bitmap reload would be lost."""
    src = source()
    go_to(src, *POSTCOPY, "postcopy-paused")
    new_main = FakeEndpoint("main")
    src._connect = lambda address: setattr(src, "main", new_main)
    resume = threading.Thread(target=src._resume, args=("unix:/new",))
    resume.start()
    try:
        until(lambda: src.state.status != "postcopy-paused")
        resume.join(0.2)
        assert new_main.commands == []  # the migration thread streams still: no RECV_BITMAP
        src.parked.set()
        until(lambda: new_main.commands == [wire.MIG_CMD_RECV_BITMAP])
        src.rp.bitmap_received.set()
        until(lambda: new_main.commands[-1] == wire.MIG_CMD_POSTCOPY_RESUME)
        src.rp.resume_ack.set()
        resume.join(PATIENCE)
        assert src.state.status == "postcopy-active" and src.resumed.is_set()
    finally:
        src.quit.set()
        resume.join(PATIENCE)


def until(condition) -> None:
    deadline = time.monotonic() + PATIENCE
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.01)
