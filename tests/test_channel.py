"""A channel endpoint's writer blocked on a full connection, seen through its trace points."""

import socket
import threading

from emu import trace
from emu.net.channel import Endpoint, credit_frame


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
