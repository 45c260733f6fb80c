"""The migration protocol's encoders and decoders."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from emu.migration import wire


def test_ram_record_round_trip_with_payload():
    data = bytes(range(256)) * 32
    msg = wire.ram_header(8192, 2, wire.RAM_SAVE_FLAG_PAGE) + data
    rec = wire.decode_main(msg, payload=True)
    assert (rec.offset, rec.npages, bytes(rec.data)) == (8192, 2, data)


def test_ram_record_without_payload_carries_no_bytes():
    rec = wire.decode_main(wire.ram_header(4096, 3, wire.RAM_SAVE_FLAG_PAGE), payload=False)
    assert (rec.offset, rec.npages, rec.data) == (4096, 3, None)


@pytest.mark.parametrize("msg, why", [
    (wire.ram_header(4096, 1, wire.RAM_SAVE_FLAG_PAGE) + bytes(100), "carries"),
    (wire.ram_header(4095, 1, wire.RAM_SAVE_FLAG_PAGE) + bytes(4096), "aligned"),
    (wire.ram_header(0, 1, 0x80 | wire.RAM_SAVE_FLAG_PAGE) + bytes(4096), "flags"),
    (wire.ram_header(0, 0, wire.RAM_SAVE_FLAG_PAGE), "flags"),
    (b"\x77", "unknown section"),
    (b"", "empty"),
    (wire.command(wire.MIG_CMD_PING, b"abcd")[:-1], "bad command"),
])
def test_malformed_main_stream_is_a_protocol_error(msg, why):
    with pytest.raises(wire.ProtocolError, match=why):
        wire.decode_main(msg, payload=True)


def test_commands_and_discard_ranges_round_trip():
    ranges = [(0, 4096), (1 << 30, 2 << 20)]
    msg = wire.decode_main(wire.discard_ranges(ranges), payload=True)
    assert msg.cmd == wire.MIG_CMD_POSTCOPY_RAM_DISCARD
    assert wire.parse_discard(msg.data) == ranges


def test_device_state_round_trip():
    assert wire.decode_main(wire.device_state({"vcpus": [3, 4]}), True).state == {"vcpus": [3, 4]}


def test_page_requests_name_the_block_first_then_not():
    first = wire.decode_rp(wire.req_pages(2 << 20, 2 << 20, first=True))
    later = wire.decode_rp(wire.req_pages(4 << 20, 2 << 20, first=False))
    assert first[0] == wire.MIG_RP_MSG_REQ_PAGES_ID and later[0] == wire.MIG_RP_MSG_REQ_PAGES
    assert wire.parse_req_pages(*first) == (2 << 20, 2 << 20)
    assert wire.parse_req_pages(*later) == (4 << 20, 2 << 20)


@given(st.binary(max_size=64))
def test_return_path_decoder_never_crashes(blob):
    try:
        kind, data = wire.decode_rp(blob)
        if kind in (wire.MIG_RP_MSG_REQ_PAGES, wire.MIG_RP_MSG_REQ_PAGES_ID):
            wire.parse_req_pages(kind, data)
    except wire.ProtocolError:
        pass


@given(st.binary(max_size=64), st.booleans())
def test_main_stream_decoder_never_crashes(blob, payload):
    try:
        msg = wire.decode_main(blob, payload)
        if isinstance(msg, wire.Command) and msg.cmd == wire.MIG_CMD_POSTCOPY_RAM_DISCARD:
            wire.parse_discard(msg.data)
    except wire.ProtocolError:
        pass
