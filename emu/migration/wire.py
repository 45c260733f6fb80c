"""The migration protocol: what the source and the destination say to each other.

Main stream (source -> destination), one message per frame, named after QEMU's savevm/ram
formats: commands (QEMU_VM_COMMAND + MIG_CMD_*), RAM records, device state, EOF.
RAM records carry a run of target pages: QEMU writes one record per 4 KiB page; we let one
record carry up to record_pages() contiguous pages, because a Python process pays per record
what QEMU pays per page. A write of emulator.chunk bytes of 4 KiB pages is several records:
QEMU's destination reads IO_BUF_SIZE (32 KiB) at a time and places each page as soon as it
has parsed it (ram_load_postcopy()), while the emulated link delivers a frame once its last
byte is in, so a record no larger than one read keeps a page from waiting for the rest of
the write behind it. A huge page is placed only once all of it is in, so its records can
be as large as the page. In precopy no vCPU waits for a page: a write is one record there.
A zero record (RAM_SAVE_FLAG_ZERO) carries a run of all-zero pages as QEMU's fill byte per
page instead of their bytes (save_zero_page_to_file()).
Return path (destination -> source): QEMU's MIG_RP_MSG_* with their numbers.

Every decoder raises ProtocolError on input that does not parse, never anything else.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

import numpy as np

from emu.migration.ram import TARGET_PAGE

BLOCK = b"pc.ram"  # our guest has one RAM block, named as QEMU's is

# Main stream section types (QEMU_VM_*)
QEMU_VM_EOF = 0x01
QEMU_VM_SECTION_PART = 0x02  # here: a RAM record
QEMU_VM_SECTION_FULL = 0x04  # here: device state
QEMU_VM_COMMAND = 0x08

# MIG_CMD_*
MIG_CMD_OPEN_RETURN_PATH = 1
MIG_CMD_PING = 2
MIG_CMD_POSTCOPY_ADVISE = 3
MIG_CMD_POSTCOPY_LISTEN = 4
MIG_CMD_POSTCOPY_RUN = 5
MIG_CMD_POSTCOPY_RAM_DISCARD = 6
MIG_CMD_POSTCOPY_RESUME = 7
MIG_CMD_PACKAGED = 8
MIG_CMD_RECV_BITMAP = 9
MIG_CMD_NAMES = {1: "OPEN_RETURN_PATH", 2: "PING", 3: "POSTCOPY_ADVISE", 4: "POSTCOPY_LISTEN",
                 5: "POSTCOPY_RUN", 6: "POSTCOPY_RAM_DISCARD", 7: "POSTCOPY_RESUME",
                 8: "PACKAGED", 9: "RECV_BITMAP"}

# RAM_SAVE_FLAG_*
RAM_SAVE_FLAG_ZERO = 0x02
RAM_SAVE_FLAG_PAGE = 0x08
RAM_SAVE_FLAG_EOS = 0x10
RAM_SAVE_FLAG_CONTINUE = 0x20
# main: every multifd channel has sent a SYNC before this. QEMU's value is 0x200, which our
# one-byte flags cannot hold; 0x80 is free here (QEMU's retired RAM_SAVE_FLAG_HOOK).
RAM_SAVE_FLAG_MULTIFD_FLUSH = 0x80
RAM_FLAGS = RAM_SAVE_FLAG_ZERO | RAM_SAVE_FLAG_PAGE | RAM_SAVE_FLAG_EOS | RAM_SAVE_FLAG_CONTINUE
RAM_KINDS = RAM_SAVE_FLAG_ZERO | RAM_SAVE_FLAG_PAGE  # a record is exactly one of these
# What QEMU writes for one zero page: an 8-byte page header (offset | flags, the block
# implied by RAM_SAVE_FLAG_CONTINUE) and the fill byte. A zero record costs this per page.
ZERO_PAGE_BYTES = 9

# MIG_RP_MSG_*
MIG_RP_MSG_SHUT = 1
MIG_RP_MSG_PONG = 2
MIG_RP_MSG_REQ_PAGES_ID = 3
MIG_RP_MSG_REQ_PAGES = 4
MIG_RP_MSG_RECV_BITMAP = 5
MIG_RP_MSG_RESUME_ACK = 6
RP_NAMES = {1: "SHUT", 2: "PONG", 3: "REQ_PAGES_ID", 4: "REQ_PAGES", 5: "RECV_BITMAP",
            6: "RESUME_ACK"}

_CMD = struct.Struct("<BHH")  # section type, command, length
_RAM = struct.Struct("<BQIB")  # section type, offset (bytes), target pages, flags
RAM_HEADER_SIZE = _RAM.size
READ_PAGES = (32 << 10) // TARGET_PAGE  # IO_BUF_SIZE, in target pages (above)
# type, length; QEMU's length is 16 bits, ours 32: our RECV_BITMAP carries the bitmap inline
_RP = struct.Struct("<HI")
_RANGE = struct.Struct("<QQ")  # first host page... as QEMU: start and length, in bytes


class ProtocolError(ValueError):
    pass


@dataclass
class RamRecord:
    offset: int  # bytes into the RAM block
    npages: int  # target pages in this record
    flags: int
    data: memoryview | None  # npages * 4 KiB; None when the payload does not travel, and in
    # a zero record

    @property
    def zero(self) -> bool:
        """A run of all-zero pages (RAM_SAVE_FLAG_ZERO): placed as zeros, no bytes."""
        return bool(self.flags & RAM_SAVE_FLAG_ZERO)


@dataclass
class MultifdFlush:
    """RAM_SAVE_FLAG_MULTIFD_FLUSH on main: the destination waits for every multifd channel's
    sync (multifd_recv_sync_main()) before it reads on."""


@dataclass
class Command:
    cmd: int
    data: bytes


@dataclass
class DeviceState:
    state: dict


@dataclass
class Eof:
    pass


# ---- main stream: encode ----

def command(cmd: int, data: bytes = b"") -> bytes:
    return _CMD.pack(QEMU_VM_COMMAND, cmd, len(data)) + data


# savevm.h (QEMU 10.2): the PING before POSTCOPY_RUN whose PONG says the destination loaded
# the device state (postcopy-device -> postcopy-active on the source)
QEMU_VM_PING_PACKAGED_LOADED = 0x42


def ping(value: int) -> bytes:
    """MIG_CMD_PING (qemu_savevm_send_ping): the destination answers with a PONG of the same
    32-bit value, so a trace shows how far the other side has read."""
    return command(MIG_CMD_PING, value.to_bytes(4, "big"))


def ram_header(offset: int, npages: int, flags: int) -> bytes:
    return _RAM.pack(QEMU_VM_SECTION_PART, offset, npages, flags)


def record_pages(page_size: int) -> int:
    """Target pages a record carries at most, on a guest of `page_size` host pages: one
    read of the destination's, or one host page if that is larger (above)."""
    return max(READ_PAGES, page_size // TARGET_PAGE)


def pages_bytes(npages: int, per_record: int) -> int:
    """What npages contiguous target pages cost on the wire: their bytes and the headers of
    their records, of at most per_record pages each."""
    return npages * TARGET_PAGE + -(-npages // per_record) * RAM_HEADER_SIZE


def zero_record(offset: int, npages: int) -> bytes:
    """npages all-zero target pages from byte `offset`: the header and one fill byte (0) per
    page, as QEMU's save_zero_page_to_file() writes after each page's header."""
    return ram_header(offset, npages, RAM_SAVE_FLAG_ZERO | RAM_SAVE_FLAG_CONTINUE) \
        + bytes(npages)


def multifd_flush() -> bytes:
    """RAM_SAVE_FLAG_MULTIFD_FLUSH: a RAM section header with no page."""
    return ram_header(0, 0, RAM_SAVE_FLAG_MULTIFD_FLUSH)


def device_state(state: dict) -> bytes:
    return bytes([QEMU_VM_SECTION_FULL]) + json.dumps(state).encode()


def eof() -> bytes:
    return bytes([QEMU_VM_EOF])


def discard_ranges(ranges: list[tuple[int, int]]) -> bytes:
    """POSTCOPY_RAM_DISCARD body: version 0, block name, then (start, length) in bytes."""
    body = bytes([0, len(BLOCK)]) + BLOCK
    return command(MIG_CMD_POSTCOPY_RAM_DISCARD,
                   body + b"".join(_RANGE.pack(s, n) for s, n in ranges))


# ---- main stream: decode ----

def decode_main(msg: bytes,
                payload: bool) -> RamRecord | MultifdFlush | Command | DeviceState | Eof:
    if not msg:
        raise ProtocolError("empty message on the main stream")
    kind = msg[0]
    if kind == QEMU_VM_SECTION_PART:
        return _decode_ram(msg, payload)
    if kind == QEMU_VM_COMMAND:
        return _decode_command(msg)
    if kind == QEMU_VM_SECTION_FULL:
        return _decode_device(msg)
    if kind == QEMU_VM_EOF and len(msg) == 1:
        return Eof()
    raise ProtocolError(f"unknown section type 0x{kind:02x}")


def _decode_ram(msg: bytes, payload: bool) -> RamRecord | MultifdFlush:
    if len(msg) < _RAM.size:
        raise ProtocolError("short RAM record")
    _, offset, npages, flags = _RAM.unpack_from(msg)
    if flags == RAM_SAVE_FLAG_MULTIFD_FLUSH and npages == 0 and offset == 0 \
            and len(msg) == _RAM.size:
        return MultifdFlush()
    if flags & ~RAM_FLAGS or (flags & RAM_KINDS) not in (RAM_SAVE_FLAG_PAGE, RAM_SAVE_FLAG_ZERO) \
            or npages == 0:
        raise ProtocolError(f"bad RAM record flags 0x{flags:x} / pages {npages}")
    if offset % TARGET_PAGE:
        raise ProtocolError(f"RAM offset {offset} not page aligned")
    if flags & RAM_SAVE_FLAG_ZERO:
        return _decode_zero(msg, offset, npages, flags)
    want = npages * TARGET_PAGE if payload else 0
    if len(msg) - _RAM.size != want:
        raise ProtocolError(f"RAM record of {npages} pages carries {len(msg) - _RAM.size} bytes")
    return RamRecord(offset, npages, flags, memoryview(msg)[_RAM.size:] if payload else None)


def _decode_zero(msg: bytes, offset: int, npages: int, flags: int) -> RamRecord:
    """A zero record, in either payload mode: one fill byte per page, each 0 (QEMU would
    memset another value; no source of ours sends one)."""
    fill = msg[_RAM.size:]
    if len(fill) != npages:
        raise ProtocolError(f"zero RAM record of {npages} pages carries {len(fill)} fill bytes")
    if fill.count(0) != npages:
        raise ProtocolError(f"zero RAM record with a fill byte other than 0 at offset {offset}")
    return RamRecord(offset, npages, flags, None)


def _decode_command(msg: bytes) -> Command:
    if len(msg) < _CMD.size:
        raise ProtocolError("short command")
    _, cmd, length = _CMD.unpack_from(msg)
    if cmd not in MIG_CMD_NAMES or len(msg) != _CMD.size + length:
        raise ProtocolError(f"bad command {cmd} of length {length}")
    return Command(cmd, msg[_CMD.size:])


def _decode_device(msg: bytes) -> DeviceState:
    try:
        state = json.loads(msg[1:])
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ProtocolError(f"bad device state: {err}") from None
    if not isinstance(state, dict):
        raise ProtocolError("bad device state: not an object")
    return DeviceState(state)


def parse_discard(data: bytes) -> list[tuple[int, int]]:
    if len(data) < 2 or data[0] != 0 or data[2:2 + data[1]] != BLOCK:
        raise ProtocolError("bad POSTCOPY_RAM_DISCARD header")
    body = data[2 + data[1]:]
    if len(body) % _RANGE.size:
        raise ProtocolError("bad POSTCOPY_RAM_DISCARD length")
    return [r for r in _RANGE.iter_unpack(body)]


# ---- multifd channels ----

# multifd.c: the first message of a multifd channel (multifd_send_initial_packet(): magic,
# version, the channel's id), and the packets after it (MultiFDPacket_t: magic, flags, the
# numbers of normal and zero pages, packet_num, then each page's offset and the normal pages'
# bytes). Offsets are in bytes into the RAM block, as QEMU's.
MULTIFD_MAGIC = 0x11223344
MULTIFD_VERSION = 1
MULTIFD_FLAG_SYNC = 1 << 0
_MULTIFD_HELLO = struct.Struct(">IBBH")  # magic, version, id, padding: 8 bytes (HELLO_MAX)
_MULTIFD = struct.Struct("<IIIIQ")  # magic, flags, normal pages, zero pages, packet_num


@dataclass
class MultifdPacket:
    flags: int
    packet_num: int
    normal: np.ndarray  # byte offsets of the normal pages, in the order of their bytes
    zero: np.ndarray  # byte offsets of the zero pages
    data: memoryview | None  # the normal pages' bytes; None when the payload does not travel

    @property
    def sync(self) -> bool:
        return bool(self.flags & MULTIFD_FLAG_SYNC)


def multifd_hello(channel_id: int) -> bytes:
    return _MULTIFD_HELLO.pack(MULTIFD_MAGIC, MULTIFD_VERSION, channel_id, 0)


def multifd_channel_id(hello: bytes) -> int | None:
    """The id a multifd channel's first message names, or None if it is not one."""
    if len(hello) != _MULTIFD_HELLO.size:
        return None
    magic, version, channel_id, pad = _MULTIFD_HELLO.unpack(hello)
    if magic != MULTIFD_MAGIC or version != MULTIFD_VERSION or pad:
        return None
    return channel_id


def multifd_header(flags: int, packet_num: int, normal: np.ndarray, zero: np.ndarray) -> bytes:
    """A packet's header and page offsets (its normal pages' bytes follow, or are charged)."""
    return (_MULTIFD.pack(MULTIFD_MAGIC, flags, len(normal), len(zero), packet_num)
            + normal.astype("<u8").tobytes() + zero.astype("<u8").tobytes())


def decode_multifd(msg: bytes, payload: bool) -> MultifdPacket:
    """multifd_recv_unfill_packet(): a packet, its offsets page aligned."""
    if len(msg) < _MULTIFD.size:
        raise ProtocolError("short multifd packet")
    magic, flags, nnormal, nzero, packet_num = _MULTIFD.unpack_from(msg)
    if magic != MULTIFD_MAGIC or flags & ~MULTIFD_FLAG_SYNC:
        raise ProtocolError(f"bad multifd packet magic 0x{magic:x} / flags 0x{flags:x}")
    end = _MULTIFD.size + 8 * (nnormal + nzero)
    want = end + (nnormal * TARGET_PAGE if payload else 0)
    if len(msg) != want:
        raise ProtocolError(f"multifd packet of {nnormal} normal pages carries "
                            f"{len(msg) - _MULTIFD.size} bytes")
    offsets = np.frombuffer(msg, "<u8", nnormal + nzero, _MULTIFD.size).astype(np.int64)
    if np.any(offsets % TARGET_PAGE):
        raise ProtocolError("multifd page offset not page aligned")
    data = memoryview(msg)[end:] if payload else None
    return MultifdPacket(flags, packet_num, offsets[:nnormal], offsets[nnormal:], data)


# ---- return path ----

def rp_message(kind: int, data: bytes = b"") -> bytes:
    return _RP.pack(kind, len(data)) + data


def req_pages(offset: int, length: int, first: bool) -> bytes:
    """REQ_PAGES_ID names the block (the first request); REQ_PAGES means the same block."""
    if first:
        return rp_message(MIG_RP_MSG_REQ_PAGES_ID,
                          struct.pack("<QIB", offset, length, len(BLOCK)) + BLOCK)
    return rp_message(MIG_RP_MSG_REQ_PAGES, struct.pack("<QI", offset, length))


def recv_bitmap(received) -> bytes:
    """MIG_RP_MSG_RECV_BITMAP: the block name, then one bit per host page received."""
    bits = np.packbits(np.asarray(received, bool), bitorder="little").tobytes()
    return rp_message(MIG_RP_MSG_RECV_BITMAP, bytes([len(BLOCK)]) + BLOCK + bits)


def parse_recv_bitmap(data: bytes, npages: int):
    """The received bitmap of a MIG_RP_MSG_RECV_BITMAP body, as a bool array of npages."""
    size = 1 + len(BLOCK) + (npages + 7) // 8
    if not data or data[1:1 + data[0]] != BLOCK or len(data) != size:
        raise ProtocolError("bad RECV_BITMAP body")
    bits = np.frombuffer(data, np.uint8, offset=1 + len(BLOCK))
    return np.unpackbits(bits, count=npages, bitorder="little").astype(bool)


def decode_rp(msg: bytes) -> tuple[int, bytes]:
    if len(msg) < _RP.size:
        raise ProtocolError("short return-path message")
    kind, length = _RP.unpack_from(msg)
    if kind not in RP_NAMES or len(msg) != _RP.size + length:
        raise ProtocolError(f"bad return-path message {kind} of length {length}")
    return kind, msg[_RP.size:]


def parse_req_pages(kind: int, data: bytes) -> tuple[int, int]:
    """(offset, length) of a page request, checking the block name of REQ_PAGES_ID."""
    if kind == MIG_RP_MSG_REQ_PAGES and len(data) == 12:
        return struct.unpack("<QI", data)
    if kind == MIG_RP_MSG_REQ_PAGES_ID and len(data) >= 13:
        offset, length, n = struct.unpack_from("<QIB", data)
        if data[13:] == BLOCK and n == len(BLOCK):
            return offset, length
    raise ProtocolError(f"bad {RP_NAMES.get(kind, kind)} body")
