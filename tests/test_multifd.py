"""multifd, and multifd with postcopy as QEMU 10.1 allows it: precopy pages on N connections of
their own, synced before postcopy starts, none in postcopy; refused with postcopy-ram before
10.1 (migrate_caps_check()). Small guests: every assertion on counts, contents and states.
"""

import subprocess
import sys
import time

import numpy as np
import pytest

from emu.config import ConfigError
from emu.migration import ram as R
from emu.migration import wire
from emu.migration.placement import Placer
from emu.net import channel, uri
from emu.net.channel import Endpoint
from tests.conftest import config, recorded
from tests.test_destination_trace import Traced
from tests.test_link import RelayThread
from tests.test_migration import assert_completed, assert_postcopy
from tests.test_recovery import assert_recovered, run_with
from tests.wire_peer import closed, destination, frame, peer

PAGE = R.TARGET_PAGE
REFUSED = "Postcopy is not yet compatible with multifd"


@pytest.fixture
def traced():
    yield from recorded(("multifd_*", "loadvm_*"), Traced())


# ---- whole migrations ----

def test_multifd_and_postcopy_together_with_design_10_1(run_migration):
    result = run_migration(workload__pattern="ab", migration__multifd="true",
                           migration__design="10.1")
    assert_postcopy(result, device=True)  # memory intact, states as without multifd (10.1)
    ram = result["query-migrate"]["ram"]
    assert ram["multifd-bytes"] > 0 and ram["postcopy-bytes"] > 0
    # precopy went on multifd; nothing did in postcopy
    assert ram["multifd-bytes"] <= ram["precopy-bytes"]


def test_multifd_and_postcopy_preempt_with_2M_pages(run_migration):
    """A packet carries whole huge pages; postcopy then goes on main and preempt."""
    result = run_migration(guest__page_size="2MiB", guest__ram="64MiB",
                           migration__postcopy_preempt="true", migration__multifd="true",
                           migration__design="10.1")
    assert_postcopy(result, device=True)
    assert result["query-migrate"]["ram"]["multifd-bytes"] >= 2 << 20


def test_a_recovery_in_postcopy_needs_no_multifd_channel():
    """A pause breaks main; the recovery reconnects main (multifd stays idle in postcopy, as
    QEMU 10.1 does not reconnect it either) and the memory arrives whole. The cut comes
    past postcopy-device, as in tests/test_recovery.py: one during it fails the migration."""
    result = run_with(["cut main at 80ms"], workload__pattern="ab", migration__multifd="true",
                      migration__design="10.1")
    assert_recovered(result)
    assert result["query-migrate"]["ram"]["multifd-bytes"] > 0


def test_multifd_precopy_only_with_every_channel(run_migration):
    result = run_migration(workload__pattern="ab", migration__multifd="true",
                           migration__multifd_channels="4", migration__postcopy_ram="false")
    assert_completed(result)
    ram = result["query-migrate"]["ram"]
    # every page went on multifd, stop-and-copy's too: main carried only commands and state
    assert ram["multifd-bytes"] == ram["transferred"] > 32 << 20
    assert ram["downtime-bytes"] > 0


# ---- refused before 10.1 ----

@pytest.mark.parametrize("design", ["7.1", "8.0"])
def test_multifd_with_postcopy_is_refused_before_10_1(design):
    with pytest.raises(ConfigError, match=REFUSED):
        config(migration__multifd="true", migration__design=design)
    config(migration__multifd="true", migration__design=design,
           migration__postcopy_ram="false")  # multifd alone is precopy, in every design


def test_the_refusal_is_one_line_and_exit_2_before_anything_starts():
    done = subprocess.run([sys.executable, "-m", "emu.cli", "run", "--set",
                           "migration.multifd=true"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and REFUSED in done.stderr, done.stderr
    assert done.stdout == ""


# ---- the destination's side, spoken to over the wire ----

def packet(flags: int, normal: list[int], zero: list[int] = ()) -> bytes:
    """A multifd packet as a source without payload writes it: offsets, no page bytes."""
    return wire.multifd_header(flags, 0, np.array(normal) * PAGE, np.array(zero, int) * PAGE)


UP_TO_ADVISE = [channel.MAIN_HELLO, wire.command(wire.MIG_CMD_OPEN_RETURN_PATH),
                wire.command(wire.MIG_CMD_POSTCOPY_ADVISE)]
MULTIFD_10_1 = {"migration__multifd": "true", "migration__multifd_channels": "2",
                "migration__design": "10.1"}


def test_postcopy_listen_waits_for_every_channels_sync(traced):
    """RAM_SAVE_FLAG_MULTIFD_FLUSH on main: the listen thread reads no further (so handles no
    POSTCOPY_LISTEN) until every multifd channel has said SYNC, and the pages before each SYNC
    are placed by then."""
    with destination(**MULTIFD_10_1) as (dst, control, path):
        main = peer(path, *UP_TO_ADVISE)
        chans = [peer(path, wire.multifd_hello(i)) for i in range(2)]
        chans[0].sendall(frame(packet(0, [4, 5])) + frame(packet(wire.MULTIFD_FLAG_SYNC, [])))
        main.sendall(frame(wire.multifd_flush())
                     + frame(wire.command(wire.MIG_CMD_POSTCOPY_LISTEN)))
        traced.wait_for("multifd_recv_sync_main_wait")
        time.sleep(0.2)  # time it would have had to go on (it must not)
        assert dst.state.status == "active"
        assert not traced.named("multifd_recv_sync_main")
        chans[1].sendall(frame(packet(0, [9])) + frame(packet(wire.MULTIFD_FLAG_SYNC, [])))
        control.wait_state("postcopy-device")  # 10.1: LISTEN to RUN (QEMU 10.2)
        assert list(dst.placer.states[[4, 5, 9]]) == [R.PRECOPY] * 3
        assert traced.named("multifd_recv_sync_main")
        assert traced.named("loadvm_process_command")[-1][1]["com"] == "POSTCOPY_LISTEN"
        for sock in (main, *chans):
            sock.close()


def test_multifd_data_once_in_postcopy_is_a_protocol_error():
    """Two writers to one page corrupt the guest: a page on multifd after POSTCOPY_LISTEN
    fails the migration (QEMU 10.1 asserts !migration_in_postcopy() there)."""
    with destination(**{**MULTIFD_10_1, "migration__multifd_channels": "1"}) as (
            dst, control, path):
        main = peer(path, *UP_TO_ADVISE)
        chan = peer(path, wire.multifd_hello(0), packet(wire.MULTIFD_FLAG_SYNC, []))
        main.sendall(frame(wire.multifd_flush())
                     + frame(wire.command(wire.MIG_CMD_POSTCOPY_LISTEN)))
        control.wait_state("postcopy-device")  # 10.1: LISTEN to RUN (QEMU 10.2)
        chan.sendall(frame(packet(0, [7])))
        control.wait_state("failed")
        assert any("multifd data in postcopy" in e for e in control.errors), control.errors
        assert dst.placer.states[7] == R.MISSING
        main.close()
        chan.close()


def test_a_multifd_hello_without_multifd_is_a_stranger():
    with destination() as (dst, control, path):
        sock = peer(path, wire.multifd_hello(0))
        assert closed(sock)
        sock.close()


# ---- zero pages (multifd_recv_zero_page_process) ----

def placer_with_stale_page() -> tuple[Placer, np.ndarray]:
    ram = np.zeros((8, PAGE), np.uint8)
    ram[3] = 0xAB  # memory the page never was written to holds something (as after a reset)
    return Placer(np.zeros(8, np.uint8), ram, PAGE), ram


def test_zero_pages_are_written_when_postcopy_is_enabled():
    placer, ram = placer_with_stale_page()
    written = placer.place_multifd(np.array([1]), bytes(PAGE), np.array([3]), write_zero=True)
    assert written == 1 and not ram[3].any()
    assert placer.states[3] == R.PRECOPY


def test_without_postcopy_a_zero_page_never_received_is_only_marked():
    placer, ram = placer_with_stale_page()
    assert placer.place_multifd(np.array([], int), b"", np.array([3]), write_zero=False) == 0
    assert ram[3].all() and placer.states[3] == R.PRECOPY
    # received once already: its old bytes must go
    assert placer.place_multifd(np.array([], int), b"", np.array([3]), write_zero=False) == 1
    assert not ram[3].any()


def test_a_multifd_packet_of_part_of_a_huge_page_is_refused():
    placer = Placer(np.zeros(2, np.uint8), None, 2 << 20)
    with pytest.raises(wire.ProtocolError, match="partial host pages"):
        placer.place_multifd(np.arange(10), None, np.array([], int), write_zero=True)


# ---- the link ----

def test_the_link_relays_each_multifd_channel_as_a_connection_of_its_own(tmp_path):
    """Named by their hellos, multifd0 and multifd1 are two connections at the bottleneck
    (each with its own window and credits), published together as "multifd"."""
    target = uri.listen(f"unix:{tmp_path}/dst.sock")
    link = RelayThread(f"unix:{tmp_path}/link.sock", f"unix:{tmp_path}/dst.sock")
    try:
        srcs, dsts = [], []
        for i in range(2):
            src = Endpoint(uri.connect(f"unix:{tmp_path}/link.sock"), 1 << 20, f"multifd{i}")
            src.read_credits_in_background()
            src.send([wire.multifd_hello(i)])
            sock, _ = target.accept()
            assert channel.read_header(sock, 5) == channel.relayed_frame()
            dsts.append(Endpoint(sock, 1 << 20, f"multifd{i}"))
            assert wire.multifd_channel_id(dsts[-1].recv()) == i
            srcs.append(src)
        for src, dst in zip(srcs, dsts, strict=True):
            src.send([bytes(PAGE)])
            assert dst.recv() == bytes(PAGE)
        assert {"src-multifd0", "src-multifd1"} <= set(link.relay.ports)
        deadline = time.monotonic() + 5
        while link.relay.board["delivered-multifd"] < 2 * PAGE and time.monotonic() < deadline:
            time.sleep(0.01)
        assert link.relay.board["delivered-multifd"] >= 2 * PAGE
        for ep in srcs + dsts:
            ep.close()
    finally:
        link.close()
        target.close()
