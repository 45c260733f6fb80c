"""A channel endpoint: a writer blocked on a full connection, seen through its trace points;
the checksum of its frames."""

import socket
import threading

import numpy as np

from emu import trace
from emu.net.channel import SMALL_FRAME, Endpoint, checksum, credit_frame


def test_a_writer_blocked_on_a_full_connection_is_traced():
    seen = []
    blocked = threading.Event()

    def sink(name: str, fields: dict) -> None:
        seen.append((name, fields))
        blocked.set()

    trace.set_sink(sink)
    trace.enable(["qemu_file_writev_*"])
    mine, link = socket.socketpair()
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
        trace.enable([])
        trace.set_sink(lambda name, fields: None)
        ep.close()
        mine.close()
        link.close()


def test_a_small_payload_has_the_checksum_a_large_one_would():
    # checksum() sums small payloads without numpy: the same 64-bit word sum, wrapping
    rng = np.random.default_rng(7)
    for size in (*range(0, 2 * SMALL_FRAME + 17), 4096, 4096 + 5):
        for data in (rng.integers(0, 256, size, dtype=np.uint8).tobytes(), b"\xff" * size):
            words = np.frombuffer(data[:size & ~7], np.uint64)
            expected = (sum(int(w) for w in words) + int.from_bytes(data[size & ~7:], "little"))
            assert checksum(data) == expected % (1 << 64), size
