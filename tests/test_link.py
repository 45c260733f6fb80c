"""The emulated link: fair sharing, delay, windows, and the head-of-line blocking they cause."""

import socket
import threading
import time

import pytest

from emu.board import Board
from emu.clock import Clock
from emu.net import channel, link, uri
from emu.net.channel import Endpoint
from emu.net.link import FIELDS, Bottleneck, Relay


def test_one_connection_gets_the_whole_bandwidth():
    neck = Bottleneck(1000.0)
    neck.push("main", "a", 500)
    neck.push("main", "b", 500)
    out = neck.advance(10)
    assert [(round(t, 6), item) for t, _, item in out] == [(0.5, "a"), (1.0, "b")]


def test_connections_with_data_share_the_bandwidth_equally():
    neck = Bottleneck(1000.0)
    neck.push("main", "big", 1000)
    neck.push("preempt", "small", 500)
    out = {item: t for t, _, item in neck.advance(10)}
    # both at 500 B/s until "small" is done at 1.0 s; then "big" alone at 1000 B/s
    assert out["small"] == pytest.approx(1.0)
    assert out["big"] == pytest.approx(1.5)


def test_advance_in_steps_matches_one_big_step():
    a, b = Bottleneck(1e6), Bottleneck(1e6)
    for neck in (a, b):
        neck.push("main", 1, 300_000)
        neck.push("preempt", 2, 100_000)
    stepped = []
    for k in range(1, 101):
        stepped += a.advance(k * 0.01)
    assert [round(t, 9) for t, _, _ in stepped] == [round(t, 9) for t, _, _ in b.advance(1.0)]


def test_next_departure_is_the_head_completion():
    neck = Bottleneck(100.0)
    assert neck.next_departure() == float("inf")
    neck.push("main", "x", 50)
    neck.push("preempt", "y", 10)
    assert neck.next_departure() == pytest.approx(0.2)  # 10 bytes at half of 100 B/s


class Stepped:
    """A relay stepped in a thread of its own, its clock started at `scale`."""

    def start_stepping(self, scale: float) -> None:
        self.stop = threading.Event()
        self.clock.start(scale)
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self):
        while not self.stop.is_set():
            self.relay.step(0.005)

    def close(self):
        self.stop.set()
        self.thread.join()


class LinkBench(Stepped):
    """A relay in a thread with one sender and one receiver endpoint per direction."""

    def __init__(self, bandwidth: float, rtt: float, window: int, scale: float,
                 credits: bool = True) -> None:
        self.clock = Clock()
        self.relay = Relay(self.clock, Board(FIELDS), bandwidth, rtt, link.receive_room(window))
        self.src, self.dst = {}, {}
        for conn in ("main", "preempt"):
            src_ep, src_relay = socket.socketpair()
            dst_ep, dst_relay = socket.socketpair()
            self.src[conn] = Endpoint(src_ep, window, f"src-{conn}")
            self.dst[conn] = Endpoint(dst_ep, window, f"dst-{conn}")
            self.relay.attach(conn, src_relay, dst_relay)
        if credits:  # in the source, the return-path thread reads them
            for ep in self.src.values():
                ep.read_credits_in_background()
        self.start_stepping(scale)


@pytest.fixture
def bench():
    made = []

    def make(**kw):
        made.append(LinkBench(**kw))
        return made[-1]
    yield make
    for b in made:
        b.close()


def receive_times(ep, clock, n, out):
    for _ in range(n):
        out.append((ep.recv(), clock.now()))


def test_the_arrival_stamp_reads_alike_on_a_clock_started_apart(bench):
    """A `link` program's clock and a destination program's start apart: the link stamps a
    frame's arrival in real time, so that on the reader's own clock it is when the frame came
    (a stamp of the link's emulated time put it that far off there, and the destination's
    preempt thread waited for it)."""
    rtt = 20e-3
    link = bench(bandwidth=1e9, rtt=rtt, window=1 << 20, scale=0.5)
    reader = Clock()
    reader.start(0.5, at=-1.0)  # a second behind the link's clock
    stamps = []
    link.dst["main"].on_arrival = stamps.append
    t_sent = reader.now()
    link.src["main"].send([b"page"])
    assert link.dst["main"].recv() == b"page"
    t_read = reader.now()
    arrival = reader.at_real(stamps[0])
    assert t_sent + rtt / 2 <= arrival + 1e-6 and arrival <= t_read


def test_a_clock_maps_real_time_both_ways():
    clock = Clock()
    clock.start(0.25, at=3.0)
    assert clock.at_real(clock.real_at(3.5)) == pytest.approx(3.5)
    assert clock.real_at(3.5) - clock.real_at(3.0) == pytest.approx(2.0)  # 0.5 s at 1/4
    clock.set_scale(0)  # paused: every time maps to the moment the pause began
    paused = clock.now()
    stamp = clock.real_at(1.0)
    assert clock.at_real(stamp) == pytest.approx(paused)
    clock.set_scale(1.0)  # and after it too: a frame's wait across a pause is no emulated time
    assert clock.at_real(stamp) == pytest.approx(paused)


def test_urgent_frame_waits_behind_the_queued_bytes(bench):
    """Head-of-line blocking: a frame written behind S queued bytes arrives about S/B later."""
    B, S, rtt = 50e6, 1 << 20, 1e-3
    link = bench(bandwidth=B, rtt=rtt, window=S, scale=0.2)
    got = []
    reader = threading.Thread(target=receive_times, args=(link.dst["main"], link.clock, 65, got))
    reader.start()
    filler = bytes(16 << 10)
    for _ in range(64):  # fill the window: 1 MiB queued on main
        link.src["main"].send([filler])
    t_sent = link.clock.now()
    link.src["main"].send([b"urgent"])
    reader.join(10)
    assert got[-1][0] == b"urgent"
    waited = got[-1][1] - t_sent
    assert waited == pytest.approx(S / B + rtt / 2, rel=0.15)


def test_preempt_channel_passes_the_queue_at_half_the_bandwidth(bench):
    B, S, rtt = 50e6, 1 << 20, 1e-3
    link = bench(bandwidth=B, rtt=rtt, window=S, scale=0.05)
    got = []
    drain = threading.Thread(target=receive_times, args=(link.dst["main"], link.clock, 64, []))
    drain.start()
    filler = bytes(16 << 10)
    for _ in range(64):
        link.src["main"].send([filler])
    page = bytes(4096)
    t_sent = link.clock.now()
    link.src["preempt"].send([page])
    receive_times(link.dst["preempt"], link.clock, 1, got)
    drain.join(10)
    waited = got[0][1] - t_sent
    # shares the bottleneck with the backlog on main: 4 KiB at B/2, plus the one-way delay
    assert 2 * len(page) / B + rtt / 2 <= waited < 2 * len(page) / B + rtt / 2 + 2e-4
    assert waited < S / B / 10


def test_sender_blocks_when_its_window_is_full(bench):
    """A window's worth of bytes goes at once (frame headers are not charged); the next write
    waits until the link has delivered enough of them, as write() on a full TCP socket."""
    B, window, first = 1e6, 64 << 10, 60 << 10
    link = bench(bandwidth=B, rtt=0.0, window=window, scale=0.1)
    ep = link.src["main"]
    t0 = link.clock.now()
    ep.send([bytes(first)])
    ep.send([bytes(window - first)])  # fills the window exactly: does not wait
    t_full = link.clock.now()
    reader = threading.Thread(target=receive_times, args=(link.dst["main"], link.clock, 3, []))
    reader.start()
    ep.send([bytes(1024)])  # room again once the first frame is delivered and credited
    waited = link.clock.now() - t0
    reader.join(5)
    assert t_full - t0 < first / B / 2
    assert waited == pytest.approx(first / B, rel=0.15)


def test_return_path_flows_the_other_way_with_its_delay(bench):
    link = bench(bandwidth=1e9, rtt=20e-3, window=1 << 20, scale=0.1, credits=False)
    t0 = link.clock.now()
    link.dst["main"].send([b"REQ"])
    assert link.src["main"].recv() == b"REQ"
    assert link.clock.now() - t0 == pytest.approx(10e-3, abs=1e-3)


def test_virtual_bytes_are_charged_but_not_carried(bench):
    B = 10e6
    link = bench(bandwidth=B, rtt=0.0, window=8 << 20, scale=0.1)
    t0 = link.clock.now()
    link.src["main"].send([b"hdr"], virt=200_000)
    assert link.dst["main"].recv() == b"hdr"
    assert link.clock.now() - t0 == pytest.approx(200_003 / B, rel=0.15)


def test_a_blocked_writer_wakes_only_when_write_wakeup_bytes_more_are_free(bench):
    """Linux wakes a writer asleep on a full socket once a good part of it has drained."""
    B, window = 1e6, 64 << 10
    link = bench(bandwidth=B, rtt=0.0, window=window, scale=0.1)
    ep = link.src["main"]
    ep.wakeup = 32 << 10
    for _ in range(16):  # fill the window
        ep.send([bytes(4096)])
    drained = []
    reader = threading.Thread(target=receive_times,
                              args=(link.dst["main"], link.clock, 17, drained))
    reader.start()
    t0 = link.clock.now()
    ep.send([bytes(4096)])  # needs 4 KiB, waits for 4 + 32 KiB
    waited = link.clock.now() - t0
    reader.join(5)
    assert waited == pytest.approx((4096 + (32 << 10)) / B, rel=0.2)


class RelayThread(Stepped):
    """A relay listening at `listen` (forwarding to `target`, or a front if none), stepped in
    a thread of its own."""

    def __init__(self, listen: str, target: str, rtt: float = 0.0) -> None:
        self.clock = Clock()
        self.relay = Relay(self.clock, Board(FIELDS), 1e9, rtt)
        self.relay.listen(listen, target)
        self.start_stepping(1.0)

    def close(self):
        super().close()
        self.relay.close()


def test_a_relay_marks_every_connection_it_forwards(tmp_path):
    """The destination tells a connection through a link by its first frame."""
    target = uri.listen(f"unix:{tmp_path}/dst.sock")
    relay = RelayThread(f"unix:{tmp_path}/link.sock", f"unix:{tmp_path}/dst.sock")
    try:
        src = Endpoint(uri.connect(f"unix:{tmp_path}/link.sock"), 1 << 20, "main")
        src.send([channel.MAIN_HELLO])  # the relay connects on once the hello names it
        dst, _ = target.accept()
        assert channel.read_header(dst, 5) == channel.relayed_frame()
        assert Endpoint(dst, 1 << 20, "main").recv() == channel.MAIN_HELLO
    finally:
        relay.close()
        target.close()


def test_a_front_emulates_the_link_for_a_connection_handed_over(tmp_path):
    """A source's connection the destination accepted and read the first header of goes
    through the front whole: marked, delayed by the link, credited back to the source."""
    rtt = 20e-3
    front = RelayThread(f"unix:{tmp_path}/handover.sock", "", rtt)
    try:
        source_end, accepted = socket.socketpair()
        src = Endpoint(source_end, 1 << 20, "main")
        src.send([channel.MAIN_HELLO])
        src.send([b"page"])
        first = channel.read_header(accepted, 5)  # what the destination reads to decide
        assert first[0] == channel.DATA
        t0 = front.clock.now()
        back = link.hand_over(f"unix:{tmp_path}/handover.sock", accepted, first)
        assert accepted.fileno() == -1  # the destination keeps no copy of the source's socket
        assert channel.read_header(back, 5) == channel.relayed_frame()
        dst = Endpoint(back, 1 << 20, "main")
        assert dst.recv() == channel.MAIN_HELLO and dst.recv() == b"page"
        assert front.clock.now() - t0 >= rtt / 2
        dst.send([b"REQ"])  # the return path
        assert src.recv() == b"REQ"
        assert front.relay.queued["main"] == 0  # delivered, and credited back to the source
        assert front.relay.ports.keys() == {"src-main", "dst-main"}
    finally:
        front.close()


def test_a_hand_over_without_a_front_closes_the_connection(tmp_path):
    mine, accepted = socket.socketpair()
    assert link.hand_over(f"unix:{tmp_path}/nobody.sock", accepted, b"x") is None
    assert accepted.fileno() == -1 and mine.recv(1) == b""



# ---- the window is the receiver's: a frame holds its place until it is read ----

def wait_for(predicate, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.005)
    return predicate()


def test_a_frame_delivered_but_not_read_holds_its_place_in_the_window(bench):
    """As in TCP, bytes in the receiver's socket that its thread has not read are still the
    sender's, but for the room the socket acknowledges itself: the window opens as the
    receiver reads, not as the link delivers."""
    window, frame = 64 << 10, 4 << 10
    room = link.receive_room(window)
    bench_ = bench(bandwidth=1e9, rtt=0.0, window=window, scale=0.5)
    relay, ep = bench_.relay, bench_.src["main"]
    for _ in range((window + room) // frame):  # the last ones once the first are in
        ep.send([b"page"], virt=frame - 4)
    assert wait_for(lambda: relay.unread["main"] == window + room)  # in the receiver's socket
    # the room's credit reaches the sender a turn of the relay later
    assert wait_for(lambda: relay.queued["main"] == ep.outstanding == window), \
        (relay.queued, ep.outstanding)
    assert not ep.wait_room(frame, lambda: True)  # no room: nobody read them
    share = window // channel.CREDIT_SHARE // frame  # frames read before a credit goes back
    for _ in range(share):
        assert bench_.dst["main"].recv() == b"page"
    deadline = time.monotonic() + 5
    assert ep.wait_room(frame, lambda: time.monotonic() > deadline)  # room as they are read
    for _ in range((window + room) // frame - share):
        bench_.dst["main"].recv()
    assert wait_for(lambda: relay.board["delivered-main"] == window + room)
    # the last credit crosses the socket after the last read: wait for the relay to take it in
    assert wait_for(lambda: relay.queued["main"] == relay.unread["main"]
                    == relay.acked["main"] == 0), (relay.queued, relay.unread, relay.acked)
    assert ep.outstanding == 0


def test_a_busy_reader_credits_by_shares_of_the_window(bench):
    """A reader with a backlog buffered gives back an eighth of the window at a time, not a
    credit per frame: one credit frame per CREDIT_SHARE of the window it reads."""
    window, frame = 64 << 10, 1 << 10
    link = bench(bandwidth=1e9, rtt=0.0, window=window, scale=0.5)
    for _ in range(window // frame):
        link.src["main"].send([b"p"], virt=frame - 1)
    assert wait_for(lambda: link.relay.unread["main"] == window)
    time.sleep(0.05)  # the last frames' bytes reach the receiver's socket
    reader = link.dst["main"]
    reader.sock = Recording(reader.sock)
    for _ in range(window // frame):
        reader.recv()
    share = window // channel.CREDIT_SHARE
    assert [channel.HEADER.unpack(c)[2] for c in reader.sock.sent] == [share] * 8


class Recording:
    """A socket whose writes are noted."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.sent = sock, []

    def sendall(self, data: bytes) -> None:
        self.sent.append(bytes(data))
        self.sock.sendall(data)


@pytest.mark.parametrize(("side", "conn", "amount"), [
    ("dst", "main", 1),  # more than the receiver was given
    ("src", "preempt", 0),  # from a sender's side that receives nothing
])
def test_a_credit_nobody_owes_breaks_the_connection(bench, side, conn, amount):
    link = bench(bandwidth=1e9, rtt=0.0, window=1 << 20, scale=0.5)
    getattr(link, side)[conn].sock.sendall(channel.credit_frame(amount))
    assert wait_for(lambda: ("broken", conn) in link.relay.events)
    with pytest.raises(channel.ChannelError):
        link.dst[conn].recv()


def test_a_cut_forgets_what_the_old_receiver_had_not_read(bench):
    """What a broken connection's receiver held unread is not owed on the new connection: its
    credits would break the new one."""
    link = bench(bandwidth=1e9, rtt=0.0, window=1 << 20, scale=0.5)
    link.src["main"].send([b"page"], virt=4092)
    assert wait_for(lambda: link.relay.unread["main"] == 4096)
    link.relay.cut("main")
    assert link.relay.unread["main"] == link.relay.acked["main"] == link.relay.queued["main"] == 0


def test_a_listen_thread_slower_than_the_link_holds_mains_backlog_to_the_window(run_migration):
    """The destination's listen thread places a page in 100 us, three times a page's time
    on a 1 Gbit link: main's backlog is what the listen thread has not read, at most the
    socket buffer (1 MiB) and its receive room (an eighth of it), so an urgent page in vanilla
    waits about 1.125 MiB / 41 MB/s, ~29 ms. A link that freed the window on delivery let the
    backlog grow with the run, into the unread socket between link and destination, and
    faults waited ever longer (70 ms on average, 255 ms at most, where these are 24 and 33)."""
    place, window = 100e-6, 1 << 20
    result = run_migration(emulator__payload="false", cpu__place_page="100us",
                           cpu__place_byte="0", workload__pattern="random")
    assert result["status"] == "completed", result["errors"]
    lat = result["latency"]
    drain = (window + link.receive_room(window)) / 4096 * place  # at the listen thread's rate
    assert lat["count"] >= 5
    assert lat["avg-us"] * 1e-6 < 1.5 * drain and lat["max-us"] * 1e-6 < 2 * drain, lat
