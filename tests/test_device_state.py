"""A forged stream on the migration address: what it says is checked against the destination's
own configuration, and a load that does not fit fails the incoming migration, as QEMU's does
("load of migration failed: ..."), instead of starting threads the source asked for.

These tests speak the wire protocol (emu/migration/wire.py) straight to a destination in this
process.
"""

import struct

import pytest

from emu.migration import wire
from emu.migration.workload import MAX_POS
from emu.net import channel
from tests.wire_peer import closed, destination, frame, peer, read_frame


def cmd(number: int) -> bytes:
    return wire.command(number)


UP_TO_LISTEN = [channel.MAIN_HELLO, cmd(wire.MIG_CMD_OPEN_RETURN_PATH),
                cmd(wire.MIG_CMD_POSTCOPY_ADVISE), cmd(wire.MIG_CMD_POSTCOPY_LISTEN)]


@pytest.mark.parametrize("state", [
    {"vcpus": ["x"]}, {"vcpus": 5}, {"vcpus": [0] * 64}, {"vcpus": []}, {"vcpus": [-1]},
    {"vcpus": [True]}, {"vcpus": [1.5]}, {"vcpus": [MAX_POS + 1]}, {"vcpus": [None]}, {},
])
def test_a_forged_device_state_fails_the_incoming_migration(state):
    with destination() as (dst, control, path):
        sock = peer(path, *UP_TO_LISTEN, wire.device_state(state), cmd(wire.MIG_CMD_POSTCOPY_RUN))
        control.wait_state("failed")
        assert control.errors[0].startswith(
            "destination: load of migration failed: Invalid argument: device state: 'vcpus' "
            "must be the positions of the guest's 1 vCPU(s)"), control.errors
        assert dst.vcpus == []  # no guest thread started on what the stream said
        assert closed(sock)


def test_the_device_state_of_a_real_source_starts_the_guest_once():
    with destination(guest__vcpus="2") as (dst, control, path):
        sock = peer(path, *UP_TO_LISTEN, wire.device_state({"vcpus": [7, MAX_POS]}),
                    cmd(wire.MIG_CMD_POSTCOPY_RUN), cmd(wire.MIG_CMD_PING))
        # all taken in once the PONG comes: the vCPUs it started may ask for pages before it
        kind = wire.decode_rp(read_frame(sock))[0]
        while kind in (wire.MIG_RP_MSG_REQ_PAGES, wire.MIG_RP_MSG_REQ_PAGES_ID):
            kind = wire.decode_rp(read_frame(sock))[0]
        assert kind == wire.MIG_RP_MSG_PONG
        assert [v.workload.pos for v in dst.vcpus] == [7, MAX_POS]
        assert dst.state.status == "postcopy-active"
        sock.sendall(frame(cmd(wire.MIG_CMD_POSTCOPY_RUN)))  # a second one is forged
        control.wait_state("failed")
        assert control.errors == ["destination: load of migration failed: Invalid argument: "
                                  "CMD_POSTCOPY_RUN in wrong postcopy state (4)"]
        assert len(dst.vcpus) == 2


def test_postcopy_run_before_listen_is_refused():
    with destination() as (dst, control, path):
        peer(path, *UP_TO_LISTEN[:3], cmd(wire.MIG_CMD_POSTCOPY_RUN))
        control.wait_state("failed")
        assert control.errors[0].endswith("CMD_POSTCOPY_RUN in wrong postcopy state (1)")
        assert dst.vcpus == []


def test_pings_are_answered_on_the_return_path():
    """The harness itself: a peer that speaks the protocol is heard."""
    with destination() as (_, control, path):
        sock = peer(path, channel.MAIN_HELLO, wire.command(wire.MIG_CMD_PING, b"\0\0\0\7"))
        kind, data = wire.decode_rp(read_frame(sock))
        assert (kind, struct.unpack(">I", data)[0]) == (wire.MIG_RP_MSG_PONG, 7)
        control.wait_state("active")
