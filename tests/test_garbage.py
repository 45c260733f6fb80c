"""Garbage on the wire: every decoder says ProtocolError/ChannelError, never crashes, hangs, or
places a page where it does not belong."""

import socket

import numpy as np
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from emu.migration import ram as R
from emu.migration import wire
from emu.migration.placement import MAIN, Placer
from emu.net import channel
from emu.net.channel import ChannelError, Endpoint


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_frame_reader_rejects_garbage(blob):
    a, b = socket.socketpair()
    ep = Endpoint(b, 1 << 20, "fuzz")
    a.sendall(blob)
    a.close()  # the reader must come back: with a frame or an error, never hang
    try:
        while True:
            ep.recv()
    except ChannelError:
        pass
    b.close()


def frame(payload: bytes, check: int | None = None) -> bytes:
    check = channel.checksum(payload) if check is None else check
    return channel.HEADER.pack(channel.DATA, len(payload), 0, 0.0, check) + payload


def test_a_flipped_byte_is_caught_by_the_checksum():
    a, b = socket.socketpair()
    ep = Endpoint(b, 1 << 20, "fuzz")
    good = frame(b"x" * 100)
    bad = bytearray(good)
    bad[-7] ^= 0x10
    a.sendall(good + bytes(bad))
    assert ep.recv() == b"x" * 100
    try:
        ep.recv()
        raise AssertionError("a corrupted frame was accepted")
    except ChannelError as err:
        assert "checksum" in str(err)


NPAGES = 8


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(offset=st.integers(0, 2 * NPAGES * R.TARGET_PAGE), npages=st.integers(0, 2 * NPAGES),
       flags=st.integers(0, 255), extra=st.integers(-5, 5), huge=st.booleans())
@example(offset=0, npages=0, flags=wire.RAM_SAVE_FLAG_MULTIFD_FLUSH, extra=0, huge=False)
def test_ram_records_land_where_they_say_or_nowhere(offset, npages, flags, extra, huge):
    page_size = 4 * R.TARGET_PAGE if huge else R.TARGET_PAGE
    msg = wire.ram_header(offset, npages, flags) + bytes([7]) * max(0, npages * 4096 + extra)
    states = np.zeros(NPAGES * R.TARGET_PAGE // page_size, np.uint8)
    ram = np.zeros((NPAGES, R.TARGET_PAGE), np.uint8)
    placer = Placer(states, ram, page_size)
    placer.postcopy = True
    try:
        rec = wire.decode_main(msg, payload=True)
        if isinstance(rec, wire.MultifdFlush):  # the one header that is no record (loadvm's)
            assert (offset, npages, flags, extra) == (0, 0, wire.RAM_SAVE_FLAG_MULTIFD_FLUSH, 0)
            return
        placer.receive(MAIN, rec)
    except wire.ProtocolError:
        assert not ram.any() and not states.any()
        return
    first = offset // R.TARGET_PAGE
    written = np.flatnonzero(ram.any(axis=1))
    assert set(written) <= set(range(first, first + npages))
    placed = np.flatnonzero(states)
    assert all(p * page_size >= offset and (p + 1) * page_size <= offset + npages * 4096
               for p in placed)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_recv_bitmap_parser(blob):
    try:
        bits = wire.parse_recv_bitmap(blob, 20)
        assert bits.shape == (20,)
    except wire.ProtocolError:
        pass


def test_strangers_on_the_migration_address_do_not_disturb_the_migration():
    """Connections that do not start with a migration hello are closed unheard."""
    import os

    from emu.controller import Run
    from tests.conftest import config

    with Run(config(migration__postcopy_preempt="true")) as run:
        path = run.link_uri.split(":", 1)[1]
        strangers = []
        for junk in (b"GET / HTTP/1.0\r\n\r\n", os.urandom(300), frame(b"hello?")):
            s = socket.socket(socket.AF_UNIX)
            s.connect(path)
            s.sendall(junk)
            strangers.append(s)
        run.wait()
        assert run.ok, run.errors
        for s in strangers:
            s.settimeout(5)
            try:  # closed by the link, while the migration went on
                assert s.recv(10) == b""
            except ConnectionResetError:
                pass  # closed unread: accepted after the destination stopped listening
            s.close()
