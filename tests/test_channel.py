"""A channel endpoint: a writer blocked on a full connection, seen through its trace points;
a write of several frames; the checksum of its frames."""

import socket
import threading

import numpy as np
import pytest

from emu import trace
from emu.net.channel import HEADER, SMALL_FRAME, Endpoint, checksum, credit_frame


@pytest.fixture
def traced_pair():
    """A socket pair, the trace points of a blocked writer recorded: (seen, blocked, mine,
    link), blocked set at the first one."""
    seen = []
    blocked = threading.Event()

    def sink(name: str, fields: dict) -> None:
        seen.append((name, fields))
        blocked.set()

    trace.set_sink(sink)
    trace.enable(["qemu_file_writev_*"])
    mine, link = socket.socketpair()
    try:
        yield seen, blocked, mine, link
    finally:
        trace.enable([])
        trace.set_sink(lambda name, fields: None)
        mine.close()
        link.close()


def test_a_writer_blocked_on_a_full_connection_is_traced(traced_pair):
    seen, blocked, mine, link = traced_pair
    ep = Endpoint(mine, 100, "main")
    try:
        ep.read_credits_in_background()
        ep.send([b"x" * 80])  # 80 of the window's 100 bytes: no wait
        assert seen == []
        writer = threading.Thread(target=ep.send, args=([b"y" * 60],))
        writer.start()
        assert blocked.wait(30)
        assert seen == [("qemu_file_writev_blocked", {"channel": "main", "queued": 80,
                                                      "size": 60})]
        link.sendall(credit_frame(80))  # the link delivered the first frame
        writer.join(30)
        assert not writer.is_alive()
        assert seen[1] == ("qemu_file_writev_unblocked", {"channel": "main", "queued": 0,
                                                          "size": 60})
    finally:
        ep.close()


def test_a_write_of_several_frames_waits_for_room_once_and_arrives_frame_by_frame(traced_pair):
    # a writev() on a full socket: the writer waits until the whole write fits, then the
    # reader gets each frame on its own (as each record's last byte is in)
    seen, blocked, mine, link = traced_pair
    ep = Endpoint(mine, 200, "main")
    reader = link.makefile("rb")

    def frames(n: int) -> list:  # (payload, virt), as the link reads them
        out = []
        for _ in range(n):
            _, size, virt, _, _ = HEADER.unpack(reader.read(HEADER.size))
            out.append((reader.read(size), virt))
        return out

    try:
        ep.read_credits_in_background()
        ep.send_write([([b"a" * 60], 0), ([b"b" * 60], 0), ([b"c" * 20], 40)])  # 180 of 200
        assert frames(3) == [(b"a" * 60, 0), (b"b" * 60, 0), (b"c" * 20, 40)]
        assert ep.outstanding == 180 and seen == []
        writer = threading.Thread(target=ep.send_write,
                                  args=([([b"d" * 30], 0), ([b"e" * 30], 0)],))
        writer.start()
        assert blocked.wait(30)
        link.sendall(credit_frame(30))  # room for one frame of it (30), not for the write (60)
        writer.join(0.3)
        assert writer.is_alive()
        link.sendall(credit_frame(150))
        writer.join(30)
        assert not writer.is_alive()
        assert [name for name, _ in seen] == ["qemu_file_writev_blocked",
                                              "qemu_file_writev_unblocked"]
        assert seen[0][1] == {"channel": "main", "queued": 180, "size": 60}
        assert frames(2) == [(b"d" * 30, 0), (b"e" * 30, 0)]
    finally:
        ep.close()
        reader.close()


def test_a_small_payload_has_the_checksum_a_large_one_would():
    # checksum() sums small payloads without numpy: the same 64-bit word sum, wrapping
    rng = np.random.default_rng(7)
    for size in (*range(0, 2 * SMALL_FRAME + 17), 4096, 4096 + 5):
        for data in (rng.integers(0, 256, size, dtype=np.uint8).tobytes(), b"\xff" * size):
            words = np.frombuffer(data[:size & ~7], np.uint64)
            expected = (sum(int(w) for w in words) + int.from_bytes(data[size & ~7:], "little"))
            assert checksum(data) == expected % (1 << 64), size
