"""The bench's guest: guest.S built at first use, its parameters, and a check of its memory.

guest.S is a multiboot kernel that QEMU's -kernel loads and enters in flat 32-bit mode. It
walks a region of guest RAM page by page in a chosen order, forever, writing into each page a
marker and the number of the pass that wrote it; a status block at a fixed address counts
passes and touches. The image is built once per version of its source into the user's cache
(GNU as and ld, the commands in BUILD) and a copy with the run's parameters patched in goes
into the harness's private directory.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from emu.migration.ram import TARGET_PAGE

SOURCE = Path(__file__).with_name("guest.S")
LOAD_ADDRESS = 0x100000  # where the linker places the image, as multiboot loaders expect
PARAMS_MAGIC = b"PCEGUEST"
STATUS_MAGIC = b"PCESTATE"
STATUS_ADDRESS = LOAD_ADDRESS + 0x80  # guest.S `status`
STATUS_SIZE = 24
MARK = 0x50434547
LCG_A, LCG_C = 1664525, 1013904223
PAGE = TARGET_PAGE  # the guest touches 4 KiB x86 pages, QEMU's target page
PATTERNS = ("ascending", "stride", "random")
# The region starts above the image and a 2 MiB boundary, so it is whole huge pages too,
# and ends a huge page before the top of RAM, where the firmware keeps its tables.
REGION_BASE = 2 << 20
REGION_TOP_GAP = 2 << 20

# The build, as commands: `{src}`, `{obj}` and `{elf}` are replaced by paths.
BUILD = (
    ("as", "--32", "-o", "{obj}", "{src}"),
    ("ld", "-m", "elf_i386", "-N", f"-Ttext={LOAD_ADDRESS:#x}", "-e", "start",
     "--build-id=none", "-o", "{elf}", "{obj}"),
)


class GuestError(RuntimeError):
    """The guest cannot be built, or its memory image is not what it wrote."""


def missing_tools() -> str | None:
    """Why the guest cannot be built here, or None."""
    for tool in {cmd[0] for cmd in BUILD}:
        if shutil.which(tool) is None:
            return f"GNU {tool} not found (apt-get install binutils)"
    return None


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "postcopy-emu"


def cached_image() -> Path:
    """Where the build of the current guest.S is cached (it may not be there yet)."""
    digest = hashlib.sha256(SOURCE.read_bytes() + repr(BUILD).encode()).hexdigest()[:16]
    return cache_dir() / f"guest-{digest}.elf"


def built_image() -> Path:
    """The built guest for the current guest.S, building it first if it is not cached.

    The build runs in a private temporary directory next to the cache entry and the result
    is renamed into place, so concurrent first uses do not see a half-written image."""
    target = cached_image()
    if target.exists():
        return target
    if (why := missing_tools()) is not None:
        raise GuestError(why)
    target.parent.mkdir(parents=True, exist_ok=True)
    work = tempfile.mkdtemp(prefix=".guest-build-", dir=target.parent)
    try:
        paths = {"src": str(SOURCE), "obj": os.path.join(work, "guest.o"),
                 "elf": os.path.join(work, "guest.elf")}
        for cmd in BUILD:
            argv = [arg.format(**paths) for arg in cmd]
            done = subprocess.run(argv, capture_output=True, text=True)
            if done.returncode != 0:
                raise GuestError(f"{' '.join(argv)} failed: {done.stderr.strip()}")
        os.replace(paths["elf"], target)
    finally:
        for name in ("guest.o", "guest.elf"):
            path = os.path.join(work, name)
            if os.path.exists(path):
                os.unlink(path)
        os.rmdir(work)
    return target


@dataclass(frozen=True)
class Walk:
    """Which pages the guest touches, in which order."""

    pattern: str  # one of PATTERNS
    base: int  # physical address of the region's first page
    npages: int
    stride: int = 1  # pages per step, for "stride"
    seed: int = 0  # the first LCG value of a pass, for "random"

    @classmethod
    def for_ram(cls, pattern: str, ram: int, stride: int | None = None,
                seed: int = 12345) -> Walk:
        """The walk over all of a guest of `ram` bytes but its first and last 2 MiB. The
        default stride is the one nearest 0.382 of the region (the golden section) that is
        coprime with it: every step jumps about a hundred MiB in a 256 MiB guest, and no
        two nearby steps land near each other."""
        if pattern not in PATTERNS:
            raise ValueError(f"pattern must be one of {', '.join(PATTERNS)}, not {pattern!r}")
        npages = (ram - REGION_BASE - REGION_TOP_GAP) // PAGE
        if npages < 2:
            raise ValueError(f"guest RAM {ram} bytes leaves no region to walk")
        if stride is None:
            stride = round(npages * 0.382)
        while math.gcd(stride, npages) != 1:
            stride += 1
        if not 0 < stride < npages:
            raise ValueError(f"stride must be between 1 and {npages - 1} pages")
        return cls(pattern, REGION_BASE, npages, stride, seed)

    @property
    def mask(self) -> int:
        return (1 << max(1, (self.npages - 1).bit_length())) - 1

    def params(self) -> bytes:
        """guest.S's PARAMS block."""
        return PARAMS_MAGIC + struct.pack("<7I", 1, PATTERNS.index(self.pattern), self.base,
                                          self.npages, self.stride, self.seed & 0xFFFFFFFF,
                                          self.mask)

    def order(self) -> list[int]:
        """The page numbers of one pass, in the guest's order (the same arithmetic)."""
        n = self.npages
        if self.pattern == "ascending":
            return list(range(n))
        if self.pattern == "stride":
            return [(i * self.stride) % n for i in range(n)]
        pages, x, mask = [], self.seed & self.mask, self.mask
        while len(pages) < n:
            if x < n:
                pages.append(x)
            x = (LCG_A * x + LCG_C) & mask
        return pages


def write_image(walk: Walk, path: str) -> None:
    """Write a copy of the built guest with `walk` patched into its PARAMS block."""
    image = bytearray(built_image().read_bytes())
    at = image.find(PARAMS_MAGIC)
    if at < 0 or image.find(PARAMS_MAGIC, at + 1) >= 0:
        raise GuestError("the built guest has no single PARAMS block")
    block = walk.params()
    image[at:at + len(block)] = block
    with open(path, "wb") as out:
        out.write(image)


@dataclass(frozen=True)
class Status:
    state: int  # 0 not started, 1 running, 2 refused
    passes: int  # the pass in progress, from 1
    index: int  # positions of that pass already written
    error: int
    touches: int  # pages written since boot: (passes - 1) * npages + index

    @classmethod
    def parse(cls, raw: bytes, npages: int) -> Status:
        """guest.S's STATUS block, read from the guest that walks `npages` pages. Read from
        a running guest, passes and index may be a step apart."""
        if raw[:8] != STATUS_MAGIC:
            raise GuestError(f"no guest status block at {STATUS_ADDRESS:#x}")
        state, passes, index, error = struct.unpack_from("<4I", raw, 8)
        return cls(state, passes, index, error, max(0, passes - 1) * npages + index)


def verify(walk: Walk, status: Status, region: bytes) -> None:
    """Check a stopped guest's region (its bytes from walk.base) against what the guest
    wrote: each page's marker, and its pass number (the current pass up to `index`, the
    previous one after it; the page at `index` may hold either, written but not yet
    counted). Raises GuestError naming the first wrong page."""
    if status.state != 1:
        raise GuestError(f"guest not running: state {status.state}, error {status.error}")
    if len(region) < walk.npages * PAGE:
        raise GuestError(f"region image has {len(region)} bytes, expected {walk.npages * PAGE}")
    current, done = status.passes, status.index
    for position, page in enumerate(walk.order()):
        marker, written = struct.unpack_from("<2I", region, page * PAGE)
        expected = {current} if position < done else {current - 1}
        if position == done:
            expected.add(current)
        address = walk.base + page * PAGE
        if written == 0 and current - 1 == 0 and position >= done:
            if marker != 0:
                raise GuestError(f"page {address:#x}: marker {marker:#x} on an untouched page")
            continue
        if marker != address ^ MARK or written not in expected:
            raise GuestError(
                f"page {address:#x} (position {position} of pass {current}, {done} done): "
                f"marker {marker:#x}, pass {written}; expected marker {address ^ MARK:#x}, "
                f"pass {' or '.join(map(str, sorted(expected)))}")
